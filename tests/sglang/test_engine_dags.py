"""The openai_images backend against real SGLang workers behind a router: what a user of a cluster sees.

A DAG that only changes its connection generates, stores and verifies through the router; a worker
SIGKILLed in the middle of a batch costs nothing but time (every image stored once, the rest made by
the survivor); a request the engine would get wrong is refused before a byte reaches the router; the
seed gives the same bytes again on the same worker.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from airflow_provider_zimage.compat import AirflowFailException
from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
from airflow_provider_zimage.testing.sglang_cluster import MODEL_ID, NginxRouter, SGLangCluster
from tests.dagtest import FakeTI, run_dag, task_states

pytestmark = pytest.mark.sglang

SIZE = 128  # the smallest size the catalogue accepts; a multiple of 16 as the engine needs
STEPS = 2


def use_engine(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """`zimage_default` on the engine: only the connection differs from a Runware DAG."""
    connection = {
        "conn_type": "zimage",
        "host": url,
        "extra": {
            "backend": "openai_images",
            "served_model": MODEL_ID,
            "max_retries": 6,
            "backoff_base": 0.2,
            "backoff_max": 2,
            "timeout": 300,
        },
    }
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(connection))


def router_of(cluster: SGLangCluster) -> NginxRouter:
    assert isinstance(cluster.router, NginxRouter)
    return cluster.router


def manifest_images(manifest_uri: str) -> tuple[Path, list[dict[str, Any]]]:
    path = Path(manifest_uri.removeprefix("file://"))
    return path.parent, list(json.loads(path.read_text())["images"])


ENGINE_DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageBatchGenerateOperator(
        task_id="catalogue",
        requests=[{"prompt": f"product shot {i}", "seed": 40 + i} for i in range(3)],
        width=PARAMS["size"],
        height=PARAMS["size"],
        steps=PARAMS["steps"],
        output_format="PNG",
        output_path=PARAMS["output"],
        max_in_flight=2,
    )
"""


@pytest.mark.usefixtures("airflow_db")
def test_a_dag_on_the_engine_generates_stores_and_verifies_images_through_the_router(
    sglang: SGLangCluster, monkeypatch: pytest.MonkeyPatch, output_dir: str
) -> None:
    use_engine(monkeypatch, sglang.url)
    router = router_of(sglang)
    before = len(router.requests())
    run = run_dag("engine_dag", ENGINE_DAG, dag_id="engine_dag", size=SIZE, steps=STEPS, output=output_dir)
    assert run.state == "success", task_states(run)
    (manifest,) = Path(output_dir.removeprefix("file://")).rglob("manifest.json")
    data = json.loads(manifest.read_text())
    assert data["backend"] == "openai_images"
    assert sorted(image["seed"] for image in data["images"]) == [40, 41, 42]
    for image in data["images"]:
        stored = (manifest.parent / Path(image["uri"]).name).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == image["sha256"]
        assert Image.open(io.BytesIO(stored)).size == (SIZE, SIZE)
    # One request per image, all through the router, spread over both workers.
    sent = router.requests()[before:]
    assert len(sent) == 3 and all(entry["status"] == "200" for entry in sent)
    assert len({entry["upstream"] for entry in sent}) == 2


def test_a_request_the_engine_cannot_honour_is_refused_before_anything_reaches_the_router(
    sglang: SGLangCluster, monkeypatch: pytest.MonkeyPatch, zimage_output: Path
) -> None:
    use_engine(monkeypatch, sglang.url)
    router = router_of(sglang)
    before = len(router.requests())
    # The engine itself would answer 200 to each (it ignores the scheduler, rounds 200 down to 192).
    for odd in ({"scheduler": "DPM++ 2M Karras"}, {"width": 200}):
        arguments: dict[str, Any] = {
            "prompt": "a lighthouse",
            "width": SIZE,
            "height": SIZE,
            "seed": 1,
            **odd,
        }
        op = ZImageGenerateOperator(task_id="hero", **arguments)
        with pytest.raises((ZImageValidationError, AirflowFailException), match=next(iter(odd))):
            op.execute({"ti": FakeTI("manual__refused", task_id="hero")})
    assert router.requests()[before:] == []


def test_the_seed_gives_the_same_bytes_again_on_the_same_worker(
    sglang: SGLangCluster, monkeypatch: pytest.MonkeyPatch, zimage_output: Path
) -> None:
    use_engine(monkeypatch, sglang.workers[0].url)
    stored = []
    for run_id in ("manual__first", "manual__again"):
        op = ZImageGenerateOperator(
            task_id="hero",
            prompt="a lighthouse",
            width=SIZE,
            height=SIZE,
            steps=STEPS,
            seed=77,
            output_format="PNG",
        )
        (image,) = op.execute({"ti": FakeTI(run_id, task_id="hero")})
        stored.append(image["sha256"])
    assert stored[0] == stored[1]


# Last in the session: it leaves a worker dead, and starting it again costs a minute or two on 2 cores.
def test_a_worker_killed_mid_batch_loses_nothing_and_the_survivor_makes_the_rest(
    sglang: SGLangCluster, monkeypatch: pytest.MonkeyPatch, zimage_output: Path
) -> None:
    use_engine(monkeypatch, sglang.url)
    router = router_of(sglang)
    before = len(router.requests())
    rows = [{"prompt": f"tile {i}", "seed": 200 + i} for i in range(8)]
    op = ZImageBatchGenerateOperator(
        task_id="tiles",
        requests=rows,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        output_format="PNG",
        max_in_flight=2,
    )
    outcome: dict[str, Any] = {}

    def run_batch() -> None:
        try:
            outcome["summary"] = op.execute({"ti": FakeTI("manual__killed", task_id="tiles")})
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    worker = threading.Thread(target=run_batch)
    worker.start()
    deadline = time.monotonic() + 300
    while len(router.requests()[before:]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    victim = sglang.kill_worker(1)  # mid-batch: images answered, others in flight, the rest not sent
    killed_at = len(router.requests()[before:])
    worker.join(600)
    assert not worker.is_alive() and "error" not in outcome, outcome.get("error")

    summary = outcome["summary"]
    folder, images = manifest_images(summary["manifest_uri"])
    assert summary["images"] == 8 and sorted(i["seed"] for i in images) == [200 + i for i in range(8)]
    assert sorted(i["index"] for i in images) == list(range(8))  # each image once
    assert len(list(folder.glob("*.png"))) == 8  # and no second file of any
    for image in images:
        assert hashlib.sha256((folder / Path(image["uri"]).name).read_bytes()).hexdigest() == image["sha256"]
    # Everything answered after the kill came from the survivor (nginx passed the dead worker over).
    survivor, dead = (w.url.removeprefix("http://") for w in (sglang.workers[0], victim))
    answered_after = [e["upstream"].split(", ")[-1] for e in router.requests()[before:][killed_at:]]
    assert answered_after and set(answered_after) == {survivor}, (answered_after, dead)
