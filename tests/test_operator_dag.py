"""The operator inside real DAG runs (`dag.test()`, SQLite) against the Runware test server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.dagtest import run_dag

pytestmark = pytest.mark.usefixtures("airflow_db")

MAPPED_DAG = """
import json
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    images = ZImageGenerateOperator.partial(
        task_id="generate",
        model="runware:z-image@turbo",
        width=256,
        height=256,
        output_path=PARAMS["output"],
        poll_interval=0.05,
        max_poll_interval=0.2,
        **PARAMS["op_kwargs"],
    ).expand(prompt=PARAMS["prompts"])

    @task
    def collect(entries):
        flat = [e for per_task in entries for e in per_task]
        Path(PARAMS["output"].removeprefix("file://"), "collected.json").write_text(json.dumps(flat))

    collect(images.output)
"""

PROMPTS = [f"product photo number {i}, studio light" for i in range(20)]


def manifests(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("manifest.json"))]


def run_mapped(dag_id: str, output: str, prompts=PROMPTS, **op_kwargs):
    return run_dag(dag_id, MAPPED_DAG, dag_id=dag_id, output=output, prompts=prompts, op_kwargs=op_kwargs)


def check_stored(root: Path, expected: int) -> list[dict]:
    collected = json.loads((root / "collected.json").read_text())
    assert len(collected) == expected
    for entry in collected:
        data = Path(entry["uri"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
    return collected


@pytest.mark.parametrize("deferrable", [False, True], ids=["in-process", "deferrable"])
def test_twenty_mapped_prompts_store_every_image_once(zimage_conn, output_dir, deferrable):
    run = run_mapped(f"map20_{deferrable}", output_dir, deferrable=deferrable, seed=42)
    assert run.state == "success"
    root = Path(output_dir.removeprefix("file://"))
    found = manifests(root)
    assert len(found) == 20
    collected = check_stored(root, 20)
    for entry in collected:
        assert (entry["width"], entry["height"], entry["format"]) == (256, 256, "jpg")
        assert entry["cost"] and entry["cost"] > 0
        assert entry["seed"] == 42
        assert set(entry) == {
            "uri",
            "image_uuid",
            "task_uuid",
            "seed",
            "model",
            "width",
            "height",
            "format",
            "bytes",
            "sha256",
            "cost",
            "nsfw",
        }
    assert {m["images"][0]["sha256"] for m in found} == {e["sha256"] for e in collected}
    assert all(m["total_cost"] > 0 for m in found)
    stats = zimage_conn.stats
    assert stats["total_accepted"] == 20
    assert all(count == 1 for count in stats["accepted"].values())
