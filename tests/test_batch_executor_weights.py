"""A batch on a zimage-executor: the weights its `/health` reports are part of what "same picture" means,
as for ZImageGenerateOperator. Swapped weights behind the same model or ControlNet id are another picture:
neither a retry (reuse="task") nor another run (reuse="content") gets the old images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.testing.pytest_plugin import connection_json
from tests.dagtest import FakeTI
from tests.test_batch import batch, rows, run_try


class FakeHealth:
    """The executor's `/health` answer (the test server has none), with a count of the times it was asked."""

    def __init__(self) -> None:
        self.model_weights = "/models/turbo@aaaa"
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {"models": [{"model": "runware:z-image@turbo", "weights": self.model_weights}]}


@pytest.fixture
def executor(zimage_conn: Any, monkeypatch: pytest.MonkeyPatch) -> FakeHealth:
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", connection_json(zimage_conn, backend="executor"))
    health = FakeHealth()
    monkeypatch.setattr(ZImageHook, "executor_health", lambda hook: health())
    return health


def test_a_batch_on_an_executor_asks_its_health_once_and_reuses_unchanged_weights(
    executor, zimage_conn, output_dir
):
    first = run_try(batch(output_dir, rows(5), reuse="content"), FakeTI("day1", dag_id="shop"))
    assert first["images"] == 5 and zimage_conn.stats["total_accepted"] == 5
    assert executor.calls == 1, "one /health per batch, not one per row"

    again = run_try(batch(output_dir, rows(5), reuse="content"), FakeTI("day2", dag_id="shop"))
    assert again["reused"] == 5 and zimage_conn.stats["total_accepted"] == 5


def test_content_reuse_on_an_executor_after_a_weights_swap_generates_again(executor, zimage_conn, output_dir):
    run_try(batch(output_dir, rows(3), reuse="content"), FakeTI("day1", dag_id="shop"))
    assert zimage_conn.stats["total_accepted"] == 3

    executor.model_weights = "/models/turbo@bbbb"  # retrained weights behind the same AIR id
    day2 = run_try(batch(output_dir, rows(3), reuse="content"), FakeTI("day2", dag_id="shop"))
    assert day2["reused"] == 0
    assert zimage_conn.stats["total_accepted"] == 6, "the new weights make new pictures"


def test_a_retry_on_an_executor_after_a_weights_swap_generates_again(executor, zimage_conn, output_dir):
    ti = FakeTI("day1", dag_id="shop")
    run_try(batch(output_dir, rows(3)), ti)
    assert zimage_conn.stats["total_accepted"] == 3

    executor.model_weights = "/models/turbo@bbbb"
    retry = run_try(batch(output_dir, rows(3)), ti)
    assert retry["reused"] == 0 and retry["images"] == 3
    assert zimage_conn.stats["total_accepted"] == 6


def test_a_batch_for_a_model_the_executor_does_not_serve_fails_before_any_post(
    executor, zimage_conn, output_dir
):
    from airflow_provider_zimage.compat import AirflowFailException

    executor.model_weights = "/models/turbo@aaaa"
    op = batch(output_dir, [*rows(1), {"prompt": "slow", "seed": 1, "model": "runware:z-image@0"}])
    unserved = r"requests\[1\]\.model: .*does not serve runware:z-image@0"
    with pytest.raises(AirflowFailException, match=unserved):
        op.execute({"ti": FakeTI()})
    assert zimage_conn.stats["total_accepted"] == 0


@pytest.mark.local
def test_a_batch_on_a_real_executor_regenerates_after_its_weights_are_retrained(
    tiny_model: Path, tmp_path: Path, output_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real zimage-executor process: restarted on the same folder with retrained weights (same file
    names and sizes, other numbers), its /health reports another weights id and the batch generates."""
    pytest.importorskip("diffusers")
    from airflow_provider_zimage.executor.process import ExecutorProcess
    from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

    weights = tmp_path / "turbo"
    shutil.copytree(tiny_model, weights)
    row = [{"prompt": "a lighthouse at dusk", "seed": 1, "steps": 2}]

    def run(run_id: str) -> dict[str, Any]:
        process = ExecutorProcess(
            {"runware:z-image@turbo": str(weights)}, tmp_path / run_id, "--devices", "cpu"
        )
        process.start()
        try:
            monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(process.connection()))
            op = batch(output_dir, row, reuse="content", width=128, height=128)
            return run_try(op, FakeTI(run_id, dag_id="shop"))
        finally:
            assert process.stop() == 0, process.log()[-3000:]

    assert run("day1")["reused"] == 0
    assert run("day2")["reused"] == 1, "the same weights: reused"
    shutil.rmtree(weights)
    build_tiny_zimage(weights, seed=1)
    assert run("day3")["reused"] == 0, "retrained weights behind the same id make another picture"
