"""`backend="local"`: the same operator and DAG on a local Z-Image pipeline instead of the Runware API."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.dagtest import run_dag, task_states
from tests.test_operator_dag import MAPPED_DAG

pytestmark = [pytest.mark.local, pytest.mark.usefixtures("airflow_db")]


@pytest.fixture
def local_conn(tiny_model, monkeypatch):
    """A connection that selects the local backend and the tiny model: the DAG itself does not change."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_ZIMAGE_DEFAULT",
        json.dumps(
            {
                "conn_type": "zimage",
                "extra": {"backend": "local", "model_path": str(tiny_model), "device": "cpu"},
            }
        ),
    )
    return tiny_model


def test_mapped_prompts_run_on_the_local_backend_with_the_same_manifest(local_conn, output_dir):
    prompts = [f"a tiny local painting {i}" for i in range(4)]
    run = run_dag(
        "local_map",
        MAPPED_DAG,
        dag_id="local_map",
        output=output_dir,
        prompts=prompts,
        op_kwargs={"seed": 7, "steps": 2, "output_format": "PNG"},
    )
    assert run.state == "success", task_states(run)
    root = Path(output_dir.removeprefix("file://"))
    collected = json.loads((root / "collected.json").read_text())
    assert len(collected) == 4
    for entry in collected:
        data = Path(entry["uri"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert (entry["width"], entry["height"], entry["format"], entry["seed"]) == (256, 256, "png", 7)
        assert entry["cost"] == 0.0
    manifests = [json.loads(p.read_text()) for p in root.rglob("manifest.json")]
    assert {m["backend"] for m in manifests} == {"local"}
    # Different prompts, same seed: different images.
    assert len({e["sha256"] for e in collected}) == 4


def test_the_same_request_on_the_local_backend_gives_the_same_bytes(local_conn, output_dir, tmp_path):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.dagtest import FakeTI

    def once(out: str) -> list[dict]:
        op = ZImageGenerateOperator(
            task_id="generate",
            prompt="reproducible",
            seed=11,
            width=128,
            height=128,
            steps=2,
            output_path=out,
        )
        return op.execute({"ti": FakeTI()})

    first = once(output_dir)
    second = once(f"file://{tmp_path / 'other'}")
    assert first[0]["sha256"] == second[0]["sha256"]


def test_refusals_of_the_local_backend_fail_the_task_naming_the_parameter(local_conn, output_dir):
    from airflow_provider_zimage.compat import AirflowFailException
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.dagtest import FakeTI

    op = ZImageGenerateOperator(
        task_id="generate",
        prompt="needs a controlnet",
        width=128,
        height=128,
        control_net=[{"model": "runware:25@1", "guideImage": "aGVsbG8="}],
        output_path=output_dir,
    )
    with pytest.raises(AirflowFailException, match="controlNet"):
        op.execute({"ti": FakeTI()})


def test_switching_local_weights_generates_again_instead_of_reusing(
    local_conn, output_dir, tmp_path, monkeypatch
):
    """Re-running a task after moving from test weights to real ones must not return the old images."""
    import shutil

    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.dagtest import FakeTI

    other = tmp_path / "other-weights"
    shutil.copytree(local_conn, other)

    def once(model_path):
        op = ZImageGenerateOperator(
            task_id="generate",
            prompt="same request",
            seed=3,
            width=128,
            height=128,
            steps=2,
            output_path=output_dir,
            local_model_path=str(model_path),
        )
        return op.execute({"ti": FakeTI()})

    first = once(local_conn)
    again = once(local_conn)
    switched = once(other)
    assert first[0]["uri"] == again[0]["uri"]  # same weights: reused, not regenerated
    assert switched[0]["uri"] != first[0]["uri"]  # other weights: a new image record
