"""The real engine itself, through its router, with a bare httpx client: what the openai_images backend
stands on (one image per request, the seed reproduces the bytes, a dead worker leaves the survivor).

These tests pin the engine's behaviour the provider relies on, so an SGLang upgrade that changes it
fails here, by name, before it surfaces as a confusing DAG failure.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from airflow_provider_zimage.testing.sglang_cluster import MODEL_ID, NginxRouter, SGLangCluster, SGLangRouter

pytestmark = pytest.mark.sglang


def generation(seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "prompt": "a red bicycle",
        "n": 1,
        "size": "64x64",
        "seed": seed,
        "num_inference_steps": 2,
        "response_format": "b64_json",
        **extra,
    }


def image_bytes(url: str, payload: dict[str, Any], *, attempts: int = 1) -> bytes:
    """One image; with `attempts` > 1, a 5xx or a dropped connection is retried as the provider does."""
    for attempt in range(attempts):
        try:
            response = httpx.post(f"{url}/v1/images/generations", json=payload, timeout=180)
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
            time.sleep(1)
            continue
        if response.status_code >= 500 and attempt < attempts - 1:
            time.sleep(1)
            continue
        response.raise_for_status()
        return base64.b64decode(response.json()["data"][0]["b64_json"])
    raise AssertionError("unreachable")


def test_both_workers_and_the_router_answer_health(sglang: SGLangCluster) -> None:
    assert sglang.router is not None
    for part in [*sglang.workers, sglang.router]:
        assert httpx.get(f"{part.url}/health", timeout=5).status_code == 200, part.name


def test_the_router_serves_a_png_of_the_asked_size(sglang: SGLangCluster) -> None:
    data = image_bytes(sglang.url, generation(1, output_format="png"))
    image = Image.open(io.BytesIO(data))
    assert (image.format, image.size) == ("PNG", (64, 64))


def test_the_same_seed_gives_the_same_bytes_on_the_same_worker(sglang: SGLangCluster) -> None:
    worker = sglang.workers[0].url
    first = image_bytes(worker, generation(7, output_format="png"))
    again = image_bytes(worker, generation(7, output_format="png"))
    other = image_bytes(worker, generation(8, output_format="png"))
    assert first == again
    assert other != first


def test_the_same_seed_gives_the_same_bytes_on_either_worker(sglang: SGLangCluster) -> None:
    # Same checkpoint, same CPU: which worker the router picks must not change the picture.
    payload = generation(11, output_format="png")
    assert image_bytes(sglang.workers[0].url, payload) == image_bytes(sglang.workers[1].url, payload)


def test_n_2_is_not_a_way_to_get_two_images(sglang: SGLangCluster) -> None:
    # Why the provider sends one request per image (seed, seed+1, ...): n=2 fails on the native path.
    response = httpx.post(f"{sglang.url}/v1/images/generations", json=generation(3, n=2), timeout=180)
    assert response.status_code != 200 or len(response.json()["data"]) != 2


def test_the_engine_accepts_what_it_cannot_honour_silently(sglang: SGLangCluster) -> None:
    # Why the provider validates everything itself before sending: an unknown model name, an unknown
    # field and an empty prompt all come back 200 from the engine.
    for odd in ({"model": "no-such-model"}, {"scheduler": "DPM++ 2M"}, {"prompt": ""}):
        response = httpx.post(f"{sglang.url}/v1/images/generations", json=generation(5, **odd), timeout=180)
        assert response.status_code == 200, (odd, response.text[:300])


def test_the_router_spreads_requests_over_both_workers(sglang: SGLangCluster) -> None:
    assert isinstance(sglang.router, NginxRouter)
    before = len(sglang.router.requests())
    for seed in range(4):
        image_bytes(sglang.url, generation(seed))
    served = {entry["upstream"] for entry in sglang.router.requests()[before:]}
    assert served == {w.url.removeprefix("http://") for w in sglang.workers}


def test_sglang_router_does_not_route_the_images_endpoint(sglang: SGLangCluster, tmp_path: Path) -> None:
    # Why the cluster's router is nginx: SGLang's own router (0.3.2, and smg 1.13.0) routes the LLM
    # endpoints only. The day this fails, a release routes images: make it the cluster's router.
    router = SGLangRouter(sglang.venv, [w.url for w in sglang.workers], tmp_path).start()
    try:
        router.wait_workers(2)
        response = httpx.post(f"{router.url}/v1/images/generations", json=generation(1), timeout=180)
    finally:
        router.stop(10)
    assert response.status_code == 404, response.text[:300]
