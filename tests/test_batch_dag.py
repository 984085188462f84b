"""The batch operator inside a real DAG run (`dag.test()`): requests from an upstream task (XComArg),
deferred to one trigger, with faults, and a downstream task reading the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dagtest import run_dag, task_states

pytestmark = pytest.mark.usefixtures("airflow_db")

BATCH_DAG = """
import json
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator, read_manifest_entries

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    @task
    def to_requests():
        return [{"prompt": f"catalogue item {i}", "seed": 500 + i} for i in range(PARAMS["n"])]

    shots = ZImageBatchGenerateOperator(
        task_id="shots",
        requests=to_requests(),
        width=256,
        height=256,
        output_path=PARAMS["output"],
        deferrable=True,
        defer_after=0,
        chunk_size=25,
        poll_interval=0.05,
        max_poll_interval=0.2,
    )

    @task
    def collect(summary):
        entries = read_manifest_entries(summary["manifest_uri"])
        out = Path(PARAMS["output"].removeprefix("file://"), "collected.json")
        out.write_text(json.dumps({"summary": summary, "entries": entries}))

    collect(shots.output)
"""


def test_a_deferred_batch_in_a_dag_with_faults_stores_every_image_once(zimage_conn, output_dir):
    zimage_conn.configure(delay=0.3)
    zimage_conn.script_faults(rates={"503": 0.3}, seed=1)
    run = run_dag("batch_dag", BATCH_DAG, dag_id="batch_dag", output=output_dir, n=60)
    assert run.state == "success", task_states(run)
    collected = json.loads(Path(output_dir.removeprefix("file://"), "collected.json").read_text())
    assert collected["summary"]["images"] == 60 and collected["summary"]["failed"] == 0
    assert sorted(e["index"] for e in collected["entries"]) == list(range(60))
    stats = zimage_conn.stats
    assert stats["total_accepted"] == 60 and set(stats["accepted"].values()) == {1}
