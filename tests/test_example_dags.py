"""The example DAGs of `dags/`, run unchanged the way a user runs them, and `make demo`'s backend choice.

Each DAG runs through `dag.test()` on SQLite from a copy of `dags/` (data included) in this xdist
worker's DAGS folder: Airflow 3.3's `dag.test()` serializes by re-parsing the DAGs folder, and a
per-worker copy keeps workers apart. The DAGs do not name a backend (except `zimage_local_gpu`): the
`zimage_default` connection picks the Runware test server or the tiny offline Z-Image model, and
`ZIMAGE_IMAGE_SIZE` the size, exactly as `make demo` does. Payment is checked by the server's
accepted-submission counts.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import re
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pendulum
import pytest
from PIL import Image

from tests.dagtest import dag_bag_class, dags_folder, task_states

pytestmark = pytest.mark.usefixtures("airflow_db")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "dags"
DAG_IDS = {
    "zimage_quickstart",
    "zimage_content_pipeline",
    "zimage_catalogue",
    "zimage_daily_backfill",
    "zimage_local_gpu",
}
RUNWARE_SIZE = 256
LOCAL_SIZE = 128  # the smallest size the API accepts: the tiny model takes about a second per image on a CPU


def products() -> list[dict[str, str]]:
    with (EXAMPLES / "data" / "products.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def examples() -> Path:
    target = dags_folder() / "zimage_examples"
    shutil.copytree(EXAMPLES, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.fixture
def output(zimage_output: Path) -> Path:
    """`[zimage] output_path` for this test only; the DAGs rely on it, as a deployment would."""
    return zimage_output


@pytest.fixture
def runware(zimage_conn: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("ZIMAGE_IMAGE_SIZE", str(RUNWARE_SIZE))
    return zimage_conn


@pytest.fixture
def local(zimage_local_connection: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`zimage_default` on the local backend with the tiny model, as `make demo` sets it without a key."""
    import torch

    monkeypatch.setenv("ZIMAGE_IMAGE_SIZE", str(LOCAL_SIZE))
    # Two xdist workers on two cores: more torch threads than that only spin-wait.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield zimage_local_connection.model_path
    torch.set_num_threads(threads)


# -- helpers ----------------------------------------------------------------------------------------------


