"""The offline test kit as a user gets it: the pytest plugin that the provider installs, the README's
example run as written in a project of its own, and an example DAG tested end to end with nothing but
the kit's public fixtures.

The README example and the plugin checks run pytest in a subprocess, in a folder outside this
repository: no conftest of ours, no pyproject of ours, the plugin found through its `pytest11` entry
point exactly as in a user's project.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.dagtest import dag_bag_class, dags_folder

REPO = Path(__file__).resolve().parents[1]
README_SECTION = "## Test your DAGs without paying"


def user_env() -> dict[str, str]:
    """This environment without anything of this suite's: no Airflow settings, no xdist, no addopts."""
    drop = ("AIRFLOW", "PYTEST_", "RUNWARE_", "ZIMAGE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def run_pytest(
    project: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=user_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def readme_files() -> dict[str, str]:
    """The python blocks of the README's test-kit section that name their file on their first line."""
    text = (REPO / "README.md").read_text()
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + len(README_SECTION))
    files = {}
    for block in re.findall(r"```python\n(.*?)```", text[start:end], re.S):
        named = re.match(r"# (\S+\.py)\b", block)
        if named:
            files[named.group(1)] = block
    return files


# -- the README example -------------------------------------------------------------------------------


def test_the_readme_example_passes_as_written_in_a_project_of_its_own(tmp_path):
    files = readme_files()
    assert set(files) == {"tests/conftest.py", "tests/test_quickstart.py"}
    project = tmp_path / "my-airflow-project"
    shutil.copytree(REPO / "dags", project / "dags", ignore=shutil.ignore_patterns("__pycache__"))
    for name, source in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(source)

    done = run_pytest(project, "tests", "-p", "no:randomly")

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert re.search(r"\b2 passed\b", done.stdout), done.stdout[-2000:]


# -- the plugin on its own ----------------------------------------------------------------------------

PLAIN_USER_TEST = """
import json
import os

import httpx


def test_the_connection_points_at_the_server_and_faults_are_scripted(zimage_connection, zimage_server):
    conn = json.loads(os.environ["AIRFLOW_CONN_ZIMAGE_DEFAULT"])
    assert conn["conn_type"] == "zimage" and conn["host"] == zimage_server.url
    assert zimage_connection.server is zimage_server
    zimage_server.fail_next(503)
    answer = httpx.post(zimage_server.url, json=[], headers={"Authorization": f"Bearer {conn['password']}"})
    assert answer.status_code == 503
    assert zimage_server.stats["faults_injected"] and zimage_server.total_accepted == 0


def test_the_connection_is_gone_after_the_test():
    assert "AIRFLOW_CONN_ZIMAGE_DEFAULT" not in os.environ
"""


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["-p", "no:xdist", "-p", "no:randomly", "-p", "no:asyncio", "-p", "no:timeout"], {}),
        (["-p", "zimage"], {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}),
    ],
    ids=["other-plugins-off", "autoload-off-p-zimage"],
)
def test_the_plugin_loads_without_other_plugins_and_by_its_entry_point_name(tmp_path, args, env):
    (tmp_path / "test_user.py").write_text(PLAIN_USER_TEST)
    done = run_pytest(tmp_path, *args, "-p", "no:randomly", env={**user_env(), **env})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b2 passed\b", done.stdout), done.stdout[-2000:]


def test_loading_the_plugin_imports_neither_airflow_nor_torch():
    """pytest loads the plugin before any conftest can set AIRFLOW_HOME: importing Airflow then would
    configure it from ~/airflow."""
    probe = (
        "import sys, airflow_provider_zimage.testing.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('airflow', 'torch', 'diffusers')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=user_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


class TestADagWithAnotherConnectionId:
    @pytest.fixture
    def zimage_conn_id(self) -> str:
        return "zimage_prod"

    def test_overriding_zimage_conn_id_sets_that_connection(self, zimage_connection, zimage_server):
        from airflow_provider_zimage.hooks.runware import ZImageHook

        assert zimage_connection.env_var == "AIRFLOW_CONN_ZIMAGE_PROD"
        assert "AIRFLOW_CONN_ZIMAGE_DEFAULT" not in os.environ
        with ZImageHook(zimage_conn_id="zimage_prod") as hook:
            ok, message = hook.test_connection()
        assert ok, message
        assert zimage_server.stats["requests"] == 1


# -- an example DAG end to end, with the public fixtures only ---------------------------------------------


@pytest.fixture(scope="module")
def pipeline_dag_file() -> Path:
    """The example DAGs in this worker's DAGS folder, where `dag.test()` re-parses them (a user's DAGs
    are in theirs)."""
    target = dags_folder() / "zimage_testing_kit"
    shutil.copytree(REPO / "dags", target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return target / "zimage_content_pipeline.py"


@pytest.mark.usefixtures("airflow_db")
def test_the_content_pipeline_pays_once_per_product_through_faults(
    pipeline_dag_file, zimage_connection, zimage_output, monkeypatch
):
    """A rate limit, then an answer lost after Runware accepted the task: six products, six pictures
    paid once each, stored with their manifests, the contact sheet and the gallery."""
    monkeypatch.setenv("ZIMAGE_IMAGE_SIZE", "256")  # read when the DAG file is parsed
    server = zimage_connection.server
    server.fail_next(429, retry_after=0)
    server.drop_next(after_accept=True, task_type="imageInference")
    dag = dag_bag_class()(dag_folder=str(pipeline_dag_file)).get_dag("zimage_content_pipeline")

    run = dag.test()

    assert run.state == "success"
    products = (REPO / "dags" / "data" / "products.csv").read_text().splitlines()[1:]
    paid = server.stats["accepted"]
    assert server.total_accepted == len(paid) == len(products) == 6
    assert set(paid.values()) == {1}  # the dropped answer was recovered, not paid for again
    assert server.stats["faults_injected"] == {"429": 1, "drop_after_accept": 1}

    [run_folder] = (zimage_output / "zimage_content_pipeline").iterdir()
    manifests = sorted(
        (json.loads(p.read_text()) for p in run_folder.rglob("manifest.json")), key=lambda m: m["map_index"]
    )
    assert [m["map_index"] for m in manifests] == list(range(6))
    assert {m["task_uuid"] for m in manifests} == set(paid)
    images: list[dict[str, Any]] = [m["images"][0] for m in manifests]
    for image in images:
        stored = Path(image["uri"].removeprefix("file://"))
        assert stored.is_relative_to(run_folder) and stored.stat().st_size == image["bytes"]
        assert (image["width"], image["height"]) == (256, 256) and image["cost"] > 0
    skus = [row.split(",")[0] for row in products]
    assert [image["seed"] for image in images] == [zlib.crc32(sku.encode()) for sku in skus]
    assert (run_folder / "contact_sheet.png").is_file() and (run_folder / "gallery.html").is_file()
