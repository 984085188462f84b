"""The Images tab in a real browser: `airflow api-server` on loopback, a DAG run that stored images, and
headless Chromium looking at the run's page the way a user does.

The example DAG `zimage_content_pipeline` runs with `airflow dags test` against the Runware test server
(6 products, 6 paid images); then the API server starts with the simple auth manager and one test user,
Chromium gets that user's session cookie, opens the run's "Images" tab, and the test reads the plugin's
iframe: every thumbnail loaded (`naturalWidth > 0`), the cost shown is the manifests' total, and the
same pages are refused once the browser is logged out. The screenshot is kept under
`$ZIMAGE_TEST_ARTIFACTS` (default `tests/artifacts/`).

Chromium is Debian's `chromium` package: found on PATH or installed with apt-get when the test runs as
root; otherwise the test is skipped with the reason (ZIMAGE_BROWSER_INSTALL=0 forbids installing).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from airflow_provider_zimage.testing.runware_server.server import RunwareTestServer
from airflow_provider_zimage.ui.links import images_tab_url
from airflow_provider_zimage.ui.pages import format_cost
from tests.browser import chromium, find_chromium
from tests.e2e.harness import free_port

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("ZIMAGE_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
DAG_ID = "zimage_content_pipeline"
USER = "browser"


@pytest.fixture(scope="module")
def browser_binary() -> str:
    path, why = find_chromium(install=os.environ.get("ZIMAGE_BROWSER_INSTALL", "1") != "0")
    if path is None:
        pytest.skip(f"browser test needs Chromium: {why}")
    return path


class Airflow:
    """A private AIRFLOW_HOME with the example DAGs, and its api-server once `serve()` started it."""

    def __init__(self, home: Path, server: RunwareTestServer) -> None:
        self.home, self.port = home, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        self.output = home / "artifacts"
        self.proc: subprocess.Popen[bytes] | None = None
        shutil.copytree(REPO / "dags", home / "dags", ignore=shutil.ignore_patterns("__pycache__"))
        (home / "passwords.json").write_text(json.dumps({USER: self.password}))
        connection = {
            "conn_type": "zimage",
            "host": server.url,
            "password": server.api_key,
            "extra": {"max_retries": 6, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 10},
        }
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        base.pop("PYTEST_XDIST_WORKER", None)
        self.env = {
            **base,
            "PYTHONPATH": str(REPO),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__ZIMAGE__OUTPUT_PATH": self.output.as_uri(),
            "AIRFLOW_CONN_ZIMAGE_DEFAULT": json.dumps(connection),
            "ZIMAGE_IMAGE_SIZE": "256",
        }

    def airflow(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "airflow", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, (
            f"airflow {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done.stdout

    def serve(self) -> None:
        log = open(self.home / "api-server.log", "wb")  # closed with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.home / "api-server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(
            "api-server did not answer: " + (self.home / "api-server.log").read_text()[-3000:]
        )

    def token(self) -> str:
        answer = httpx.post(f"{self.url}/auth/token", json={"username": USER, "password": self.password})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["access_token"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, browser_binary: str) -> Iterator[Airflow]:
    with RunwareTestServer() as server:
        deployment = Airflow(tmp_path_factory.mktemp("browser-airflow"), server)
        try:
            deployment.airflow("db", "migrate")
            deployment.airflow("dags", "test", DAG_ID)
            assert server.total_accepted == 6
            deployment.serve()
            yield deployment
        finally:
            deployment.stop()


def manifests(airflow: Airflow) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((airflow.output / DAG_ID).rglob("manifest.json"))]


def images_tab() -> str:
    """JavaScript reaching into the plugin's iframe (same origin) on the run page."""
    return "document.querySelector('iframe[title=\"Images\"]')?.contentDocument"