def load(examples: Path, dag_id: str) -> Any:
    """Parse the DAG file now, so the environment of the test (size, connection) is what it reads."""
    DagBag = dag_bag_class()

    bag = DagBag(dag_folder=str(examples / f"{dag_id}.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


def run(examples: Path, dag_id: str, logical_date: Any = None) -> Any:
    dag = load(examples, dag_id)
    result = (
        dag.test() if logical_date is None else dag.test(logical_date=logical_date, run_after=logical_date)
    )
    states = task_states(result)
    # A run whose dates fall outside the DAG's start/end "succeeds" without running a task: check them.
    assert result.state == "success" and states and set(states.values()) == {"success"}, states
    return result


def started(run_: Any) -> dict[str, Any]:
    """When each task instance of the run last started: a re-run that really ran moves them all."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == run_.dag_id, TaskInstance.run_id == run_.run_id)
        ).all()
        return {f"{ti.task_id}[{ti.map_index}]": ti.start_date for ti in tis}


def xcom(run_: Any, task_id: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == run_.dag_id,
                XComModel.run_id == run_.run_id,
                XComModel.task_id == task_id,
                XComModel.key == "return_value",
            )
        ).one()
        return XComModel.deserialize_value(row)


def manifests(root: Path) -> list[dict[str, Any]]:
    """Every manifest under `root`, in map-index order."""
    found = [json.loads(path.read_text()) for path in root.rglob("manifest.json")]
    return sorted(found, key=lambda m: m["map_index"])


def check_images(manifest: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """Every image listed is on disk, intact (sha256, bytes) and decodes at the requested size."""
    for entry in manifest["images"]:
        data = Path(entry["uri"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
        assert Image.open(io.BytesIO(data)).size == (size, size) == (entry["width"], entry["height"])
    return manifest["images"]


def use_products(rows: list[dict[str, str]], folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the product DAGs at an edited copy of the table (`ZIMAGE_PRODUCTS_CSV`), as a user would."""
    table = folder / "products.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    monkeypatch.setenv("ZIMAGE_PRODUCTS_CSV", str(table))


def run_dir(root: Path, dag_id: str, run_: Any) -> Path:
    from airflow_provider_zimage.storage import safe_segment

    return root / dag_id / safe_segment(run_.run_id)


# -- loading --------------------------------------------------------------------------------------------


def test_every_example_dag_loads_and_declares_its_pattern(examples):
    DagBag = dag_bag_class()

    bag = DagBag(dag_folder=str(examples))
    assert bag.import_errors == {}
    assert set(bag.dags) == DAG_IDS

    backfill = bag.dags["zimage_daily_backfill"]
    assert backfill.catchup is True
    assert backfill.is_paused_upon_creation is True
    assert backfill.schedule == "@daily"
    generate = backfill.task_dict["generate"]
    assert generate.partial_kwargs["pool"] == "zimage_api"
    assert generate.partial_kwargs["retries"] >= 1

    gpu = bag.dags["zimage_local_gpu"].task_dict["generate"]
    assert gpu.partial_kwargs["pool"] == "gpu"
    assert gpu.partial_kwargs["backend"] == "local"

    for dag_id in DAG_IDS - {"zimage_local_gpu"}:  # the others leave the backend to the connection
        op = bag.dags[dag_id].task_dict["generate"]
        kwargs = getattr(op, "partial_kwargs", None) or vars(op)
        assert kwargs.get("backend") is None, dag_id


# -- zimage_quickstart ----------------------------------------------------------------------------------


def test_quickstart_on_runware_stores_one_image_and_prints_its_manifest(examples, runware, output):
    result = run(examples, "zimage_quickstart")
    [manifest] = manifests(output)
    [image] = check_images(manifest, RUNWARE_SIZE)
    assert manifest["backend"] == "runware"
    assert (manifest["dag_id"], manifest["run_id"], manifest["task_id"]) == (
        "zimage_quickstart",
        result.run_id,
        "generate",
    )
    assert image["seed"] == 42 and image["cost"] > 0
    assert manifest["total_cost"] == image["cost"]
    shown = xcom(result, "show_manifest")
    assert shown["images"] == [image["uri"]]
    assert (
        shown["manifest"]
        == (run_dir(output, "zimage_quickstart", result) / "generate/unmapped/manifest.json").as_uri()
    )
    assert runware.stats["total_accepted"] == 1


def test_quickstart_on_the_tiny_local_model_as_make_demo_runs_it(examples, local, output):
    result = run(examples, "zimage_quickstart")
    [manifest] = manifests(output)
    [image] = check_images(manifest, LOCAL_SIZE)
    assert manifest["backend"] == "local"
    assert image["seed"] == 42 and image["cost"] == 0.0
    assert xcom(result, "show_manifest")["images"] == [image["uri"]]


# -- zimage_content_pipeline ----------------------------------------------------------------------------


def check_contact_sheet_and_gallery(output: Path, result: Any, size: int) -> list[dict[str, Any]]:
    rows = products()
    found = manifests(output)
    assert [m["map_index"] for m in found] == list(range(len(rows)))
    entries = []
    for product, manifest in zip(rows, found, strict=True):
        [image] = check_images(manifest, size)
        assert product["name"] in manifest["request"]["positivePrompt"]
        assert image["seed"] == zlib.crc32(product["sku"].encode())  # a product always gets its picture
        entries.append(image)

    folder = run_dir(output, "zimage_content_pipeline", result)
    summary = xcom(result, "contact_sheet")
    assert summary == {
        "contact_sheet": (folder / "contact_sheet.png").as_uri(),
        "gallery": (folder / "gallery.html").as_uri(),
        "images": len(rows),
    }
    sheet = Image.open(folder / "contact_sheet.png")
    assert sheet.format == "PNG"
    assert sheet.width >= 3 * 256 and sheet.height >= 2 * 256  # 6 products: a 3x2 grid of thumbnails

    gallery = (folder / "gallery.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', gallery)
    assert sources == ["/".join(e["uri"].rsplit("/", 3)[1:]) for e in entries]
    assert all((folder / src).is_file() for src in sources)  # relative links resolve next to the page
    assert all(product["sku"] in gallery for product in rows)
    return entries


def test_content_pipeline_on_runware_maps_products_to_images_sheet_and_gallery(examples, runware, output):
    result = run(examples, "zimage_content_pipeline")
    entries = check_contact_sheet_and_gallery(output, result, RUNWARE_SIZE)
    assert runware.stats["total_accepted"] == len(entries) == len(products())
    assert set(runware.stats["accepted"].values()) == {1}


def test_content_pipeline_on_the_tiny_local_model_as_make_demo_runs_it(examples, local, output):
    result = run(examples, "zimage_content_pipeline")
    entries = check_contact_sheet_and_gallery(output, result, LOCAL_SIZE)
    assert all(e["cost"] == 0.0 for e in entries)


def test_content_pipeline_pays_on_day_two_only_for_the_changed_row(
    examples, runware, output, tmp_path, monkeypatch
):
    """SKU-derived seeds and reuse="content": an unchanged product is copied from yesterday's run (cost
    0, `reused_from`), only the edited row is generated and paid for."""
    day1 = pendulum.datetime(2026, 6, 1, tz="UTC")
    first = run(examples, "zimage_content_pipeline", logical_date=day1)
    assert runware.stats["total_accepted"] == len(products())
    yesterday = {m["map_index"]: m["images"][0] for m in manifests(run_dir(output, first.dag_id, first))}

    rows = products()
    rows[2]["color"] = "forest green"  # one product re-coloured overnight
    use_products(rows, tmp_path, monkeypatch)
    second = run(examples, "zimage_content_pipeline", logical_date=day1.add(days=1))
    assert second.run_id != first.run_id
    assert runware.stats["total_accepted"] == len(rows) + 1  # exactly the changed row was paid for
    today = manifests(run_dir(output, second.dag_id, second))
    assert [m["map_index"] for m in today] == list(range(len(rows)))
    for manifest in today:
        [image] = check_images(manifest, RUNWARE_SIZE)
        before = yesterday[manifest["map_index"]]
        if manifest["map_index"] == 2:
            assert "forest green" in manifest["request"]["positivePrompt"]
            assert "reused_from" not in image and image["sha256"] != before["sha256"]
        else:
            assert image["reused_from"] == before["uri"] and image["cost"] == 0.0
            assert image["sha256"] == before["sha256"] and image["uri"] != before["uri"]
    assert xcom(second, "contact_sheet")["images"] == len(rows)


TEMPLATE_CELL = "{{ conn.zimage_default.password }}"


def test_content_pipeline_keeps_a_templated_table_cell_as_literal_text(
    examples, runware, output, tmp_path, monkeypatch
):
    """Airflow renders Jinja inside values mapped with expand_kwargs: the DAG wraps each prompt in
    `literal()`, so a cell that looks like a template is sent and stored as the text it is."""
    from airflow_provider_zimage.testing.runware_server.server import DEFAULT_API_KEY

    rows = products()
    rows[1]["name"] = TEMPLATE_CELL
    use_products(rows, tmp_path, monkeypatch)
    result = run(examples, "zimage_content_pipeline")
    found = manifests(run_dir(output, result.dag_id, result))
    assert TEMPLATE_CELL in found[1]["request"]["positivePrompt"]
    sent = json.dumps(runware.request_bodies)
    assert TEMPLATE_CELL in sent and DEFAULT_API_KEY not in sent
    assert all(DEFAULT_API_KEY not in json.dumps(m) for m in found)


# -- zimage_catalogue -----------------------------------------------------------------------------------


def published(result: Any) -> list[dict[str, str]]:
    """The rows of the catalogue.csv a run published, read through the path its XCom names."""
    target = Path(xcom(result, "publish")["catalogue"].removeprefix("file://"))
    with target.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_catalogue_is_one_batch_task_and_day_two_pays_only_for_the_changed_row(
    examples, runware, output, tmp_path, monkeypatch
):
    """The whole table in one task instance (one manifest, a small summary XCom), published as a CSV a
    shop import reads; the next day, with one row edited, only that row is submitted and paid for."""
    day1 = pendulum.datetime(2026, 6, 1, tz="UTC")
    first = run(examples, "zimage_catalogue", logical_date=day1)
    rows = products()
    assert runware.stats["total_accepted"] == len(rows)
    summary = xcom(first, "generate")
    assert set(summary) == {"manifest_uri", "images", "failed", "reused", "total_cost"}
    assert (summary["images"], summary["failed"], summary["reused"]) == (len(rows), 0, 0)
    [manifest] = manifests(run_dir(output, first.dag_id, first))
    assert len(check_images(manifest, RUNWARE_SIZE)) == len(rows)
    day1_csv = published(first)
    assert [r["sku"] for r in day1_csv] == [p["sku"] for p in rows]
    by_uri = {e["uri"]: e for e in manifest["images"]}
    assert all(by_uri[r["uri"]]["sha256"] == r["sha256"] and not r["reused_from"] for r in day1_csv)

    rows[4]["color"] = "emerald green"  # one product re-coloured overnight
    use_products(rows, tmp_path, monkeypatch)
    second = run(examples, "zimage_catalogue", logical_date=day1.add(days=1))
    assert runware.stats["total_accepted"] == len(rows) + 1  # exactly the changed row was paid for
    assert xcom(second, "generate")["reused"] == len(rows) - 1
    day2_csv = published(second)
    [today] = manifests(run_dir(output, second.dag_id, second))
    check_images(today, RUNWARE_SIZE)
    for before, after in zip(day1_csv, day2_csv, strict=True):
        if after["sku"] == rows[4]["sku"]:
            assert not after["reused_from"] and after["sha256"] != before["sha256"]
        else:
            assert after["reused_from"] == before["uri"] and float(after["cost"]) == 0.0
            assert after["sha256"] == before["sha256"] and after["uri"] != before["uri"]


def test_catalogue_rows_from_an_upstream_task_are_not_rendered_as_templates(
    examples, runware, output, tmp_path, monkeypatch
):
    """The batch's rows come whole from XCom, which Airflow does not render: a template-like cell is
    sent as text (were it rendered, the operator would refuse the row holding the key)."""
    from airflow_provider_zimage.testing.runware_server.server import DEFAULT_API_KEY

    rows = products()
    rows[1]["name"] = TEMPLATE_CELL
    use_products(rows, tmp_path, monkeypatch)
    run(examples, "zimage_catalogue")
    sent = json.dumps(runware.request_bodies)
    assert TEMPLATE_CELL in sent and DEFAULT_API_KEY not in sent
    assert runware.stats["total_accepted"] == len(rows)


# -- zimage_daily_backfill ------------------------------------------------------------------------------


def test_backfill_seeds_follow_the_day_and_a_rerun_pays_nothing(examples, runware, output):
    day = pendulum.datetime(2026, 11, 2, tz="UTC")  # after the DAG's start_date
    first = run(examples, "zimage_daily_backfill", logical_date=day)
    found = manifests(run_dir(output, "zimage_daily_backfill", first))
    assert [m["images"][0]["seed"] for m in found] == [202611020, 202611021]
    assert all("Monday 02 November" in m["request"]["positivePrompt"] for m in found)
    for manifest in found:
        check_images(manifest, RUNWARE_SIZE)
    stored = {m["images"][0]["sha256"] for m in found}
    assert runware.stats["total_accepted"] == 2
    report = xcom(first, "daily_report")
    assert report["images"] == 2 and report["total_cost"] > 0
    first_starts = started(first)

    again = run(examples, "zimage_daily_backfill", logical_date=day)  # cleared and re-run: same run id
    assert again.run_id == first.run_id
    rerun_starts = started(again)
    assert all(rerun_starts[key] > first_starts[key] for key in first_starts)  # every task ran again
    assert runware.stats["total_accepted"] == 2  # nothing submitted, nothing paid
    assert {
        m["images"][0]["sha256"] for m in manifests(run_dir(output, "zimage_daily_backfill", again))
    } == stored

    next_day = run(examples, "zimage_daily_backfill", logical_date=day.add(days=1))
    seeds = [m["images"][0]["seed"] for m in manifests(run_dir(output, "zimage_daily_backfill", next_day))]
    assert seeds == [202611030, 202611031]
    assert runware.stats["total_accepted"] == 4
    assert set(runware.stats["accepted"].values()) == {1}


# -- zimage_local_gpu -----------------------------------------------------------------------------------


def test_local_gpu_dag_generates_the_product_shots_locally(examples, local, output):
    result = run(examples, "zimage_local_gpu")
    rows = products()
    found = manifests(output)
    assert len(found) == len(rows)
    for product, manifest in zip(rows, found, strict=True):
        [image] = check_images(manifest, LOCAL_SIZE)
        assert manifest["backend"] == "local"
        assert image["format"] == "png"
        assert image["seed"] == zlib.crc32(product["sku"].encode())
    assert xcom(result, "summarise")["images"] == len(rows)


# -- make demo ------------------------------------------------------------------------------------------


def demo_module() -> Any:
    spec = importlib.util.spec_from_file_location("zimage_demo", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("env", "backend", "size", "settings"),
    [
        ({}, "tiny", 256, {"backend": "executor", "model_path": None, "api_key": None}),
        (
            {"ZIMAGE_MODEL_PATH": "/models/z-image-turbo"},
            "local",
            1024,
            {"backend": "local", "model_path": "/models/z-image-turbo", "api_key": None},
        ),
        (
            {"RUNWARE_API_KEY": "rw-key", "ZIMAGE_MODEL_PATH": "/ignored", "ZIMAGE_IMAGE_SIZE": "512"},
            "runware",
            512,
            {"backend": "runware", "model_path": None, "api_key": "rw-key"},
        ),
    ],
    ids=["no-key-tiny-model", "model-path", "api-key"],
)
def test_make_demo_picks_the_backend_from_the_environment(tmp_path, env, backend, size, settings):
    from airflow.models.connection import Connection

    from airflow_provider_zimage.hooks.runware import ConnectionSettings

    demo = demo_module()
    choice = demo.choose_backend(env, tmp_path / "tiny")
    assert (choice.name, choice.image_size) == (backend, size)
    airflow_env = demo.airflow_env(choice, tmp_path / "home", tmp_path / "out", {})
    # What the hook reads from AIRFLOW_CONN_ZIMAGE_DEFAULT is what the demo meant.
    conn = Connection.from_json(airflow_env["AIRFLOW_CONN_ZIMAGE_DEFAULT"], conn_id="zimage_default")
    resolved = ConnectionSettings.from_connection(conn)
    expected = dict(settings)
    if expected["model_path"] == "<tiny>":
        expected["model_path"] = str(tmp_path / "tiny")
    assert {k: getattr(resolved, k) for k in expected} == expected
    assert airflow_env["AIRFLOW__CORE__DAGS_FOLDER"] == str(EXAMPLES)
    assert airflow_env["ZIMAGE_IMAGE_SIZE"] == str(size)
    assert airflow_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///")
    if backend == "tiny":
        assert "RANDOM" in choice.notice  # the user is told the pictures are noise, and how to get real ones
        assert "RUNWARE_API_KEY" in choice.notice and "ZIMAGE_MODEL_PATH" in choice.notice


def test_make_demo_ends_with_the_images_tab_of_its_pipeline_run(tmp_path):
    """The URL printed last is the plugin's run view in the UI that `make demo-ui` serves, no login."""
    from airflow_provider_zimage.plugin import ZImagePlugin

    demo = demo_module()
    backend = demo.choose_backend({}, tmp_path / "tiny")
    env = demo.airflow_env(backend, tmp_path / "home", tmp_path / "out", {"ZIMAGE_DEMO_PORT": "8111"})
    manifest = {"dag_id": "zimage_content_pipeline", "run_id": "manual__2026-12-02T19:51:21.333030+00:00"}

    url = demo.images_tab(env, manifest)

    assert url == (
        "http://127.0.0.1:8111/dags/zimage_content_pipeline/runs/"
        "manual__2026-12-02T19%3A51%3A21.333030%2B00%3A00/plugin/zimage-images"
    )
    [run_view] = [v for v in ZImagePlugin.external_views if v["destination"] == "dag_run"]
    assert url.endswith(f"/plugin/{run_view['url_route']}")
    ui = demo.ui_env(env)
    assert ui["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "True"
    assert ui["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:8111"
    assert demo.ui_url({}) == "http://127.0.0.1:8080"
