"""pytest fixtures for testing DAGs that use the Z-Image provider offline, without paying for a picture.

Installed with the provider and loaded by pytest on its own (the `pytest11` entry point `zimage`), so a
user's test needs no conftest to get them:

    def test_quickstart(zimage_connection, zimage_output):
        dag.test()
        assert zimage_connection.server.total_accepted == 1   # one picture paid for, never two

* `zimage_server`: a Runware-compatible API on 127.0.0.1 with its counters and fault scripting;
* `zimage_connection`: the `zimage_default` connection (`AIRFLOW_CONN_ZIMAGE_DEFAULT`) pointing at it;
* `zimage_output`: `[zimage] output_path` set to a fresh folder, where the operators store images;
* `tiny_zimage_model` and `zimage_local_connection`: a tiny random-weight Z-Image checkpoint built
  offline, and a local-backend connection that runs it (needs the `local` extra).

Nothing here imports Airflow, the provider's operators or torch when pytest loads the plugin: Airflow
reads `AIRFLOW_HOME` the moment it is imported, and a plugin is loaded before any conftest can set it,
so every import happens inside a fixture. The plugin needs only pytest itself (no xdist, no other
plugin) and works with `-p no:randomly`, `-p no:cacheprovider` or any other plugin switched off; a
suite that wants none of it runs with `-p no:zimage`. With `PYTEST_DISABLE_PLUGIN_AUTOLOAD=1` it is
loaded by its entry point name, `-p zimage`; naming the module in `pytest_plugins` as well would make
pytest register it twice, which pytest refuses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from airflow_provider_zimage.testing.runware_server import RunwareTestServer

__all__ = [
    "FAST_RETRIES",
    "ZImageTestConnection",
    "connection_json",
    "tiny_zimage_model",
    "zimage_conn_id",
    "zimage_connection",
    "zimage_local_connection",
    "zimage_output",
    "zimage_server",
    "zimage_server_factory",
]

FAST_RETRIES: dict[str, Any] = {"max_retries": 6, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 10}
"""Connection extras of `zimage_connection`: a scripted 429 or dropped answer is retried after
milliseconds rather than seconds; the decisions (retry, reattach, never pay twice) are the same."""


def conn_env_var(conn_id: str) -> str:
    """The environment variable Airflow reads a connection from (`AIRFLOW_CONN_` + upper-cased id)."""
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def connection_json(server: RunwareTestServer, **extra: Any) -> str:
    """A `zimage` connection to `server` as Airflow reads it from the environment (JSON form).

    `extra` overrides `FAST_RETRIES` and adds any other connection extra (`webhook_secret`, ...).
    """
    return json.dumps(
        {
            "conn_type": "zimage",
            "host": server.url,
            "password": server.api_key,
            "extra": {**FAST_RETRIES, **extra},
        }
    )


@dataclass(frozen=True)
class ZImageTestConnection:
    """What `zimage_connection` and `zimage_local_connection` set up.

    `server` is the test server the connection points at (None for the local backend), `env_var` the
    variable that holds it and `uri` its JSON, for a subprocess (`airflow dags test`) that needs it too.
    """

    conn_id: str
    env_var: str
    uri: str = field(repr=False)
    server: RunwareTestServer | None = None
    model_path: Path | None = None


# -- the Runware-compatible server -------------------------------------------------------------------------


@pytest.fixture
def zimage_server_factory() -> Iterator[Callable[..., RunwareTestServer]]:
    """Start test servers with options; every one is stopped when the test ends.

        def test_slow_api(zimage_server_factory):
            server = zimage_server_factory(delay=2.0, api_key="my-key")

    The options are `RunwareTestServer`'s (`delay`, `stagger`, `api_key`, `result_ttl`, `prices`...;
    see `airflow_provider_zimage/testing/runware_server/README.md`).
    """
    # why: the test server needs jsonschema (dev extra); pytest loads this plugin in every session
    from airflow_provider_zimage.testing.runware_server import RunwareTestServer

    servers: list[RunwareTestServer] = []

    def factory(**options: Any) -> RunwareTestServer:
        server = RunwareTestServer(**options).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def zimage_server() -> Iterator[RunwareTestServer]:
    """A Runware-compatible API on 127.0.0.1 (a free port), fresh for each test, stopped after it.

    It accepts what Runware accepts (the published request schema; the API key "test-key"), answers
    with generated pictures and prices them as Runware does, so a DAG runs unchanged against it. What
    a test asserts on:

    * paid submissions: `total_accepted` (every accepted inference task is one Runware would bill) and
      `accepted_submissions(task_uuid)` (how often one task was paid for: a retry must keep it at 1);
    * `stats`: a dict of every counter (requests by type, polls, faults injected, webhooks, uploads...);
    * `request_bodies`: what the provider sent, with API keys replaced by "***".

    Faults are scripted before or during the run: `fail_next(429, retry_after=1)`, `fail_next(503,
    times=3)`, `drop_next(after_accept=True)` (the task is accepted and paid, its answer never arrives),
    `script_faults(rates={"503": 0.2}, seed=1)`, `clear_faults()`; a prompt containing `__fail__` makes
    that task fail and `__nsfw__` flags its image.

    For other options (delays, a different API key) use `zimage_server_factory`.
    """
    # why: the test server needs jsonschema (dev extra); pytest loads this plugin in every session
    from airflow_provider_zimage.testing.runware_server import RunwareTestServer

    with RunwareTestServer() as server:
        yield server


# -- connections and where images go -----------------------------------------------------------------------


@pytest.fixture
def zimage_conn_id() -> str:
    """The connection id the `zimage_*connection` fixtures set: "zimage_default", the operators' default.

    A DAG that names another (`zimage_conn_id="zimage_prod"`) overrides this fixture in its conftest:

        @pytest.fixture
        def zimage_conn_id():
            return "zimage_prod"
    """
    return "zimage_default"


@pytest.fixture
def zimage_connection(
    zimage_server: RunwareTestServer, zimage_conn_id: str, monkeypatch: pytest.MonkeyPatch
) -> ZImageTestConnection:
    """The `zimage_default` connection pointing at `zimage_server`, for this test only.

    Set as `AIRFLOW_CONN_ZIMAGE_DEFAULT` (monkeypatched, so it is gone after the test): every task that
    `dag.test()` runs in this process reads it, and nothing is sent to the real Runware API. Retries
    wait milliseconds (`FAST_RETRIES`). The server is `zimage_connection.server`, the same object as
    the `zimage_server` fixture; see that fixture for its counters and faults.
    """
    uri = connection_json(zimage_server)
    env_var = conn_env_var(zimage_conn_id)
    monkeypatch.setenv(env_var, uri)
    return ZImageTestConnection(zimage_conn_id, env_var, uri, server=zimage_server)


@pytest.fixture
def zimage_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh folder set as `[zimage] output_path` for this test; the operators store images there.

    They write `<dag_id>/<run_id>/<task_id>/<map index or "unmapped">/` with the images and a
    `manifest.json` (prompt, seed, size, cost per image), so a test reads what a run stored from
    `zimage_output.rglob("manifest.json")`.
    """
    root = tmp_path / "zimage-output"
    root.mkdir()
    monkeypatch.setenv("AIRFLOW__ZIMAGE__OUTPUT_PATH", root.as_uri())
    return root


