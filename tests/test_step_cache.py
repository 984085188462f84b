"""Step caching (`acceleratorOptions`) with cache-dit, on the tiny model, in-process and on the executor.

The tiny model's random transformer changes a lot between steps (relative residual differences of
0.4-0.8), so only the most aggressive setting, threshold 0 ("reuse every step the window and
cacheMaxConsecutiveSteps allow"), reuses steps on it; a cautious one (0.9) reuses none. That is the
direction test: Runware's lower threshold reuses more, locally too.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("cache_dit")

from airflow_provider_zimage import local  # noqa: E402
from airflow_provider_zimage.exceptions import ZImageValidationError  # noqa: E402
from airflow_provider_zimage.executor.process import ExecutorProcess  # noqa: E402
from airflow_provider_zimage.local import LocalZImageExecutor, batch_key  # noqa: E402
from airflow_provider_zimage.local.caching import cache_dit_threshold  # noqa: E402
from airflow_provider_zimage.runware.models import ImageInferenceRequest  # noqa: E402

pytestmark = pytest.mark.local

TURBO = "runware:z-image@turbo"
CACHE_LOG = "airflow_provider_zimage.local.caching"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs the tiny model (conftest's one_torch_thread)."""


@pytest.fixture
def executor(tiny_model: Path) -> LocalZImageExecutor:
    return LocalZImageExecutor(tiny_model, local_files_only=True, device="cpu")


def make_request(**overrides: Any) -> ImageInferenceRequest:
    params: dict[str, Any] = {
        "model": TURBO,
        "positivePrompt": "a lighthouse on a cliff at dusk",
        "width": 128,
        "height": 128,
        "steps": 8,
        "seed": 99,
        "outputFormat": "PNG",
    }
    params.update(overrides)
    return ImageInferenceRequest.build(**params)