def test_the_images_tab_of_a_run_shows_every_thumbnail_and_the_manifests_cost(airflow, browser_binary):
    found = manifests(airflow)
    assert len(found) == 6
    run_id = found[0]["run_id"]
    expected_cost = round(sum(m["total_cost"] for m in found), 6)
    assert expected_cost > 0
    # The URL `make demo` prints and the operator's extra link points at.
    tab = images_tab_url(DAG_ID, run_id, base_url=airflow.url)

    with chromium(browser_binary) as open_page:
        page = open_page()
        page.call("Network.setCookie", name="_token", value=airflow.token(), url=airflow.url, httpOnly=True)
        page.goto(tab)
        doc = images_tab()
        page.wait_for(f"!!{doc}?.querySelector('#summary')", timeout=90, what="the Images tab's iframe")
        count = page.evaluate(f"{doc}.querySelectorAll('img.thumb').length")
        assert count == 6
        # Lazy thumbnails load as they scroll into view: bring each one in, then wait for all.
        page.evaluate(f"[...{doc}.querySelectorAll('img.thumb')].forEach(i => i.scrollIntoView()) || true")
        widths = page.wait_for(
            f"(() => {{ const w = [...{doc}.querySelectorAll('img.thumb')]"
            ".map(i => i.complete ? i.naturalWidth : 0); return w.every(x => x > 0) && w; })()",
            timeout=60,
            what="every thumbnail to load",
        )
        assert len(widths) == 6 and all(0 < w <= 256 for w in widths)
        summary = page.evaluate(
            f"(() => {{ const s = {doc}.querySelector('#summary');"
            " return {count: s.dataset.count, cost: s.dataset.totalCost,"
            " shown: s.querySelector('.total-cost').innerText}; })()"
        )
        assert int(summary["count"]) == 6
        assert float(summary["cost"]) == pytest.approx(expected_cost, abs=1e-9)
        assert summary["shown"] == format_cost(expected_cost)
        # Prompts are whole and wrapped: no card cuts one off or scrolls sideways.
        prompts = page.evaluate(
            f"[...{doc}.querySelectorAll('p.prompt:not(.neg)')]"
            ".map(p => ({text: p.innerText, fits: p.scrollWidth <= p.clientWidth,"
            " ems: p.clientHeight / parseFloat(getComputedStyle(p).fontSize)}))"
        )
        expected_prompts = sorted(m["request"]["positivePrompt"] for m in found)
        assert sorted(p["text"] for p in prompts) == expected_prompts
        assert all(p["fits"] for p in prompts), prompts
        assert all(p["ems"] > 2 for p in prompts), prompts  # ~120 characters in a card: several lines
        page.evaluate(f"{doc}.defaultView.scrollTo(0, 0) || true")
        time.sleep(0.5)
        shot = page.screenshot(ARTIFACTS / "images-tab.png")
        assert shot.stat().st_size > 10_000

        # Logged out: the plugin's pages and files are refused, not merely hidden by the UI.
        page.call("Network.clearBrowserCookies")
        frame_url = f"{airflow.url}/zimage/ui/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
        statuses = page.evaluate(
            f"Promise.all(['{frame_url}', '{frame_url}/summary.json', '{airflow.url}/zimage/ui/spend']"
            ".map(u => fetch(u).then(r => r.status)))"
        )
        assert statuses == [401, 401, 401]
        page.goto(frame_url)
        text = page.wait_for("document.body && document.body.innerText", what="the refusal")
        assert "Not authenticated" in text and "lighthouse" not in text


def test_mapped_instances_show_their_sku_labels(airflow):
    """The DAG's map_index_template: the task instances are named by product, not 0-5."""
    token = airflow.token()
    run_id = manifests(airflow)[0]["run_id"]
    answer = httpx.get(
        f"{airflow.url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
        "/taskInstances/generate/listMapped",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert answer.status_code == 200, answer.text
    labels = sorted(ti["rendered_map_index"] for ti in answer.json()["task_instances"])
    skus = sorted(
        line.split(",")[0] for line in (REPO / "dags/data/products.csv").read_text().splitlines()[1:]
    )
    assert labels == skus


def test_page_two_of_a_mapped_task_instance_opens_from_its_pager_and_a_missing_file_is_a_page(
    airflow, browser_binary
):
    from airflow_provider_zimage.storage.artifacts import ArtifactStore
    from tests.test_ui import write_task

    run_id = manifests(airflow)[0]["run_id"]
    write_task(
        ArtifactStore(airflow.output.as_uri()), DAG_ID, "many", 7, 150, run_id=run_id, real_images=False
    )
    frame = f"{airflow.url}/zimage/ui/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"
    with chromium(browser_binary) as open_page:
        page = open_page()
        page.call("Network.setCookie", name="_token", value=airflow.token(), url=airflow.url, httpOnly=True)
        page.goto(f"{frame}/tasks/many?map_index=7")
        page.wait_for("!!document.querySelector('.where')", what="page 1 of the mapped instance")
        page.evaluate(
            "[...document.querySelectorAll('nav.pages a')].find(a => a.innerText.startsWith('next')).click()"
            " || true"
        )
        where = page.wait_for(
            "(document.querySelector('.where')?.innerText || '').includes('page 2') && location.search",
            what="page 2 after clicking next",
        )
        assert "map_index=7" in where and "page=2" in where
        cards = page.evaluate("[...document.querySelectorAll('figure.card')].map(f => f.innerText)")
        assert len(cards) == 50 and all("many[7]" in card for card in cards)
        page.screenshot(ARTIFACTS / "mapped-page-2.png")

        page.goto(f"{frame}/images/many/7/not-stored.jpg")
        text = page.wait_for("document.body && document.body.innerText", what="the 404 page")
        assert text.startswith("404 Not Found") and "not-stored.jpg" in text and '"detail"' not in text
        page.screenshot(ARTIFACTS / "error-page.png")