# -- the tiny local model ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_zimage_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of a tiny Z-Image checkpoint with random weights, built offline once per session.

    It has the real architecture at toy sizes (about 4 MB) and loads through the same
    `ZImagePipeline.from_pretrained(folder)` as the published weights, so the local backend runs for
    real on a CPU: a 128x128 image takes about a second. Its pictures are coloured noise; they prove
    the pipeline (DAG, operator, storage, manifest), not the model. Building it takes 5-15 s.

    Skipped, with the reason, when the `local` extra (torch, diffusers, transformers) is not installed.
    """
    pytest.importorskip("diffusers", reason="tiny_zimage_model needs the provider's `local` extra")
    # why: torch and diffusers, the optional `local` extra
    from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

    return build_tiny_zimage(tmp_path_factory.mktemp("zimage") / "tiny-zimage")


@pytest.fixture
def zimage_local_connection(
    tiny_zimage_model: Path, zimage_conn_id: str, monkeypatch: pytest.MonkeyPatch
) -> ZImageTestConnection:
    """The `zimage_default` connection on the local backend, running `tiny_zimage_model`.

    A DAG that leaves the backend to its connection then generates with diffusers in the test process;
    images cost 0. The device is `auto` (the GPU if there is one, else the CPU): an extra as short as
    "cpu" would make Airflow log "Skipping masking for a secret as it's too short" when it loads the
    connection. Ask for small sizes (128-256 px) to keep the test fast.
    """
    extra = {"backend": "local", "model_path": str(tiny_zimage_model)}
    uri = json.dumps({"conn_type": "zimage", "extra": extra})
    env_var = conn_env_var(zimage_conn_id)
    monkeypatch.setenv(env_var, uri)
    return ZImageTestConnection(zimage_conn_id, env_var, uri, model_path=tiny_zimage_model)
