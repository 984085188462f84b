"""A request that renders differently each time it is rendered must still store the image it paid for.

`seed="{{ (macros.random() * 2147483647) | int }}"` renders anew whenever a task resumes or retries.
The taskUUID the operator paid for is in the ledger (and in the trigger's event); resuming must trust
that, not a taskUUID recomputed from the new rendering. Proven in real `dag.test()` runs against the
Runware test server, counting accepted submissions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.dagtest import run_dag, task_states

pytestmark = pytest.mark.usefixtures("airflow_db")

RANDOM_SEED = "{{ (macros.random() * 2147483647) | int }}"
WARNING = "renders differently"

GENERATE_DAG = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_provider_zimage.compat import AirflowException
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator


class BucketDownOnTheFirstTry(ZImageGenerateOperator):
    # The image is paid and ready, but the first try cannot store it (the bucket was down).
    def _store(self, context, job, results, hook, task_uuid):
        if PARAMS["fail_first_store"] and context["ti"].try_number == 1:
            raise AirflowException("the bucket is down")
        return super()._store(context, job, results, hook, task_uuid)


with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    BucketDownOnTheFirstTry(
        task_id="generate",
        prompt="a lighthouse at dusk",
        seed=PARAMS["seed"],
        width=256,
        height=256,
        output_path=PARAMS["output"],
        deferrable=True,
        defer_after=0,
        poll_interval=0.05,
        max_poll_interval=0.2,
        retries=PARAMS["retries"],
        retry_delay=timedelta(seconds=0),
    )
"""


def run_generate(
    dag_id: str, output: str, *, seed: str = RANDOM_SEED, retries: int = 0, fail_first: bool = False
):
    return run_dag(
        dag_id,
        GENERATE_DAG,
        dag_id=dag_id,
        output=output,
        seed=seed,
        retries=retries,
        fail_first_store=fail_first,
    )


def stored_images(output: str) -> list[dict]:
    """Every image a manifest lists, each file checked to be there."""
    root = Path(output.removeprefix("file://"))
    images = []
    for path in root.rglob("manifest.json"):
        manifest = json.loads(path.read_text())
        for image in manifest["images"]:
            assert Path(image["uri"].removeprefix("file://")).is_file()
            images.append({**image, "manifest": manifest})
    return images


def warnings_about_rendering(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()
    ]


def test_a_deferred_task_whose_seed_renders_differently_on_resume_stores_the_image_it_paid_for(
    zimage_conn, output_dir, caplog
):
    zimage_conn.configure(delay=0.4)  # still generating when the operator looks: it defers
    caplog.set_level(logging.INFO)
    run = run_generate("random_seed_resume", output_dir)
    assert run.state == "success", task_states(run)
    stats = zimage_conn.stats
    assert stats["total_accepted"] == 1, stats
    (image,) = stored_images(output_dir)
    # The manifest records the request that was paid for: its seed is the image's seed and the
    # taskUUID is the one Runware accepted.
    assert image["manifest"]["request"]["seed"] == image["seed"]
    assert image["task_uuid"] in stats["accepted"]
    (warning,) = warnings_about_rendering(caplog)
    assert "seed" in warning and "ds_nodash" in warning


def test_a_retry_that_renders_another_seed_stores_the_image_the_first_try_paid_for(
    zimage_conn, output_dir, caplog
):
    zimage_conn.configure(delay=0.4)
    caplog.set_level(logging.INFO)
    run = run_generate("random_seed_retry", output_dir, retries=2, fail_first=True)
    assert run.state == "success", task_states(run)
    stats = zimage_conn.stats
    assert stats["total_accepted"] == 1, stats  # one image paid, by the first try
    (image,) = stored_images(output_dir)
    assert image["task_uuid"] in stats["accepted"]
    assert image["manifest"]["request"]["seed"] == image["seed"]
    assert len(warnings_about_rendering(caplog)) == 2  # once in each try: the resume, then the retry


