"""Request validation against the published Runware schema, not a hand-written copy of it.

The seed OpenAPI document (003) is the only machine-readable contract we have, so the server validates
with it directly: a client that passes here passes the schema Runware publishes. The document is written
for Z-Image-Turbo only; the other two models differ in the ways their model pages (001, 004) state, and
`model_schemas` applies exactly those differences.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError

Z_IMAGE = "runware:z-image@0"
Z_IMAGE_TURBO = "runware:z-image@turbo"
TWINFLOW = "runware:twinflow-z-image-turbo@0"
MODELS: tuple[str, ...] = (Z_IMAGE, Z_IMAGE_TURBO, TWINFLOW)

# TwinFlow's page (seed 004) lists no image inputs, masks, outpainting, ControlNet or face refinement,
# allows CFGScale up to 50 and adds the `acceleration` level.
_TWINFLOW_ABSENT = ("inputs", "strength", "maskMargin", "outpaint", "controlNet", "ultralytics")
ACCELERATION_LEVELS = ("none", "low", "medium", "high")

# Error codes for a 400 on a task: what kind of mistake, the `parameter` field says where.
MISSING_PARAMETER = "missingParameter"
UNSUPPORTED_PARAMETER = "unsupportedParameter"
INVALID_PARAMETER = "invalidParameter"


SHARED_SEEDS = Path(__file__).resolve().parents[4] / "shared" / "seeds"
SEED_COPY = Path(__file__).resolve().parent / "seed_copy"


def seeds_dir() -> Path:
    """ZIMAGE_SEEDS_DIR, else the shared seeds beside the checkout (the spec), else the vendored copy of
    the OpenAPI seed, so a clone without shared/ still validates requests."""
    env = os.environ.get("ZIMAGE_SEEDS_DIR")
    if env:
        return Path(env)
    if any(SHARED_SEEDS.glob("003_*.txt")):
        return SHARED_SEEDS
    return SEED_COPY


@lru_cache(maxsize=4)
def load_openapi(directory: str | None = None) -> dict[str, Any]:
    base = Path(directory) if directory else seeds_dir()
    matches = sorted(base.glob("003_*.txt"))
    if not matches:
        raise FileNotFoundError(f"no 003_*.txt OpenAPI seed in {base}")
    schema: dict[str, Any] = json.loads(matches[0].read_text(encoding="utf-8"))
    return schema


def task_item_schema(directory: str | None = None) -> dict[str, Any]:
    """The schema of one imageInference task, as published (model pinned to Z-Image-Turbo)."""
    return copy.deepcopy(load_openapi(directory)["components"]["schemas"]["RequestBody"]["items"])


@lru_cache(maxsize=4)
def _validators(directory: str | None) -> dict[str | None, Draft202012Validator]:
    base = task_item_schema(directory)
    schemas: dict[str | None, dict[str, Any]] = {}
    for model in MODELS:
        schema = copy.deepcopy(base)
        props = schema["properties"]
        props["model"] = {**props["model"], "const": model}
        if model == TWINFLOW:
            for name in _TWINFLOW_ABSENT:
                props.pop(name, None)
            props["CFGScale"] = {**props["CFGScale"], "maximum": 50}
            props["acceleration"] = {
                "title": "Acceleration",
                "type": "string",
                "enum": list(ACCELERATION_LEVELS),
                "default": "medium",
            }
        if model == Z_IMAGE:  # page 000 lists ultralytics.inpaintSize for Z-Image only
            ultralytics = props["ultralytics"]
            ultralytics["properties"] = {
                **ultralytics["properties"],
                "inpaintSize": {"type": "integer", "minimum": 128, "maximum": 2048, "default": 1024},
            }
        schemas[model] = schema
    # Used when `model` is missing or unknown: reports the model error, plus anything else wrong.
    generic = copy.deepcopy(base)
    generic["properties"]["model"] = {**generic["properties"]["model"], "enum": list(MODELS)}
    generic["properties"]["model"].pop("const", None)
    schemas[None] = generic
    checker = FormatChecker()
    out: dict[str | None, Draft202012Validator] = {}
    for key, schema in schemas.items():
        Draft202012Validator.check_schema(schema)
        out[key] = Draft202012Validator(schema, format_checker=checker)
    return out


def _wire_path(parts: Iterable[Any]) -> str:
    """`lora[0].weight`: the wire name a client can find in its own request."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _describe(error: ValidationError) -> list[tuple[str, str, str]]:
    """(parameter, code, message) for one jsonschema error; one error can name several parameters."""
    path = list(error.absolute_path)
    instance = error.instance
    if error.validator in ("required", "dependentRequired") and isinstance(instance, Mapping):
        if error.validator == "required":
            wanted = list(error.validator_value)
            missing = [name for name in wanted if name not in instance]
        else:
            missing = []
            for trigger, needed in error.validator_value.items():
                if trigger in instance:
                    missing += [f"{n}" for n in needed if n not in instance]
        out = []
        for name in missing:
            param = _wire_path([*path, name])
            hint = ""
            if error.validator == "dependentRequired":
                hint = " (width and height must be used together)"
            out.append((param, MISSING_PARAMETER, f"Missing required parameter '{param}'{hint}."))
        return out
    if error.validator == "additionalProperties" and isinstance(instance, Mapping):
        allowed = set(error.schema.get("properties", {}))
        extras = [name for name in instance if name not in allowed]
        return [
            (
                _wire_path([*path, name]),
                UNSUPPORTED_PARAMETER,
                f"Parameter '{_wire_path([*path, name])}' is not supported by this model.",
            )
            for name in extras
        ]
    param = _wire_path(path) or "<task>"
    value = json.dumps(instance)[:200]
    rule = error.validator
    rule_value = error.validator_value
    if rule in ("minimum", "maximum", "multipleOf", "minLength", "maxLength", "minItems", "enum", "const"):
        detail = f"{rule} {json.dumps(rule_value)[:300]}"
    elif rule in ("oneOf", "anyOf"):
        consts = [s.get("const") for s in rule_value if isinstance(s, Mapping) and "const" in s]
        detail = f"one of {json.dumps(consts)}" if consts else f"{rule} alternatives"
    else:
        detail = error.message[:300]
    return [(param, INVALID_PARAMETER, f"Invalid value {value} for parameter '{param}': {detail}.")]


