"""Shared test setup: a private AIRFLOW_HOME with SQLite per pytest worker, and the local servers.

Airflow reads AIRFLOW_HOME the moment it is imported, so the environment is set here, at collection,
before any test module imports Airflow.
"""

from __future__ import annotations

import json
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

from airflow_provider_zimage.testing.runware_server.server import RunwareTestServer  # noqa: E402

# Fixtures of the local servers: runware_server, runware_server_factory, moto_s3_server, s3_bucket.
pytest_plugins = ["airflow_provider_zimage.testing.runware_server.fixtures", "tests.s3_server"]

# Retries in tests wait milliseconds, not seconds: the behaviour is the same, the suite stays fast.
FAST_RETRY_EXTRA = {"max_retries": 6, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 10}


def zimage_connection_json(server: RunwareTestServer, **extra: Any) -> str:
    return json.dumps(
        {
            "conn_type": "zimage",
            "host": server.url,
            "password": server.api_key,
            "extra": {**FAST_RETRY_EXTRA, **extra},
        }
    )


@pytest.fixture
def zimage_conn(runware_server: RunwareTestServer, monkeypatch: pytest.MonkeyPatch) -> RunwareTestServer:
    """`zimage_default` pointing at a fresh Runware test server; returns the server for its counters."""
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", zimage_connection_json(runware_server))
    return runware_server


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[None]:
    """The metadata DB that `dag.test()` needs, created once per worker from the ORM."""
    from airflow.utils import db

    db.initdb()
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A random-weight Z-Image model built offline, loaded through the same from_pretrained path as a
    user's real model; one per worker (4 MB, deterministic)."""
    pytest.importorskip("diffusers")
    from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("zimage") / "tiny-zimage")


@pytest.fixture
def output_dir(tmp_path: Any) -> str:
    path = tmp_path / "artifacts"
    path.mkdir()
    return f"file://{path}"