def test_a_seed_derived_from_the_run_renders_the_same_and_warns_nothing(zimage_conn, output_dir, caplog):
    zimage_conn.configure(delay=0.4)
    caplog.set_level(logging.INFO)
    run = run_generate("derived_seed", output_dir, seed="{{ ds_nodash }}", retries=2, fail_first=True)
    assert run.state == "success", task_states(run)
    assert zimage_conn.stats["total_accepted"] == 1
    (image,) = stored_images(output_dir)
    assert image["manifest"]["request"]["seed"] == image["seed"]
    assert warnings_about_rendering(caplog) == []


BATCH_DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageBatchGenerateOperator(
        task_id="shots",
        requests=[{"prompt": f"catalogue item {i}", "seed": PARAMS["seed"]} for i in range(3)],
        width=256,
        height=256,
        output_path=PARAMS["output"],
        deferrable=True,
        defer_after=0,
        poll_interval=0.05,
        max_poll_interval=0.2,
    )
"""


def test_a_deferred_batch_whose_rows_render_differently_on_resume_stores_what_it_paid_for(
    zimage_conn, output_dir, caplog
):
    zimage_conn.configure(delay=0.4)
    caplog.set_level(logging.INFO)
    run = run_dag(
        "random_seed_batch", BATCH_DAG, dag_id="random_seed_batch", output=output_dir, seed=RANDOM_SEED
    )
    assert run.state == "success", task_states(run)
    stats = zimage_conn.stats
    assert stats["total_accepted"] == 3, stats  # one image per row, paid once
    root = Path(output_dir.removeprefix("file://"))
    (manifest,) = [json.loads(p.read_text()) for p in root.rglob("manifest.json")]
    assert sorted(i["index"] for i in manifest["images"]) == [0, 1, 2]
    assert {i["task_uuid"] for i in manifest["images"]} == set(stats["accepted"])
    (warning,) = warnings_about_rendering(caplog)
    assert "requests[0]" in warning and "seed" in warning


def test_an_event_naming_a_task_this_instance_never_submitted_is_refused_and_stores_nothing(
    zimage_conn, output_dir
):
    """Trusting the ledger must not mean trusting any taskUUID: one it never recorded is refused."""
    import uuid

    from airflow_provider_zimage.compat import AirflowException, TaskDeferred
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.dagtest import FakeTI

    zimage_conn.configure(delay=5)
    op = ZImageGenerateOperator(
        task_id="generate", prompt="a forged event", output_path=output_dir, deferrable=True, defer_after=0
    )
    context = {"ti": FakeTI("manual__forged")}
    with pytest.raises(TaskDeferred):
        op.execute(context)
    forged = {"outcome": "store", "task_uuid": str(uuid.uuid4()), "results": [], "refetch": True}
    with pytest.raises(AirflowException, match="does not match"):
        op.execute_complete(context, forged)
    assert stored_images(output_dir) == []


def test_a_retried_batch_row_that_renders_another_request_keeps_what_was_paid_and_an_edited_row_does_not():
    from airflow_provider_zimage.batch_state import BatchLedger

    ledger = BatchLedger("d", "t", "r", -1)
    paid = ledger.entry_for(0, "fp-seed-1", 1, fresh=True, arguments="row-as-written")
    paid.arguments = "row-as-written"
    ledger.record(paid, "submitted")
    # Resumed (same try): the recorded entry, whatever the row renders now.
    assert ledger.entry_for(0, "fp-seed-2", 1, fresh=False, arguments="edited") is paid
    # Retried: the same row as written renders another seed; the pending entry is kept, not paid again.
    assert ledger.entry_for(0, "fp-seed-3", 1, fresh=True, arguments="row-as-written") is paid
    # The row was edited in the DAG: a new request, a new taskUUID.
    edited = ledger.entry_for(0, "fp-other-prompt", 1, fresh=True, arguments="row-edited")
    assert edited is not paid and edited.task_uuid != paid.task_uuid
    ledger.record(paid, "stored")
    assert ledger.entry_for(0, "fp-seed-4", 1, fresh=True, arguments="row-as-written") is paid
    forced = ledger.entry_for(0, "fp-seed-4", 1, fresh=True, arguments="row-as-written", keep_stored=False)
    assert forced is not paid  # force=True pays for the new rendering
