"""Money is real: every way Airflow re-runs work must end with each image stored once and paid once.

Proven by the test server's accepted-submission counts, not by mocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pendulum
import pytest

from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.triggers.task import ZImageTaskTrigger
from tests.dagtest import FakeTI, run_dag, task_states
from tests.test_operator_dag import MAPPED_DAG, check_stored, manifests

pytestmark = pytest.mark.usefixtures("airflow_db")


def one_submission_each(server, expected: int) -> None:
    stats = server.stats
    assert stats["total_accepted"] == expected, stats
    assert len(stats["accepted"]) == expected
    assert set(stats["accepted"].values()) == {1}


def run_mapped(dag_id, output, prompts, logical_date=None, **op_kwargs):
    return run_dag(
        dag_id,
        MAPPED_DAG,
        logical_date=logical_date,
        dag_id=dag_id,
        output=output,
        prompts=prompts,
        op_kwargs=op_kwargs,
    )


def test_a_dropped_answer_after_acceptance_stores_each_image_once(zimage_conn, output_dir):
    zimage_conn.drop_next(times=3, after_accept=True, task_type="imageInference")
    prompts = [f"dropped answer {i}" for i in range(5)]
    run = run_mapped("dropped_answer", output_dir, prompts, deferrable=True)
    assert run.state == "success", task_states(run)
    check_stored(Path(output_dir.removeprefix("file://")), 5)
    one_submission_each(zimage_conn, 5)
    assert zimage_conn.stats["conflicts"] >= 1  # re-sent POSTs were recognised as landed, not paid again


@pytest.mark.parametrize("fault", ["429", "500", "503", "drop"])
def test_thirty_percent_of_responses_failing_still_stores_every_image_once(zimage_conn, output_dir, fault):
    zimage_conn.script_faults(rates={fault: 0.3}, seed=7)
    prompts = [f"flaky network {fault} {i}" for i in range(8)]
    run = run_mapped(f"flaky_{fault}", output_dir, prompts, deferrable=True)
    assert run.state == "success", task_states(run)
    check_stored(Path(output_dir.removeprefix("file://")), 8)
    one_submission_each(zimage_conn, 8)
    assert sum(zimage_conn.stats["faults_injected"].values()) > 0


def test_rerunning_the_same_run_returns_the_stored_images_without_paying(zimage_conn, output_dir):
    prompts = [f"backfill day {i}" for i in range(3)]
    day = pendulum.datetime(2026, 3, 1, tz="UTC")
    first = run_mapped("rerun_same", output_dir, prompts, logical_date=day)
    assert first.state == "success"
    one_submission_each(zimage_conn, 3)
    root = Path(output_dir.removeprefix("file://"))
    before = {m["images"][0]["sha256"] for m in manifests(root)}

    again = run_mapped("rerun_same", output_dir, prompts, logical_date=day)
    assert again.state == "success"
    one_submission_each(zimage_conn, 3)  # nothing new paid
    assert {m["images"][0]["sha256"] for m in manifests(root)} == before

    forced = run_mapped("rerun_same", output_dir, prompts, logical_date=day, force=True)
    assert forced.state == "success"
    assert zimage_conn.stats["total_accepted"] == 6  # force=True regenerates, with new taskUUIDs
    assert set(zimage_conn.stats["accepted"].values()) == {1}


def test_a_changed_prompt_in_a_rerun_is_a_new_image(zimage_conn, output_dir):
    day = pendulum.datetime(2026, 3, 2, tz="UTC")
    run_mapped("changed_prompt", output_dir, ["a blue car"], logical_date=day)
    run_mapped("changed_prompt", output_dir, ["a green car"], logical_date=day)
    assert zimage_conn.stats["total_accepted"] == 2


# -- a worker killed for real (os._exit) right after its POST landed ----------------------------------

KILLED_WORKER = """
import os, sys, json
from airflow_provider_zimage.hooks import runware
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
params = json.loads(sys.argv[1])
original = getattr(runware.ZImageHook, params["die_in"])

def die_after(self, *args, **kwargs):
    original(self, *args, **kwargs)
    os._exit(9)  # the worker is gone: no exception handler, no ledger update, nothing

setattr(runware.ZImageHook, params["die_in"], die_after)

class TI:
    dag_id, task_id, run_id, map_index = "killed", "generate", params["run_id"], 0
    def xcom_push(self, key, value):
        pass

op = ZImageGenerateOperator(task_id="generate", prompt="a worker that dies", width=256, height=256,
                            output_path=params["output"], poll_interval=0.05)
