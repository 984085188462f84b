"""on_nsfw='skip' says who flagged the images it drops: Runware, or the executor's (or this worker's)
safety checker. A log that blames Runware for an executor's verdict sends people to the wrong place."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.testing.pytest_plugin import connection_json
from tests.dagtest import FakeTI
from tests.test_batch import batch, run_try

SERVED = {"models": [{"model": "runware:z-image@turbo", "weights": "/models/turbo@aaaa"}]}
CHECKERS = [("runware", "by Runware"), ("executor", "by the zimage-executor")]


@pytest.fixture
def connection(zimage_conn: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", connection_json(zimage_conn, backend=backend))
    monkeypatch.setattr(ZImageHook, "executor_health", lambda self: SERVED)  # the test server has none
    return backend


def skip_line(caplog: pytest.LogCaptureFixture) -> str:
    (line,) = [r.getMessage() for r in caplog.records if "flagged NSFW" in r.getMessage()]
    return line


@pytest.mark.parametrize(("connection", "checker"), CHECKERS, indirect=["connection"])
def test_the_skip_log_of_one_task_names_the_backend_that_flagged_the_image(
    connection, checker, output_dir, caplog
):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    op = ZImageGenerateOperator(
        task_id="generate",
        prompt="a beach __nsfw__",
        width=256,
        height=256,
        seed=7,
        on_nsfw="skip",
        output_path=output_dir,
    )
    with caplog.at_level(logging.WARNING):
        assert op.execute({"ti": FakeTI()}) == []
    line = skip_line(caplog)
    assert checker in line, line
    assert connection == "runware" or "Runware" not in line, line


@pytest.mark.parametrize(("connection", "checker"), CHECKERS, indirect=["connection"])
def test_the_skip_log_of_a_batch_names_the_backend_that_flagged_the_image(
    connection, checker, output_dir, caplog
):
    rows = [{"prompt": "a beach __nsfw__", "seed": 1}, {"prompt": "a harbour", "seed": 2}]
    with caplog.at_level(logging.WARNING):
        result = run_try(batch(output_dir, rows, on_nsfw="skip"), FakeTI())
    assert result["images"] == 1
    line = skip_line(caplog)
    assert checker in line, line
    assert connection == "runware" or "Runware" not in line, line
