"""The Images and spend views, served by Airflow's own API app (core apps, SimpleAuthManager) in process.

Manifests are written by the real `ArtifactStore` (which also writes the spend index), images are real
JPEG/PNG files; requests go through Airflow's app so authentication is Airflow's, not a stub's.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from airflow_provider_zimage.storage.artifacts import ArtifactStore, as_path
from airflow_provider_zimage.storage.spend import read_spend, record_manifest
from airflow_provider_zimage.ui.gallery import read_run
from airflow_provider_zimage.ui.links import images_tab_url
from airflow_provider_zimage.ui.pages import format_cost

pytestmark = pytest.mark.usefixtures("airflow_db")

USER, PASSWORD = "ui_viewer", "ui-viewer-password-5d1c"
RUN = "manual__2026-03-01T10:00:00+00:00"


def jpeg(color: str = "red", size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG")
    return out.getvalue()


def write_task(
    store: ArtifactStore,
    dag_id: str,
    task_id: str,
    map_index: int,
    n: int,
    *,
    run_id: str = RUN,
    cost: float = 0.0032,
    failed: list[dict[str, Any]] | None = None,
    nsfw: bool = False,
    real_images: bool = True,
) -> dict[str, Any]:
    """Images and a manifest shaped as `GenerationJob.write_manifest` writes them."""
    directory = store.task_dir(dag_id, run_id, task_id, map_index)
    images = []
    for i in range(n):
        name = f"{max(map_index, 0):03d}-{i:04d}.jpg"
        if real_images:
            artifact = store.write_image(directory, name, jpeg(["red", "green", "blue"][i % 3])).to_dict()
        else:
            artifact = {"uri": str(directory / name), "width": 64, "height": 48, "format": "jpg"}
            artifact.update(bytes=1, sha256=f"{map_index}-{i}")
        images.append(
            {**artifact, "seed": 1000 + i, "model": "runware:z-image@turbo", "cost": cost, "nsfw": nsfw}
        )
    manifest = {
        "version": 1,
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": run_id,
        "map_index": map_index,
        "model": "runware:z-image@turbo",
        "request": {"positivePrompt": f"a lighthouse number {map_index}", "negativePrompt": "blurry"},
        "images": images,
        "total_cost": round(cost * n, 6),
    }
    if failed is not None:
        manifest["failed"] = failed
    store.write_manifest(directory, manifest)
    return manifest


# -- the app ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Airflow's API app as `airflow api-server` builds it (core apps: plugins, auth manager, views)."""
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from fastapi.testclient import TestClient

    passwords = tmp_path_factory.mktemp("auth") / "passwords.json"
    passwords.write_text(json.dumps({USER: PASSWORD}))
    env = {
        "AIRFLOW__CORE__AUTH_MANAGER": (
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    purge_cached_app()
    try:
        with TestClient(create_app("core")) as client:
            yield client
    finally:
        purge_cached_app()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def token(api: Any) -> str:
    answer = api.post("/auth/token", json={"username": USER, "password": PASSWORD})
    assert answer.status_code == 201, answer.text
    return answer.json()["access_token"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ArtifactStore:
    root = tmp_path / "artifacts"
    root.mkdir()
    monkeypatch.setenv("AIRFLOW__ZIMAGE__OUTPUT_PATH", f"file://{root}")
    return ArtifactStore(f"file://{root}")


def run_url(dag_id: str, run_id: str = RUN) -> str:
    from urllib.parse import quote

    return f"/zimage/ui/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def srcs(page: str, kind: str) -> list[str]:
    return re.findall(rf"src='([^']*/{kind}/[^']*)'", page)


# -- reading manifests -----------------------------------------------------------------------------------


def test_a_run_shows_every_manifest_its_failures_and_the_total_of_their_costs(store):
    write_task(store, "shop", "generate", 0, 2, cost=0.0032)
    write_task(store, "shop", "generate", 1, 1, cost=0.0045, nsfw=True)
    write_task(
        store, "shop", "batch", -1, 1, failed=[{"prompt": "a cat", "reason": "invalidPrompt: too long"}]
    )
    write_task(store, "shop", "generate", 0, 5, run_id="manual__another")  # another run: not shown

    run = read_run(store, "shop", RUN)
    assert (run.count, run.manifests) == (4, 3)
    assert run.total_cost == pytest.approx(0.0032 * 2 + 0.0045 + 0.0032)
    assert [(c.task_id, c.map_index) for c in run.cards] == [
        ("batch", -1),
        ("generate", 0),
        ("generate", 0),
        ("generate", 1),
    ]
    assert [(f.task_id, f.prompt, f.reason) for f in run.failures] == [
        ("batch", "a cat", "invalidPrompt: too long")
    ]
    card = run.cards[-1]
    assert (card.prompt, card.negative_prompt, card.seed, card.nsfw) == (
        "a lighthouse number 1",
        "blurry",
        1000,
        True,
    )
    one = read_run(store, "shop", RUN, task_id="generate", map_index=1)
    assert (one.count, one.total_cost) == (1, 0.0045)
    assert read_run(store, "shop", RUN, task_id="generate").count == 3


def test_costs_are_shown_to_the_fraction_of_a_cent_runware_bills():
    assert [format_cost(c) for c in (0.0, 0.0032, 1.5, 0.000125, None)] == [
        "$0.00",
        "$0.0032",
        "$1.50",
        "$0.000125",
        "n/a",
    ]


# -- the spend index -------------------------------------------------------------------------------------


def test_the_spend_index_counts_each_paid_manifest_once_per_dag_and_day(store):
    write_task(store, "shop", "generate", 0, 2, cost=0.003)
    manifest = write_task(store, "shop", "generate", 1, 1, cost=0.003)
    write_task(store, "blog", "generate", -1, 1, cost=0.01)
    # The same manifest written again (a retry that reused its images) replaces its record.
    store.write_manifest(store.task_dir("shop", RUN, "generate", 1), manifest)
    # A regeneration of the same task instance (new images, paid again) adds one.
    write_task(store, "shop", "generate", 1, 1, cost=0.003, real_images=False)

    today = {r.dag_id: r for r in read_spend(store.base, days=1)}
    assert (today["shop"].images, today["shop"].cost, today["shop"].runs) == (4, 0.012, 1)
    assert (today["blog"].images, today["blog"].cost) == (1, 0.01)
    index = as_path(store.base).path + "/.zimage-index/days"
    assert len(list(Path(index).rglob("*.json"))) == 4


def test_a_finished_day_is_folded_into_one_summary_that_later_reads_use(store):
    old = dt.datetime(2026, 2, 1, 12, tzinfo=dt.timezone.utc)
    for index in range(3):
        manifest = {"dag_id": "shop", "run_id": "r", "task_id": "t", "map_index": index, "total_cost": 0.5}
        manifest["images"] = [{"sha256": f"{index}"}]
        record_manifest(store.base, store.base / "x" / str(index), manifest, now=old)
    rows = read_spend(store.base, days=3, today=dt.date(2026, 2, 3))
    assert [(r.day, r.dag_id, r.images, r.cost) for r in rows] == [("2026-02-01", "shop", 3, 1.5)]
    day = Path(as_path(store.base).path) / ".zimage-index" / "days" / "2026-02-01"
    assert (day / "summary.json").exists()
    for record in day.glob("*.json"):
        if record.name != "summary.json":
            record.unlink()
    assert read_spend(store.base, days=3, today=dt.date(2026, 2, 3)) == rows


# -- authentication and authorisation --------------------------------------------------------------------


def test_anonymous_and_forged_requests_are_refused_and_the_webhook_stays_public(api, store):
    write_task(store, "shop", "generate", 0, 1)
    for path in (run_url("shop"), "/zimage/ui/spend", f"{run_url('shop')}/summary.json"):
        assert api.get(path).status_code == 401, path
        assert api.get(path, headers={"Authorization": "Bearer not-a-jwt"}).status_code == 403, path
    thumb = f"{run_url('shop')}/thumbnails/generate/0/000-0000.jpg"
    assert api.get(thumb).status_code == 401
    # The webhook route answers with its own token check, not Airflow's login.
    answer = api.post("/zimage/webhooks/3f1c2a4e-8b7d-4c6e-9a1f-2d3e4f5a6b7c", json={})
    assert (answer.status_code, answer.json()) == (401, {"detail": "missing token"})


def test_a_user_who_may_not_read_a_dag_sees_none_of_its_images(api, token, store, monkeypatch):
    from airflow.api_fastapi.app import get_auth_manager

    write_task(store, "secret_dag", "generate", 0, 1, cost=1.0)
    write_task(store, "shop", "generate", 0, 1, cost=0.25)
    manager = get_auth_manager()
    allowed = manager.is_authorized_dag

    def is_authorized_dag(*, details: Any = None, **kwargs: Any) -> bool:
        return details is not None and details.id != "secret_dag" and allowed(details=details, **kwargs)

    monkeypatch.setattr(manager, "is_authorized_dag", is_authorized_dag)
    auth = {"Authorization": f"Bearer {token}"}
    assert api.get(run_url("secret_dag"), headers=auth).status_code == 403
    assert api.get(f"{run_url('secret_dag')}/images/generate/0/000-0000.jpg", headers=auth).status_code == 403
    assert api.get(run_url("shop"), headers=auth).status_code == 200
    spend = api.get("/zimage/ui/spend.json", headers=auth).json()
    assert {row["dag_id"] for row in spend} == {"shop"}


# -- the Images tab --------------------------------------------------------------------------------------


def test_the_images_tab_shows_count_cost_details_and_serves_thumbnails_made_once(api, token, store):
    write_task(store, "shop", "generate", 0, 2, cost=0.0032)
    write_task(store, "shop", "generate", 1, 1, cost=0.0045)
    api.cookies.set("_token", token)  # the session cookie the Airflow UI holds
    try:
        page = api.get(run_url("shop"))
        assert page.status_code == 200, page.text
        text = page.text
        assert "data-count='3'" in text and "$0.0109" in text
        assert "a lighthouse number 1" in text and "blurry" in text and "runware:z-image@turbo" in text
        assert text.count("loading='lazy'") == 3
        thumbs, fulls = srcs(text, "thumbnails"), re.findall(r"href='([^']*/images/[^']*)'", text)
        assert len(thumbs) == 3 and len(set(fulls)) == 3

        first = api.get(thumbs[0])
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        cached = Path(as_path(store.base).path) / "shop"
        made = sorted(cached.rglob("thumbnails/*.jpg"))
        assert len(made) == 1
        stamp = made[0].stat().st_mtime_ns
        assert api.get(thumbs[0]).content == first.content
        assert made[0].stat().st_mtime_ns == stamp  # served from the cache, not made again

        full = api.get(fulls[0])
        assert full.status_code == 200 and Image.open(io.BytesIO(full.content)).size == (64, 48)
    finally:
        api.cookies.clear()


def test_the_task_instance_tab_shows_one_map_index_or_all_of_them(api, token, store):
    write_task(store, "shop", "generate", 0, 2)
    write_task(store, "shop", "generate", 1, 1)
    write_task(store, "shop", "other", -1, 4)
    auth = {"Authorization": f"Bearer {token}"}
    base = f"{run_url('shop')}/tasks/generate"
    assert "data-count='1'" in api.get(f"{base}?map_index=1", headers=auth).text
    assert "data-count='3'" in api.get(f"{base}?map_index=-1", headers=auth).text
    # The UI leaves {MAP_INDEX} as is where a view has none.
    assert "data-count='3'" in api.get(f"{base}?map_index={{MAP_INDEX}}", headers=auth).text


def test_paths_outside_the_output_folder_or_not_images_are_refused(api, token, store, tmp_path):
    write_task(store, "shop", "generate", 0, 1)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg())
    task_dir = Path(as_path(store.task_dir("shop", RUN, "generate", 0)).path)
    (task_dir / "link.jpg").symlink_to(outside)
    auth = {"Authorization": f"Bearer {token}"}
    files = f"{run_url('shop')}/images"
    assert api.get(f"{files}/generate/0/000-0000.jpg", headers=auth).status_code == 200
    for path in (
        "generate/0/manifest.json",
        "generate/0/.hidden.jpg",
        "generate/0/link.jpg",
        "generate/..%2F..%2F..%2Foutside.jpg/0/x.jpg",
        "generate/-1/000-0000.jpg",
        "..%2F..%2F..%2F..%2F/0/outside.jpg",
        "generate/0/..%2F..%2F..%2F..%2F..%2Foutside.jpg",
    ):
        answer = api.get(f"{files}/{path}", headers=auth)
        assert answer.status_code == 404, (path, answer.status_code)


def test_ten_thousand_images_come_in_pages_of_a_hundred(api, token, store):
    for index in range(10):
        write_task(store, "big", "generate", index, 1000, cost=0.001, real_images=False)
    auth = {"Authorization": f"Bearer {token}"}
    first = api.get(run_url("big"), headers=auth).text
    assert "data-count='10000'" in first and "page 1 of 100" in first and "$10.00" in first
    assert len(srcs(first, "thumbnails")) == 100
    last = api.get(f"{run_url('big')}?page=100", headers=auth).text
    assert len(srcs(last, "thumbnails")) == 100 and "page 100 of 100" in last
    assert "009-0999.jpg" in last and "009-0999.jpg" not in first
    assert len(first) < 200_000  # one page of cards, not ten thousand
    wide = api.get(f"{run_url('big')}?per_page=500&page=2", headers=auth).text
    assert len(srcs(wide, "thumbnails")) == 500 and "page 2 of 20" in wide
    assert api.get(f"{run_url('big')}?per_page=100000", headers=auth).status_code == 422


def test_the_spend_page_lists_images_and_cost_per_dag_per_day(api, token, store):
    write_task(store, "shop", "generate", 0, 2, cost=0.003)
    write_task(store, "blog", "generate", -1, 1, cost=0.01, failed=[{"reason": "x"}])
    page = api.get("/zimage/ui/spend", headers={"Authorization": f"Bearer {token}"}).text
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert "data-images='3'" in page and "$0.016" in page
    assert re.search(
        rf"<td>{today}</td><td><a [^>]*>shop</a></td><td class='num'>1</td><td class='num'>2</td>", page
    )


# -- the extra link and the plugin's registration --------------------------------------------------------


def test_the_extra_link_opens_the_images_tab_for_any_store_without_reading_xcom(monkeypatch):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator, ZImageImageLink

    class Key:
        dag_id, run_id, task_id, map_index = "shop", RUN, "generate", 3

    op = ZImageGenerateOperator(task_id="generate", prompt="a lighthouse", output_path="s3://bucket/x")
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    link = ZImageImageLink().get_link(op, ti_key=Key())
    assert link == (
        "/dags/shop/runs/manual__2026-03-01T10%3A00%3A00%2B00%3A00/tasks/generate/mapped/3"
        "/plugin/zimage-task-images"
    )
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    assert images_tab_url("d", "r") == "https://airflow.example.com/dags/d/runs/r/plugin/zimage-images"


def test_an_extra_link_stored_by_a_run_still_opens_when_the_ui_moves_to_another_port(monkeypatch):
    """Airflow stores the link when the task ends; `make demo` and `make demo-ui` may use other ports."""
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator, ZImageImageLink

    class Key:
        dag_id, run_id, task_id, map_index = "shop", "r", "generate", -1

    op = ZImageGenerateOperator(task_id="generate", prompt="a lighthouse")
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080")
    stored = ZImageImageLink().get_link(op, ti_key=Key())
    assert stored == "/dags/shop/runs/r/tasks/generate/plugin/zimage-task-images"  # no host, no port
    # Behind a proxy below a path, the path stays: the UI resolves the link against its own origin.
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team-a/")
    assert ZImageImageLink().get_link(op, ti_key=Key()) == f"/team-a{stored}"


def test_mapped_instances_are_labelled_by_the_start_of_their_prompt():
    import jinja2

    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    prompt = "Studio product photograph of a red ceramic mug on a wooden table,\nsoft light, catalogue style"
    op = ZImageGenerateOperator(task_id="g", prompt=prompt)
    label = jinja2.Environment().from_string(op.map_index_template).render(task=op)
    assert label.startswith("Studio product photograph of a red ceramic mug on a") and len(label) <= 60
    assert "\n" not in label
    custom = ZImageGenerateOperator(task_id="h", prompt=prompt, map_index_template="{{ ti.map_index }}")
    assert custom.map_index_template == "{{ ti.map_index }}"


def test_the_plugin_declares_the_tabs_and_the_spend_view_for_the_ui():
    from airflow import plugins_manager

    info = {p["name"]: p for p in plugins_manager.get_plugin_info(["external_views"])}
    views = {v["url_route"]: v for v in info["zimage"]["external_views"]}
    assert {k: v["destination"] for k, v in views.items()} == {
        "zimage-images": "dag_run",
        "zimage-task-images": "task_instance",
        "zimage-spend": "nav",
    }
    assert views["zimage-images"]["href"] == "zimage/ui/dags/{DAG_ID}/runs/{RUN_ID}"


# -- turning pages and refusals inside the tab -----------------------------------------------------------


def pager_links(page: str) -> dict[str, str]:
    """The pager's links by their text ("next ›", "last »"...), as the browser would resolve them."""
    import html

    return {
        html.unescape(text): html.unescape(href)
        for href, text in re.findall(r"<a href='([^']*)'>([^<]*)</a>", page)
        if "page=" in href
    }


def test_page_two_of_a_mapped_task_instance_is_reachable_from_its_pager(api, token, store):
    write_task(store, "big", "generate", 3, 150, real_images=False)
    write_task(store, "big", "generate", 4, 150, real_images=False)  # another map index: never shown
    auth = {"Authorization": f"Bearer {token}"}
    first = api.get(f"{run_url('big')}/tasks/generate?map_index=3", headers=auth).text
    assert "data-count='150'" in first and "page 1 of 2" in first
    following = pager_links(first)["next ›"]
    assert following.count("?") == 1, following
    second = api.get(following, headers=auth)
    assert second.status_code == 200, second.text
    assert "page 2 of 2" in second.text and "data-count='150'" in second.text
    thumbs = srcs(second.text, "thumbnails")
    assert len(thumbs) == 50 and all("/generate/3/" in t for t in thumbs)
    back = pager_links(second.text)["« first"]
    assert "map_index=3" in back and "page 1 of 2" in api.get(back, headers=auth).text


def test_a_refusal_or_a_missing_file_inside_the_tab_is_a_small_html_page_not_raw_json(
    api, token, store, monkeypatch
):
    from airflow.api_fastapi.app import get_auth_manager

    write_task(store, "shop", "generate", 0, 1)
    manager = get_auth_manager()
    monkeypatch.setattr(manager, "is_authorized_dag", lambda **kwargs: kwargs["details"].id == "shop")
    auth = {"Authorization": f"Bearer {token}"}
    hostile = "<img src=x onerror=alert(1)>"
    forbidden = api.get(run_url(hostile), headers=auth)
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"].startswith("text/html")
    assert "<img src=x" not in forbidden.text and "&lt;img src=x" in forbidden.text
    assert "not allowed to read DAG" in forbidden.text and '{"detail"' not in forbidden.text
    missing = api.get(f"{run_url('shop')}/images/generate/0/nothing-here.jpg", headers=auth)
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/html")
    assert "is not stored for this run" in missing.text and "Traceback" not in missing.text
    assert token not in forbidden.text + missing.text
    # The JSON views stay JSON for scripts.
    refused = api.get(f"{run_url(hostile)}/summary.json", headers=auth)
    assert refused.status_code == 403 and refused.json()["detail"].startswith("not allowed to read DAG")
    # Logged out, the page still says why, as a page.
    anonymous = api.get(run_url("shop"))
    assert anonymous.status_code == 401 and "Not authenticated" in anonymous.text
    assert anonymous.headers["content-type"].startswith("text/html")