class CacheLines(logging.Handler):
    """The step-cache log lines, read from a handler on that logger itself: Airflow's logging setup
    (a dictConfig the first DAG-side import runs) replaces the root handlers mid-session."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def reused(self) -> list[int]:
        [line] = self.lines
        self.lines.clear()
        found = re.search(r"reused steps \[([0-9, ]*)\] of 8", line)
        assert found, line
        return [int(s) for s in found.group(1).split(",") if s.strip()]


@pytest.fixture
def cache_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[CacheLines]:
    logger = logging.getLogger(CACHE_LOG)
    handler = CacheLines()
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_fb_cache_reuses_steps_inside_its_window_at_most_three_in_a_row(
    executor: LocalZImageExecutor, cache_log: CacheLines
) -> None:
    [plain] = executor.generate(make_request())
    options = {"fbCache": True, "fbCacheThreshold": 0, "cacheStartStep": 2, "cacheMaxConsecutiveSteps": 3}
    [cached] = executor.generate(make_request(acceleratorOptions=options))
    assert cache_log.reused() == [2, 3, 4, 6, 7]
    assert cached.data != plain.data, "reused steps change the picture a little"
    executor.generate(make_request(acceleratorOptions={**options, "cacheEndStep": 5}))
    assert cache_log.reused() == [2, 3, 4]
    del options["cacheStartStep"]
    executor.generate(make_request(acceleratorOptions={**options, "cacheStartStepPercentage": 50}))
    assert cache_log.reused() == [4, 5, 6]


@pytest.mark.parametrize("method", ["fbCache", "dbCache"])
def test_a_lower_threshold_reuses_more_steps_as_on_runware(
    executor: LocalZImageExecutor, cache_log: CacheLines, method: str
) -> None:
    executor.generate(make_request(acceleratorOptions={method: True, f"{method}Threshold": 0.0}))
    aggressive = cache_log.reused()
    executor.generate(make_request(acceleratorOptions={method: True, f"{method}Threshold": 0.9}))
    cautious = cache_log.reused()
    assert len(aggressive) > len(cautious)
    assert cache_dit_threshold(0.1) > cache_dit_threshold(0.25) > cache_dit_threshold(0.5)
    assert cache_dit_threshold(0.25) == pytest.approx(0.25), "Runware's default is cache-dit's 0.25"


def test_a_request_without_caching_after_a_cached_one_gets_the_uncached_bytes(
    executor: LocalZImageExecutor,
) -> None:
    [before] = executor.generate(make_request())
    executor.generate(make_request(acceleratorOptions={"fbCache": True, "fbCacheThreshold": 0}))
    [after] = executor.generate(make_request())
    [disabled] = executor.generate(make_request(acceleratorOptions={"fbCache": False, "cacheStartStep": 1}))
    assert before.data == after.data == disabled.data


@pytest.mark.parametrize(
    ("parameter", "options"),
    [
        ("acceleratorOptions.teaCache", {"teaCache": True}),
        ("acceleratorOptions.dbCacheSkipInterval", {"dbCache": True, "dbCacheSkipInterval": 2}),
        ("acceleratorOptions.dbCache", {"fbCache": True, "dbCache": True}),
    ],
)
def test_what_cache_dit_cannot_do_is_refused_naming_the_parameter(
    tmp_path: Path, parameter: str, options: dict[str, Any]
) -> None:
    loads = local.load_count()
    unloadable = LocalZImageExecutor(tmp_path / "no-model", local_files_only=True)
    with pytest.raises(ZImageValidationError) as caught:
        unloadable.generate(make_request(acceleratorOptions=options))
    assert caught.value.parameters == [parameter]
    assert local.load_count() == loads


def test_without_the_accel_extra_caching_is_refused_naming_the_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # as if `[accel]` were not installed
    unloadable = LocalZImageExecutor(tmp_path / "no-model", local_files_only=True)
    with pytest.raises(ZImageValidationError) as caught:
        unloadable.generate(make_request(acceleratorOptions={"dbCache": True}))
    assert caught.value.parameters == ["acceleratorOptions.dbCache"]
    assert "[accel]" in str(caught.value)
    [plan_ok] = [unloadable.plan(make_request(acceleratorOptions={"dbCache": False}))]
    assert plan_ok.step_cache is None, "a cache that is off needs no extra"


def test_cached_and_uncached_images_never_share_a_pipeline_call(executor: LocalZImageExecutor) -> None:
    plain = executor.plan(make_request())
    cached = executor.plan(make_request(acceleratorOptions={"fbCache": True}))
    other = executor.plan(make_request(acceleratorOptions={"fbCache": True, "fbCacheThreshold": 0.5}))
    keys = [batch_key(plain), batch_key(cached), batch_key(other)]
    assert keys[0] != keys[1] and keys[1] != keys[2] and keys[0] != keys[2]
    assert batch_key(executor.plan(make_request(acceleratorOptions={"fbCache": False}))) == batch_key(plain)


def test_the_executor_serves_step_caching(tiny_model: Path, tmp_path: Path) -> None:
    process = ExecutorProcess(
        {TURBO: str(tiny_model)},
        tmp_path,
        "--devices",
        "cpu",
        "--fetch-grace",
        "0",
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    ).start()
    try:

        def post(**overrides: Any) -> httpx.Response:
            wire = {
                **make_request(**overrides).to_wire(),
                "deliveryMethod": "sync",
                "outputType": "base64Data",
            }
            headers = {"Authorization": f"Bearer {process.token}"}
            return httpx.post(str(process.url), json=[wire], headers=headers, timeout=120)

        plain = post()
        cached = post(acceleratorOptions={"fbCache": True, "fbCacheThreshold": 0})
        again = post()
        refused = post(acceleratorOptions={"teaCache": True})
        assert plain.status_code == cached.status_code == again.status_code == 200, cached.text
        image = [r.json()["data"][0]["imageBase64Data"] for r in (plain, cached, again)]
        assert image[0] != image[1] and image[0] == image[2]
        assert refused.status_code == 400
        assert [e["parameter"] for e in refused.json()["errors"]] == ["acceleratorOptions.teaCache"]
    finally:
        assert process.stop() == 0, process.log()[-3000:]