_UUID_V4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.I)


def validate_inference_task(
    task: Mapping[str, Any], *, directory: str | None = None, strict_uuid_v4: bool = False
) -> list[dict[str, Any]]:
    """Runware-shaped error items, one per offending wire parameter; empty when the task is valid."""
    validators = _validators(directory)
    model = task.get("model")
    validator = validators.get(model if isinstance(model, str) else None) or validators[None]
    task_uuid = task.get("taskUUID") if isinstance(task.get("taskUUID"), str) else None
    found: dict[str, dict[str, Any]] = {}
    errors = sorted(validator.iter_errors(dict(task)), key=lambda e: [str(p) for p in e.absolute_path])
    for error in errors:
        for param, code, message in _describe(error):
            found.setdefault(
                param,
                {
                    "code": code,
                    "message": message,
                    "parameter": param,
                    "taskType": "imageInference",
                    "taskUUID": task_uuid,
                },
            )
    if strict_uuid_v4 and task_uuid and "taskUUID" not in found and not _UUID_V4.match(task_uuid):
        found["taskUUID"] = {
            "code": INVALID_PARAMETER,
            "message": f"Invalid value {json.dumps(task_uuid)} for parameter 'taskUUID': must be a UUID v4.",
            "parameter": "taskUUID",
            "taskType": "imageInference",
            "taskUUID": task_uuid,
        }
    return list(found.values())