op.execute({"ti": TI()})
"""


def killed_ti(run_id: str) -> FakeTI:
    """The task instance the killed child ran as (see KILLED_WORKER)."""
    return FakeTI(run_id, dag_id="killed", map_index=0)


@pytest.mark.parametrize("die_in", ["submit", "get_response"], ids=["after-POST", "while-waiting"])
def test_a_worker_killed_after_submitting_is_reattached_on_retry(zimage_conn, output_dir, die_in):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    run_id = f"manual__killed_{die_in}"
    params = json.dumps({"run_id": run_id, "output": output_dir, "die_in": die_in})
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLED_WORKER), params],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 9, child.stderr[-2000:]
    assert zimage_conn.total_accepted == 1

    retry = ZImageGenerateOperator(
        task_id="generate",
        prompt="a worker that dies",
        width=256,
        height=256,
        output_path=output_dir,
        poll_interval=0.05,
    )
    images = retry.execute({"ti": killed_ti(run_id)})
    assert len(images) == 1
    one_submission_each(zimage_conn, 1)
    assert Path(images[0]["uri"].removeprefix("file://")).exists()


# -- the triggerer restarted while a task is deferred ---------------------------------------------------


async def test_a_restarted_triggerer_resumes_from_the_serialized_trigger(zimage_conn):
    import importlib

    zimage_conn.configure(delay=0.6)
    req = ImageInferenceRequest.build(
        model="runware:z-image@turbo", positive_prompt="a restart", width=256, height=256
    )
    await ZImageHook().asubmit([req])
    deadline = time.time() + 30
    trigger = ZImageTaskTrigger(task_uuid=req.task_uuid, deadline=deadline, poll_interval=0.05)
    first_life = asyncio.ensure_future(trigger.run().__anext__())
    await asyncio.sleep(0.2)
    assert not first_life.done()
    first_life.cancel()  # the triggerer process dies with the trigger mid-wait

    classpath, kwargs = trigger.serialize()
    json.dumps(kwargs)  # what the triggerer stores must be plain JSON
    module, _, name = classpath.rpartition(".")
    revived = getattr(importlib.import_module(module), name)(**kwargs)
    assert revived.deadline == deadline  # the original deadline, not a new one
    events = [event async for event in revived.run()]
    assert len(events) == 1
    payload = events[0].payload
    assert payload["outcome"] == "store" and payload["task_uuid"] == req.task_uuid
    assert len(payload["results"]) == 1
    assert zimage_conn.accepted_submissions(req.task_uuid) == 1


async def test_a_trigger_past_its_deadline_reports_timeout_as_retryable(zimage_conn):
    zimage_conn.configure(delay=5)
    req = ImageInferenceRequest.build(
        model="runware:z-image@turbo", positive_prompt="too slow", width=256, height=256
    )
    await ZImageHook().asubmit([req])
    trigger = ZImageTaskTrigger(task_uuid=req.task_uuid, deadline=time.time() + 0.3, poll_interval=0.05)
    events = [event async for event in trigger.run()]
    assert [e.payload["outcome"] for e in events] == ["retry"]
    assert events[0].payload["retryable"] is True


async def test_a_trigger_tolerates_a_bounded_run_of_transient_errors(zimage_conn):
    req = ImageInferenceRequest.build(
        model="runware:z-image@turbo", positive_prompt="flaky poll", width=256, height=256
    )
    await ZImageHook().asubmit([req])
    zimage_conn.fail_next(503, times=50, task_type="getResponse")
    trigger = ZImageTaskTrigger(
        task_uuid=req.task_uuid, deadline=time.time() + 30, poll_interval=0.01, max_consecutive_errors=2
    )
    events = [event async for event in trigger.run()]
    assert events[0].payload["outcome"] == "retry" and events[0].payload["retryable"] is True
    assert zimage_conn.accepted_submissions(req.task_uuid) == 1


# -- results Runware no longer has ------------------------------------------------------------------------


@pytest.mark.parametrize("deferrable", [False, True], ids=["in-process", "deferrable"])
def test_expired_results_are_retryable_and_the_retry_pays_for_a_new_generation(
    runware_server_factory, monkeypatch, output_dir, deferrable
):
    """Paid-for results that expired cannot be recovered; the retry must not reattach to them forever."""
    import asyncio

    from airflow_provider_zimage.compat import AirflowException, AirflowFailException, TaskDeferred
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.conftest import zimage_connection_json

    server = runware_server_factory(result_ttl=0.0, delay=0.1)
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", zimage_connection_json(server))

    def attempt():
        op = ZImageGenerateOperator(
            task_id="generate",
            prompt="an expiring image",
            width=256,
            height=256,
            output_path=output_dir,
            poll_interval=0.3,
            deferrable=deferrable,
        )
        context = {"ti": killed_ti(f"manual__expired_{deferrable}")}
        try:
            return op.execute(context)
        except TaskDeferred as deferred:
            events = asyncio.run(_events(deferred.trigger))
            return op.execute_complete(context, events[0].payload)

    with pytest.raises(AirflowException) as info:
        attempt()
    assert not isinstance(info.value, AirflowFailException)
    assert "new taskUUID" in str(info.value)
    with pytest.raises(AirflowException):
        attempt()
    accepted = server.stats["accepted"]
    assert len(accepted) == 2 and set(accepted.values()) == {1}  # generation 0, then generation 1


async def _events(trigger):
    return [event async for event in trigger.run()]
