"""The official Runware Python SDK (runware-sdk, REST transport) works unchanged against both servers.

Users who already call Runware with its own client should be able to point it at a `zimage-executor`
by changing the base URL and nothing else. The SDK is a stricter, simpler client than the provider: it
treats `conflictTaskUUID` as an error and ignores `Retry-After`, so these tests also show that neither
server needs a client that does better. Each case runs against the Runware test server (the seeds'
contract) and a real executor on the tiny model.
"""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("diffusers")
runware_sdk = pytest.importorskip("runware")

from PIL import Image  # noqa: E402

from airflow_provider_zimage.executor.process import ExecutorProcess  # noqa: E402
from airflow_provider_zimage.runware.support import find  # noqa: E402
from airflow_provider_zimage.testing.runware_server import RunwareTestServer  # noqa: E402

pytestmark = pytest.mark.local

TURBO = "runware:z-image@turbo"
REFUSED_EXAMPLE = ("ultralytics", {"ultralytics": {"confidence": 0.5}})


@pytest.fixture(scope="module")
def executor_process(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExecutorProcess]:
    process = ExecutorProcess(
        {TURBO: str(tiny_model)},
        tmp_path_factory.mktemp("sdk"),
        *("--devices", "cpu", "--fetch-grace", "0"),
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    ).start()
    yield process
    assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture(params=["runware", "executor"])
def endpoint(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """(which server, base URL, API key)."""
    if request.param == "runware":
        server: RunwareTestServer = request.getfixturevalue("zimage_server")
        return "runware", server.url, str(server.api_key)
    process: ExecutorProcess = request.getfixturevalue("executor_process")
    assert process.url is not None
    return "executor", process.url, process.token


def task(**overrides: Any) -> dict[str, Any]:
    """Parameters for `Runware.run`: taskType given, so the SDK asks its model registry nothing."""
    params: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": TURBO,
        "positivePrompt": "a lighthouse on a cliff at dusk",
        "width": 128,
        "height": 128,
        "steps": 1,
        "seed": 7,
        "outputFormat": "PNG",
    }
    params.update(overrides)
    return params


async def run(endpoint: tuple[str, str, str], params: dict[str, Any], **config: Any) -> list[dict[str, Any]]:
    _, url, key = endpoint
    client = runware_sdk.Runware(
        api_key=config.pop("api_key", key), transport="rest", http_base_url=url, **config
    )
    try:
        results: list[dict[str, Any]] = await client.run(params)
    finally:
        await client.close()
    return results


async def picture(item: dict[str, Any]) -> Image.Image:
    if "imageBase64Data" in item:
        data = base64.b64decode(item["imageBase64Data"])
    elif "imageDataURI" in item:
        header, _, encoded = item["imageDataURI"].partition(",")
        assert header == "data:image/png;base64", header
        data = base64.b64decode(encoded)
    else:
        async with httpx.AsyncClient() as client:
            answer = await client.get(item["imageURL"], timeout=30)
            answer.raise_for_status()
            data = answer.content
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("delivery", ["sync", "async"])
async def test_the_sdk_generates_an_image(endpoint: tuple[str, str, str], delivery: str) -> None:
    params = task(deliveryMethod=delivery, width=192)
    [item] = await run(endpoint, params)
    assert item["taskUUID"] == params["taskUUID"] and item["imageUUID"]
    image = await picture(item)
    assert (image.size, image.format) == ((192, 128), "PNG")


async def test_the_sdk_gets_every_result_of_a_task(endpoint: tuple[str, str, str]) -> None:
    items = await run(endpoint, task(numberResults=2, deliveryMethod="async"))
    assert len({i["imageUUID"] for i in items}) == 2, items
    assert {i["taskUUID"] for i in items} == {items[0]["taskUUID"]}


@pytest.mark.parametrize("output_type", ["URL", "base64Data", "dataURI"])
async def test_the_sdk_reads_each_output_type(endpoint: tuple[str, str, str], output_type: str) -> None:
    [item] = await run(endpoint, task(outputType=output_type, deliveryMethod="sync"))
    key = {"URL": "imageURL", "base64Data": "imageBase64Data", "dataURI": "imageDataURI"}[output_type]
    assert key in item, sorted(item)
    assert (await picture(item)).size == (128, 128)


async def test_the_sdk_reports_an_invalid_width_by_name(endpoint: tuple[str, str, str]) -> None:
    with pytest.raises(runware_sdk.RunwareError) as raised:
        await run(endpoint, task(width=4096), max_retries=0)
    # The SDK files the wire code (invalidParameter) under its own category.
    error = raised.value
    assert (error.code, error.parameter, error.status_code, error.retryable) == (
        "validation",
        "width",
        400,
        False,
    )


async def test_the_sdk_reports_a_wrong_key(endpoint: tuple[str, str, str]) -> None:
    with pytest.raises(runware_sdk.RunwareError) as raised:
        await run(endpoint, task(), api_key="not-the-key", max_retries=0)
    assert (raised.value.code, raised.value.status_code, raised.value.retryable) == ("auth", 401, False)
    assert "not-the-key" not in str(raised.value), "the key is not echoed back"


async def test_the_sdk_reports_a_parameter_the_backend_refuses(endpoint: tuple[str, str, str]) -> None:
    # What the support table says: Runware serves it; the executor refuses it by name, or serves it
    # once the table says so.
    parameter, fragment = REFUSED_EXAMPLE
    which = endpoint[0]
    if which == "runware" or find(parameter).executor.status != "refused":
        [item] = await run(endpoint, task(**fragment))
        assert item["imageUUID"]
        return
    with pytest.raises(runware_sdk.RunwareError) as raised:
        await run(endpoint, task(**fragment), max_retries=0)
    assert (raised.value.code, raised.value.parameter, raised.value.status_code) == (
        "validation",
        parameter,
        400,
    )
    assert find(parameter).executor.text in str(raised.value)
