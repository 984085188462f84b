"""The request model against Runware's own OpenAPI schema of Z-Image-Turbo (seed 003), both ways.

(a) what `to_wire()` emits for valid requests is valid for the schema; (b) what the schema refuses,
`build()` refuses, naming the parameter. Plus: every schema property is reachable from the model, and the
request examples of the model pages build to the same wire dict.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError as SchemaError
from pydantic import BaseModel

from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.runware.models import (
    CATALOG,
    SCHEDULERS,
    ImageInferenceRequest,
    ImageResult,
)
from airflow_provider_zimage.testing.runware_server.schema import seeds_dir

SEEDS = seeds_dir()
pytestmark = pytest.mark.skipif(
    not any(SEEDS.glob("003_*.txt")),
    reason=f"the Runware API seeds (003_*.txt OpenAPI schema) are not in {SEEDS}; set ZIMAGE_SEEDS_DIR",
)
TURBO = "runware:z-image@turbo"

# Parameters the model knows beyond the Turbo schema, each documented on another model's page.
EXTRA_PARAMETERS = {
    "": {"acceleration"},  # TwinFlow page (004)
    "ultralytics": {"inpaintSize"},  # Z-Image page (000)
}


def _tolerant_multiple_of(validator: Any, step: float, instance: Any, schema: Any) -> Iterator[SchemaError]:
    """jsonschema tests `multipleOf` 0.01 with exact float division, so 0.07 fails; Runware does not."""
    if validator.is_type(instance, "number"):
        quotient = instance / step
        if abs(quotient - round(quotient)) > 1e-9 * max(1.0, abs(quotient)):
            yield SchemaError(f"{instance!r} is not a multiple of {step}")


Validator = validators.extend(Draft202012Validator, {"multipleOf": _tolerant_multiple_of})


@cache
def openapi() -> dict[str, Any]:
    return json.loads(next(SEEDS.glob("003_*.txt")).read_text())


@cache
def validator() -> Any:
    schema = openapi()["components"]["schemas"]["RequestBody"]
    return Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def item_schema() -> dict[str, Any]:
    return openapi()["components"]["schemas"]["RequestBody"]["items"]


def schema_accepts(task: dict[str, Any]) -> bool:
    return validator().is_valid([task])


def object_schemas() -> dict[str, dict[str, Any]]:
    """Every object of the request, by wire path ("" for the task itself, "lora" for its items)."""
    top = item_schema()
    found = {"": top}
    for name, prop in top["properties"].items():
        target = prop.get("items", prop)
        if target.get("type") == "object":
            found[name] = target
    return found


def model_of(path: str) -> type[BaseModel]:
    model: type[BaseModel] = ImageInferenceRequest
    for part in filter(None, path.split(".")):
        field = next(f for n, f in model.model_fields.items() if (f.alias or n) == part)
        annotation = field.annotation
        model = next(a for a in _walk(annotation) if isinstance(a, type) and issubclass(a, BaseModel))
    return model


def _walk(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in getattr(annotation, "__args__", ()):
        yield from _walk(arg)


def wire_names(model: type[BaseModel]) -> set[str]:
    return {f.alias or n for n, f in model.model_fields.items()}


# -- structure -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["", "safety", "inputs", "acceleratorOptions", "outpaint", "lora", "controlNet", "ultralytics"]
)
def test_every_schema_property_is_reachable_and_nothing_else(path):
    schema = object_schemas()[path]
    assert set(schema["properties"]) | EXTRA_PARAMETERS.get(path, set()) == wire_names(model_of(path))


def test_the_schema_objects_are_the_ones_tested():
    assert set(object_schemas()) == {
        "",
        "safety",
        "inputs",
        "acceleratorOptions",
        "outpaint",
        "lora",
        "controlNet",
        "ultralytics",
    }


def test_schedulers_are_exactly_the_schema_enum():
    assert list(SCHEDULERS) == item_schema()["properties"]["scheduler"]["enum"]


def _examples(text: str) -> Iterator[dict[str, Any]]:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{\s*\"taskType\"", text):
        obj, _ = decoder.raw_decode(text, match.start())
        if isinstance(obj["taskType"], str):  # not the schema's own `properties.taskType`
            yield obj


def page_examples() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, obj) for p in sorted(SEEDS.glob("*.txt")) for obj in _examples(p.read_text())]


def test_the_model_pages_have_examples():
    if not any(SEEDS.glob("00[0124]_*.txt")):
        pytest.skip(f"only the OpenAPI seed is in {SEEDS}; the model pages with examples are in shared/seeds")
    kinds = [("request" if "positivePrompt" in obj else "response") for _, obj in page_examples()]
    assert kinds.count("request") >= 8 and kinds.count("response") >= 8


def test_page_request_examples_build_to_the_same_wire_dict():
    for page, example in page_examples():
        if "positivePrompt" not in example:
            continue
        request = ImageInferenceRequest.build(**example)
        assert request.to_wire() == example, page
        if example["model"] == TURBO:
            assert schema_accepts(request.to_wire()), page


def test_page_response_examples_parse_as_results():
    for page, example in page_examples():
        if "imageUUID" not in example:
            continue
        result = ImageResult.from_wire(example)
        assert result.image_uuid == example["imageUUID"], page
        assert result.cost == example["cost"] > 0, page
        assert result.task_uuid == example["taskUUID"], page


# -- (a) valid requests: build() accepts, the schema accepts to_wire() ------------------------------

texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=2, max_size=60)
uuids = st.uuids(version=4).map(str)
http_urls = st.builds(
    "https://{}.example.com/{}?token={}".format,
    st.text("abcdefghij", min_size=1, max_size=8),
    st.text("abcxyz/", max_size=10),
    st.text("0123456789abcdef", min_size=1, max_size=16),
)
images = st.one_of(
    uuids,
    http_urls,
    st.binary(min_size=1, max_size=24).map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
    st.binary(min_size=1, max_size=24).map(lambda b: base64.b64encode(b).decode()),
)
model_ids = st.from_regex(r"[a-zA-Z0-9._-]{1,8}(:[a-zA-Z0-9._/@-]{1,8})?", fullmatch=True)
hundredths = st.integers(0, 100).map(lambda k: k / 100)
weights = st.integers(-400, 400).map(lambda k: k / 100)


def _window(draw: Any, start: str, end: str, steps: int | None) -> dict[str, int]:
    """A window of caching or ControlNet steps: absolute or percentage, start before end, within steps."""
    if draw(st.booleans()):
        last = draw(st.integers(1, steps if steps is not None else 50))
        first = draw(st.none() | st.integers(0, last - 1))
        return {end: last} | ({} if first is None else {start: first})
    if draw(st.booleans()):
        last = draw(st.integers(1, 100))
        first = draw(st.none() | st.integers(0, last - 1))
        return {f"{end}Percentage": last} | ({} if first is None else {f"{start}Percentage": first})
    return {}


def optional(**strategies: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=strategies)


SNAKE = {f.alias: n for n, f in ImageInferenceRequest.model_fields.items() if f.alias}


@st.composite
def valid_turbo_requests(draw: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "model": draw(st.sampled_from([TURBO, "turbo", "Z-Image-Turbo"])),
        "positivePrompt": draw(texts),
    }
    task |= draw(
        optional(
            taskUUID=uuids,
            outputFormat=st.sampled_from(["JPG", "PNG", "WEBP"]),
            outputQuality=st.integers(20, 99),
            webhookURL=http_urls,
            deliveryMethod=st.sampled_from(["sync", "async"]),
            uploadEndpoint=http_urls,
            safety=optional(checkContent=st.booleans(), mode=st.sampled_from(["none", "fast"])),
            includeCost=st.booleans(),
            numberResults=st.integers(1, 20),
            negativePrompt=texts,
            seed=st.integers(0, 2**63 - 1),
            steps=st.integers(1, 50),
            scheduler=st.sampled_from(SCHEDULERS),
            CFGScale=st.integers(0, 2000).map(lambda k: k / 100),
            lora=st.lists(
                st.fixed_dictionaries(
                    {"model": model_ids},
                    optional={
                        "weight": weights,
                        "transformer": st.sampled_from(["high", "low", "both"]),
                    },
                ),
                min_size=1,
                max_size=3,
            ),
            ultralytics=optional(
                CFGScale=st.integers(0, 500).map(lambda k: k / 10),
                confidence=hundredths,
                maskBlur=st.integers(0, 100),
                maskPadding=st.integers(0, 20),
                negativePrompt=texts,
                positivePrompt=texts,
                steps=st.integers(1, 100),
                strength=hundredths,
            ),
        )
    )
    output_type = draw(st.sampled_from([None, "URL", "base64Data", "dataURI"]))
    if output_type is not None:
        task["outputType"] = output_type
    if output_type in (None, "URL") and draw(st.booleans()):
        task["ttl"] = draw(st.integers(60, 10**6))
    if draw(st.booleans()):
        task["width"], task["height"] = draw(
            st.tuples(st.integers(8, 128), st.integers(8, 128)).map(lambda s: (s[0] * 16, s[1] * 16))
        )
    steps = task.get("steps")
    if draw(st.booleans()):
        options = draw(
            optional(
                cacheMaxConsecutiveSteps=st.integers(1, 5),
                fbCache=st.booleans(),
                fbCacheThreshold=hundredths,
                teaCache=st.booleans(),
                teaCacheDistance=hundredths,
                dbCache=st.booleans(),
                dbCacheThreshold=hundredths,
                dbCacheSkipInterval=st.integers(1, 100),
            )
        )
        task["acceleratorOptions"] = options | _window(draw, "cacheStartStep", "cacheEndStep", steps)
    if draw(st.booleans()):
        task["controlNet"] = [
            {"model": draw(model_ids), "guideImage": draw(images)}
            | draw(
                optional(
                    weight=weights,
                    controlMode=st.sampled_from(["balanced", "controlnet", "prompt"]),
                )
            )
            | _window(draw, "startStep", "endStep", steps)
            for _ in range(draw(st.integers(1, 3)))
        ]
    mode = draw(st.sampled_from(["text", "image", "inpaint", "outpaint"]))
    if mode != "text":
        task["inputs"] = {"seedImage": draw(images)}
        task |= draw(optional(strength=hundredths))
    if mode == "inpaint":
        task["inputs"]["maskImage"] = draw(images)
        task |= draw(optional(maskMargin=st.integers(32, 128)))
    if mode == "outpaint":
        sides = draw(optional(top=st.integers(0, 512), bottom=st.integers(0, 512), left=st.integers(0, 512)))
        task["outpaint"] = sides | {"right": draw(st.integers(1, 512))}
    if draw(st.booleans()):  # the Python spelling of top-level keys is accepted as well
        task = {SNAKE.get(k, k): v for k, v in task.items()}
    return task


@settings(max_examples=150, deadline=None)
@given(valid_turbo_requests())
def test_valid_requests_are_built_and_their_wire_form_is_schema_valid(task):
    request = ImageInferenceRequest.build(**task)
    wire = request.to_wire()
    errors = [e.message for e in validator().iter_errors([wire])]
    assert not errors, (wire, errors)
    assert wire["model"] == TURBO
    again = ImageInferenceRequest.build(**wire)
    assert again.to_wire() == wire
    assert again.fingerprint() == request.fingerprint()


# -- (b) schema-invalid requests: build() refuses, naming the parameter ------------------------------

BASE: dict[str, Any] = {
    "model": TURBO,
    "positivePrompt": "a lighthouse at dawn",
    "width": 1024,
    "height": 1024,
}
# Where a property of each object is put to test it, with the minimal valid siblings it needs.
CONTAINERS: dict[str, tuple[str, dict[str, Any]]] = {
    "": ("", {}),
    "safety": ("safety", {}),
    "inputs": ("inputs", {}),
    "acceleratorOptions": ("acceleratorOptions", {}),
    "outpaint": ("outpaint", {}),
    "lora": ("lora[0]", {"model": "civitai:1@2"}),
    "controlNet": (
        "controlNet[0]",
        {"model": "cn:1@1", "guideImage": "c64351d5-4c59-42f7-95e1-eace013eddab"},
    ),
    "ultralytics": ("ultralytics", {}),
}
KNOWN_MODEL_NAMES = {n.lower() for spec in CATALOG.values() for n in (spec.air, *spec.aliases)}
wrong_scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _type_of(value: Any) -> set[str]:
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"} | ({"integer"} if value.is_integer() else set())
    if isinstance(value, str):
        return {"string"}
    return {"array"} if isinstance(value, list) else {"object"}


def bad_values(prop: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the schema refuses for `prop`: wrong type, out of range, off the step, off the enum."""
    kind = prop.get("type", "string")
    options = [wrong_scalars.filter(lambda v: kind not in _type_of(v))]
    lo, hi, step = prop.get("minimum"), prop.get("maximum"), prop.get("multipleOf")
    if kind == "integer":
        if lo is not None:
            options.append(st.integers(max_value=lo - 1))
        if hi is not None:
            options.append(st.integers(min_value=hi + 1))
        if step is not None:
            options.append(
                st.integers((lo or 0) // step, (hi or 10**6) // step - 1).flatmap(
                    lambda k: st.integers(k * step + 1, k * step + step - 1)
                )
            )
    if kind == "number":
        if lo is not None:
            options.append(st.floats(max_value=lo, exclude_max=True, allow_nan=False, allow_infinity=False))
        if hi is not None:
            options.append(st.floats(min_value=hi, exclude_min=True, allow_nan=False, allow_infinity=False))
        if step is not None:
            options.append(
                st.integers(round(lo / step), round(hi / step) - 1).map(lambda k: (k + 0.5) * step)
            )
    if kind == "string":
        allowed = (
            {prop["const"]}
            if "const" in prop
            else set(prop.get("enum", [])) | {o["const"] for o in prop.get("oneOf", [])}
        )
        if allowed:
            options.append(
                st.text(max_size=12).filter(
                    lambda s: s not in allowed and s.strip().lower() not in KNOWN_MODEL_NAMES
                )
            )
        if "minLength" in prop:
            options.append(st.text(max_size=prop["minLength"] - 1))
        if "maxLength" in prop:
            options.append(st.integers(prop["maxLength"] + 1, prop["maxLength"] + 200).map(lambda n: "p" * n))
        if "pattern" in prop:
            options.append(
                st.text(min_size=1, max_size=10).filter(lambda s: not re.fullmatch(prop["pattern"], s))
            )
        if "format" in prop or "anyOf" in prop:
            options.append(st.text(alphabet=' !<>^`{|}"', min_size=1, max_size=8).map(lambda s: "no " + s))
    return st.one_of(options)


