"""Shared test setup: a private AIRFLOW_HOME with SQLite per pytest worker, and the local servers.

Airflow reads AIRFLOW_HOME the moment it is imported, so the environment is set here, at collection,
before any test module imports Airflow.
"""

from __future__ import annotations

import os
import tempfile

_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
_home = tempfile.mkdtemp(prefix=f"zimage-airflow-{_worker}-")
os.environ["AIRFLOW_HOME"] = _home
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(_home, "dags")
os.environ["AIRFLOW__ZIMAGE__OUTPUT_PATH"] = f"file://{_home}/zimage-artifacts"
os.environ.pop("AIRFLOW_CONN_ZIMAGE_DEFAULT", None)
# Triggers run in the test process here, where Airflow's deferral race cannot happen: no hold.
os.environ["AIRFLOW__ZIMAGE__DEFERRAL_SETTLE_SECONDS"] = "0"
os.environ.pop("RUNWARE_API_KEY", None)

from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from airflow_provider_zimage.testing.pytest_plugin import ZImageTestConnection, connection_json  # noqa: E402
from airflow_provider_zimage.testing.runware_server.server import RunwareTestServer  # noqa: E402

# The offline test kit (zimage_server, zimage_connection, zimage_output, tiny_zimage_model...) comes
# from the provider's own pytest plugin, loaded through its `pytest11` entry point exactly as in a
# user's project; tests.s3_server adds moto_s3_server and s3_bucket.
pytest_plugins = ["tests.s3_server"]

# The JSON of `zimage_connection` (retries after milliseconds), for tests that set connections themselves.
zimage_connection_json = connection_json


# The suite's older names for the kit's fixtures, used by most test files: the same fixtures, so the
# project tests exactly what a user gets.


@pytest.fixture
def runware_server(zimage_server: RunwareTestServer) -> RunwareTestServer:
    return zimage_server


@pytest.fixture
def runware_server_factory(zimage_server_factory: Any) -> Any:
    return zimage_server_factory


@pytest.fixture
def zimage_conn(zimage_connection: ZImageTestConnection) -> RunwareTestServer:
    """`zimage_default` pointing at a fresh Runware test server; returns the server for its counters."""
    assert zimage_connection.server is not None
    return zimage_connection.server


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[None]:
    """The metadata DB that `dag.test()` needs, created once per worker from the ORM."""
    from airflow.utils import db

    db.initdb()
    yield


@pytest.fixture(scope="session")
def tiny_model(tiny_zimage_model: Any) -> Any:
    return tiny_zimage_model


@pytest.fixture
def output_dir(tmp_path: Any) -> str:
    path = tmp_path / "artifacts"
    path.mkdir()
    return f"file://{path}"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny-model tests on one torch thread: with torch's default two on 2 shared cores (and `-n 2`)
    they oversubscribe and take minutes instead of seconds."""
    import torch  # why: only tests of the local backends need torch; conftest imports without it

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
