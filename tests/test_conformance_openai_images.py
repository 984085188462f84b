"""The conformance matrix on backend `openai_images`: every row of the support table, as the table says.

The same request fragments the executor gets in tests/test_conformance.py (tests/conformance_rows.py)
go through this backend's wire and hook to the loopback OpenAI images server. A row the table marks
refused for `openai_images` must be refused before the first call, naming the row's parameter (or its
refused group) with the table's words, and the server must have seen nothing; any other row must come
back as images of the requested size and format, one call per image. So the table, the parity page
built from it and what this backend does cannot drift apart. No executor, no model: seconds.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.hooks.openai_images import OpenAIImagesHook
from airflow_provider_zimage.openai_images import wire
from airflow_provider_zimage.runware.catalog import CATALOG
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.runware.support import ROWS, find, refused_parameters
from airflow_provider_zimage.testing.openai_images_server import OpenAIImagesTestServer
from tests.conformance_rows import TURBO, inference, row_examples

API_KEY = "sk-conformance-5c2e"
# Every catalog model is served, so a refusal below is about the row's parameter, never the model.
SERVED = {air: f"served-{index}" for index, air in enumerate(CATALOG)}
SINK = "http://127.0.0.1:9"  # never contacted: webhookURL and uploadEndpoint are refused here
# The shared example asks for a value this backend refuses by a note row's value check (the sampler
# is fixed when the server starts); the served example is the one value it runs. The refused value
# is checked in test_a_note_rows_value_check_refuses_naming_its_parameter below.
SERVED_EXAMPLES: dict[str, dict[str, Any]] = {"scheduler": {"scheduler": "Default"}}
FORMATS = {"JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}


@pytest.fixture(scope="module")
def engine() -> Iterator[OpenAIImagesTestServer]:
    with OpenAIImagesTestServer(api_key=API_KEY) as server, pytest.MonkeyPatch.context() as patch:
        connection = {
            "conn_type": "zimage",
            "host": server.url,
            "password": API_KEY,
            "extra": {"backend": "openai_images", "served_model": json.dumps(SERVED), "max_retries": 0},
        }
        patch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(connection))
        yield server


def request_for(fragment: dict[str, Any]) -> ImageInferenceRequest:
    task = inference(**{"deliveryMethod": "sync", "steps": 1, **fragment})
    return ImageInferenceRequest.build(**task)


def images(request: ImageInferenceRequest, served: dict[str, str] = SERVED) -> list[Image.Image]:
    """What the backend stores for `request`: planned (refused as a whole first), called, encoded."""
    calls = wire.plan_calls(request, served, request.seed or 0)
    spec = CATALOG[request.model]
    width, height = request.width or spec.default_width, request.height or spec.default_height
    out = []
    with OpenAIImagesHook() as hook:
        for call in calls:
            data = wire.encode_result(hook.generate(call), request, width=width, height=height)
            image = Image.open(io.BytesIO(data))
            image.load()
            out.append(image)
    return out


def refused_as(parameter: str) -> str:
    """The parameter a refusal names: the row itself, or the refused group it belongs to."""
    return next(
        group
        for group in refused_parameters("openai_images")
        if parameter == group or parameter.startswith((f"{group}.", f"{group}[]."))
    )


def named(error: ZImageValidationError) -> set[str]:
    return {re.sub(r"\[\d+\]", "[]", str(e["parameter"])) for e in error.errors}


@pytest.mark.parametrize("parameter", [row.parameter for row in ROWS])
def test_the_openai_images_backend_serves_or_refuses_each_parameter_as_the_table_says(
    parameter: str, engine: OpenAIImagesTestServer
) -> None:
    fragment = SERVED_EXAMPLES.get(parameter) or row_examples(SINK, "/loras/none.safetensors")[parameter]
    request = request_for(fragment)
    support = find(parameter).openai_images
    calls_before = len(engine.generations)
    if support.status == "refused":
        expected = refused_as(parameter)
        with pytest.raises(ZImageValidationError) as refused:
            images(request)
        assert expected in named(refused.value), f"{parameter}: refused as {named(refused.value)}"
        words = f"{expected}: not supported by backend openai_images: {find(expected).openai_images.text}"
        assert words in str(refused.value), "refused with the table's words"
        assert len(engine.generations) == calls_before, "a refused request sent nothing"
        return
    made = images(request)
    count = request.number_results or 1
    assert len(made) == count and len(engine.generations) == calls_before + count, "one call per image"
    wanted = FORMATS[request.output_format or wire.DEFAULT_FORMAT]
    size = (request.width or 1024, request.height or 1024)
    assert [(image.size, image.format) for image in made] == [(size, wanted)] * count


@pytest.mark.parametrize(
    ("parameter", "fragment", "served"),
    [
        ("scheduler", {"scheduler": "Euler"}, SERVED),
        ("width", {"width": 200, "height": 128}, SERVED),
        ("height", {"width": 128, "height": 200}, SERVED),
        ("model", {"model": TURBO}, {"runware:z-image@0": "Z-Image"}),
    ],
)
def test_a_note_rows_value_check_refuses_naming_its_parameter(
    parameter: str, fragment: dict[str, Any], served: dict[str, str], engine: OpenAIImagesTestServer
) -> None:
    # Checks no row can express stay in wire.py; their rows are notes that must say so.
    assert find(parameter).openai_images.status == "note"
    assert (
        "refused" in find(parameter).openai_images.text
        or "multiple of 16" in find(parameter).openai_images.text
    )
    calls_before = len(engine.generations)
    with pytest.raises(ZImageValidationError) as refused:
        images(request_for(fragment), served)
    assert named(refused.value) == {parameter}
    assert len(engine.generations) == calls_before


@pytest.mark.parametrize(
    "fragment",
    [
        {"acceleration": "none", "model": "runware:twinflow-z-image-turbo@0"},
        {"safety": {"checkContent": False, "mode": "none"}},
    ],
    ids=["acceleration-none", "safety-off"],
)
def test_a_refused_parameter_set_to_ask_for_nothing_is_served(
    fragment: dict[str, Any], engine: OpenAIImagesTestServer
) -> None:
    assert len(images(request_for(fragment))) == 1