def targets() -> list[tuple[str, str, dict[str, Any]]]:
    """(object, property, its schema) for every leaf property; property "" stands for the object itself."""
    leaves = [
        (container, name, prop)
        for container, schema in object_schemas().items()
        for name, prop in schema["properties"].items()
        if not (container == "" and name in CONTAINERS)
    ]
    return leaves + [(name, "", item_schema()["properties"].get(name, {})) for name in CONTAINERS]


def place(container: str, key: str, value: Any) -> tuple[dict[str, Any], str]:
    """The base request with `key: value` put in `container`; returns it and the expected parameter."""
    task = dict(BASE)
    if not container:
        task[key] = value
        return task, key
    path, siblings = CONTAINERS[container]
    if not key:  # the object itself is the bad value
        task[container] = value
        return task, container
    obj = siblings | {key: value}
    task[container] = [obj] if path.endswith("[0]") else obj
    return task, f"{path}.{key}"


@st.composite
def invalid_requests(draw: Any) -> tuple[dict[str, Any], str]:
    container, name, prop = draw(st.sampled_from(targets()))
    if name:
        return place(container, name, draw(bad_values(prop)))
    if container and draw(st.booleans()):  # the object has the wrong type, or is an empty list
        is_list = prop["type"] == "array"
        return place(
            container, "", draw(st.sampled_from([[], {}, "x", 3] if is_list else [[], "x", 3, True]))
        )
    model = model_of(container)
    known = wire_names(model) | set(model.model_fields)
    unknown = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in known)
    return place(container, draw(unknown), draw(wrong_scalars))


@settings(max_examples=200, deadline=None)
@given(invalid_requests())
def test_schema_invalid_requests_are_refused_naming_the_parameter(case):
    task, parameter = case
    assert not schema_accepts(task), f"the test made a schema-valid request: {task}"
    with pytest.raises(ZImageValidationError) as info:
        ImageInferenceRequest.build(**task)
    assert info.value.parameters == [parameter], str(info.value)


@pytest.mark.parametrize(("missing", "given"), [("height", "width"), ("width", "height")])
def test_dependent_required_size(missing, given):
    task = {k: v for k, v in BASE.items() if k != missing}
    assert not schema_accepts(task)
    with pytest.raises(ZImageValidationError) as info:
        ImageInferenceRequest.build(**task)
    assert info.value.parameters == [missing]


@pytest.mark.parametrize("missing", ["model", "positivePrompt"])
def test_required_parameters(missing):
    task = {k: v for k, v in BASE.items() if k != missing}
    assert not schema_accepts(task)
    with pytest.raises(ZImageValidationError) as info:
        ImageInferenceRequest.build(**task)
    assert info.value.parameters == [missing]
