"""A real Airflow 3 deployment on loopback, one process per component, for the e2e scenarios.

What `airflow standalone` runs, started one by one so a scenario can kill and restart each of them:
`airflow api-server`, `scheduler`, `dag-processor` and `triggerer`, with SQLite and the LocalExecutor
(standalone forces both for a laptop), the simple auth manager, a fresh AIRFLOW_HOME in a temp dir,
plus the Runware test server (`python -m airflow_provider_zimage.testing.runware_server`) as its own
process, and, for the scenarios that need one, a `zimage-executor` (`start_executor`, connection
`zimage_executor`, killed and restarted like any component). The test process never imports
Airflow's ORM: it talks to the deployment only through the public REST API (JWT from
`POST /auth/token`), the Runware server's control API and the files the deployment writes.

Process hygiene, because a leaked scheduler keeps burning the CI machine's two cores:
- every component starts in its own session (`start_new_session`), so its whole process group (the
  LocalExecutor's workers and their task processes included) is signalled at once;
- `stop()` remembers the whole process tree before signalling, and finally SIGKILLs whatever of it
  survived, plus any process still carrying `ZIMAGE_E2E_RUN=<id>` in its environment (a task process
  re-parented to init after its supervisor died);
- every wait in this module has a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_MARKER = "ZIMAGE_E2E_RUN"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")

T = TypeVar("T")


class E2EError(AssertionError):
    """A deployment that did not do what a scenario waited for (with the evidence in the message)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.5, what: str = "condition"
) -> T:
    """Poll `predicate` until it returns something truthy; raise E2EError after `timeout` seconds.

    Exceptions from the predicate count as "not yet" (a component restarting refuses connections), but
    the last one is reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise E2EError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


# -- processes ------------------------------------------------------------------------------------------


@dataclass
class Component:
    """One long-running process of the deployment and the file its output goes to."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)  # on top of the deployment's, for this one only

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # start_new_session made the component its process group's leader: pgid == pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _alive(proc: psutil.Process | subprocess.Popen[bytes]) -> bool:
    if isinstance(proc, subprocess.Popen):
        return proc.poll() is None
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked_processes(run_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(RUN_MARKER) == run_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def cpu_of(procs: Iterable[psutil.Process]) -> float:
    """CPU seconds of these processes, their reaped children included."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def cpu_of_tree(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        return cpu_of([root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0.0


# -- the deployment -------------------------------------------------------------------------------------


@dataclass
class DeploymentConfig:
    """Knobs of one deployment; the defaults are what the scenarios were measured with."""

    parallelism: int = 16
    api_key: str = field(default_factory=lambda: f"e2e-api-key-{secrets.token_hex(12)}")
    webhook_secret: str = field(default_factory=lambda: f"e2e-webhook-secret-{secrets.token_hex(12)}")
    runware_delay: float = 0.0
    connection_extra: dict[str, Any] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)


class Deployment:
    """Scheduler, dag-processor, triggerer and api-server of one AIRFLOW_HOME, plus the Runware server.

    Use as a context manager; `stop()` always runs and always leaves no process behind.
    """

    def __init__(self, dag_files: dict[str, str], config: DeploymentConfig | None = None) -> None:
        self.config = config or DeploymentConfig()
        self.run_id = uuid.uuid4().hex
        self.home = Path(tempfile.mkdtemp(prefix="zimage-e2e-"))
        self.dags_folder = self.home / "dags"
        self.log_folder = self.home / "logs"
        self.component_logs = self.home / "component-logs"
        self.artifacts = self.home / "artifacts"
        for folder in (self.dags_folder, self.log_folder, self.component_logs, self.artifacts):
            folder.mkdir(parents=True)
        for name, source in dag_files.items():
            (self.dags_folder / f"{name}.py").write_text(source)
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.runware_url = ""
        self.components: dict[str, Component] = {}
        self.runware: Component | None = None
        self.api: AirflowAPI | None = None
        self.control: RunwareControl | None = None
        self._env: dict[str, str] = {}
        self._seen: list[psutil.Process] = []
        self.password = secrets.token_urlsafe(16)  # of the REST API user `e2e`
        self.startup_seconds = 0.0
        # A zimage-executor is started only by the scenarios that use it (`start_executor`); its port
        # and token are fixed now so the `zimage_executor` connection can be in every component's env.
        self.executor_port = free_port()
        self.executor_token = f"e2e-executor-token-{secrets.token_hex(12)}"

    # -- environment ------------------------------------------------------------------------------

    @property
    def output_path(self) -> str:
        return f"file://{self.artifacts}"

    def connection_json(self) -> str:
        extra = {
            # Retries inside the hook wait milliseconds, as in the unit suite: same behaviour, less wall time.
            "max_retries": 6,
            "backoff_base": 0.01,
            "backoff_max": 0.05,
            "timeout": 15,
            "webhook_secret": self.config.webhook_secret,
            "webhook_base_url": self.api_url,
            **self.config.connection_extra,
        }
        return json.dumps(
            {"conn_type": "zimage", "host": self.runware_url, "password": self.config.api_key, "extra": extra}
        )

    @property
    def executor_origin(self) -> str:
        return f"http://127.0.0.1:{self.executor_port}"

    def executor_connection_json(self) -> str:
        """`zimage_executor`: the executor started by `start_executor` (backend `executor`)."""
        extra = {"backend": "executor", "max_retries": 6, "backoff_base": 0.01, "backoff_max": 0.05}
        return json.dumps(
            {
                "conn_type": "zimage",
                "host": f"{self.executor_origin}/v1",
                "password": self.executor_token,
                "extra": {**extra, "timeout": 15},
            }
        )

    def env(self) -> dict[str, str]:
        """The environment of every Airflow process: what standalone sets, plus short timeouts.

        Nothing AIRFLOW-prefixed is inherited: the unit suite's conftest points AIRFLOW_HOME elsewhere.
        """
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        base.pop("PYTEST_XDIST_WORKER", None)
        p = self.config.parallelism
        env = {
            **base,
            RUN_MARKER: self.run_id,
            "PYTHONPATH": str(REPO_ROOT),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
            # What `airflow standalone` forces: LocalExecutor and the simple auth manager.
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "e2e:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            # Generated once here: components started separately would otherwise each invent their own
            # and reject each other's tokens.
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.log_folder),
            # Load: 200 mapped task instances of one DAG run must all be allowed to run at once.
            "AIRFLOW__CORE__PARALLELISM": str(p),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "1024",
            "AIRFLOW__CORE__DEFAULT_POOL_TASK_SLOT_COUNT": "1024",
            "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "64",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            # Failure detection in seconds, not minutes. A killed task runner is reported by its
            # supervisor at once; a worker lost with its supervisor only by this heartbeat timeout
            # (kept well above the 5 s heartbeat so a busy machine raises no false alarms); a killed
            # triggerer's triggers move once its heartbeat is older than the health threshold.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "5",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "8",
            "AIRFLOW__TRIGGERER__CAPACITY": "1000",
            # The DAG files never change during a run: parse them once, not every 30 s on two cores.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
            "AIRFLOW__ZIMAGE__OUTPUT_PATH": self.output_path,
            "AIRFLOW_CONN_ZIMAGE_DEFAULT": self.connection_json(),
            "AIRFLOW_CONN_ZIMAGE_EXECUTOR": self.executor_connection_json(),
            **self.config.extra_env,
        }
        return env

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> Deployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, *, timeout: float = 240) -> None:
        t0 = time.monotonic()
        self._start_runware()
        self._env = self.env()
        self._migrate(timeout=timeout)
        # The simple auth manager reads passwords from this file and only generates missing ones.
        (self.home / "passwords.json").write_text(json.dumps({"e2e": self.password}))
        for name in COMPONENTS:
            self.components[name] = Component(name, self._argv(name), self.component_logs / f"{name}.log")
            self.start_component(name)
        self.api = AirflowAPI(self.api_url, "e2e", self.password)
        self.wait_healthy(timeout=max(30.0, timeout - (time.monotonic() - t0)))
        self.startup_seconds = time.monotonic() - t0

    def _argv(self, name: str) -> list[str]:
        airflow = [sys.executable, "-m", "airflow"]
        if name == "api-server":
            return [*airflow, "api-server", "--port", str(self.api_port), "--host", "127.0.0.1"]
        return [*airflow, name]

    def _popen(self, argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _start_runware(self) -> None:
        url_file = self.home / "runware.url"
        argv = [
            sys.executable,
            "-m",
            "airflow_provider_zimage.testing.runware_server",
            "--port",
            "0",
            "--api-key",
            self.config.api_key,
            "--delay",
            str(self.config.runware_delay),
            "--url-file",
            str(url_file),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env[RUN_MARKER] = self.run_id
        self.runware = Component("runware", argv, self.component_logs / "runware.log")
        self.runware.proc = self._popen(argv, self.runware.log_path, env)

        def url() -> str:
            if self.runware is not None and not self.runware.running:
                raise E2EError(f"runware server exited: {self.runware.log_path.read_text()[-2000:]}")
            return url_file.read_text().strip() if url_file.exists() else ""

        self.runware_url = wait_until(url, timeout=30, interval=0.1, what="the Runware test server")
        self.control = RunwareControl(self.runware_url)

    def _migrate(self, *, timeout: float) -> None:
        with open(self.component_logs / "db-migrate.log", "wb") as log:
            result = subprocess.run(
                [sys.executable, "-m", "airflow", "db", "migrate"],
                cwd=REPO_ROOT,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=True,
            )
        if result.returncode != 0:
            raise E2EError(f"airflow db migrate failed: {self.component_log('db-migrate')[-3000:]}")

    def start_component(self, name: str) -> None:
        comp = self.components[name]
        if comp.running:
            raise E2EError(f"{name} is already running")
        with open(comp.log_path, "ab") as log:
            log.write(f"\n===== start #{comp.starts + 1} at {time.time():.3f} =====\n".encode())
        comp.proc = self._popen(comp.argv, comp.log_path, {**self._env, **comp.env})
        comp.starts += 1

    def kill_component(self, name: str, sig: int = signal.SIGKILL, *, timeout: float = 30) -> None:
        """Signal the component's whole process group and wait until it is gone."""
        comp = self.components[name]
        if comp.proc is None:
            return
        _signal_group(comp.proc, sig)
        try:
            comp.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(comp.proc, signal.SIGKILL)
            comp.proc.wait(timeout=10)
        # Children that outlive a SIGKILLed leader keep the group id; make sure they are gone too.
        _signal_group(comp.proc, signal.SIGKILL)

    def restart_component(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.kill_component(name, sig)
        self.start_component(name)

    # -- the zimage-executor ----------------------------------------------------------------------

    def start_executor(self, model: str | Path, *args: str, timeout: float = 180) -> dict[str, Any]:
        """(Re)start the `executor` component on its fixed port with `args` (`--output-dir D`, ...)
        and wait for its /health; one CPU thread, so the Airflow components keep the other core."""
        token_file = self.home / "executor.token"
        token_file.write_text(self.executor_token)
        token_file.chmod(0o600)
        argv = [sys.executable, "-m", "airflow_provider_zimage.executor", "serve", "--devices", "cpu"]
        argv += ["--host", "127.0.0.1", "--port", str(self.executor_port), "--token-file", str(token_file)]
        argv += ["--model", f"runware:z-image@turbo={model}", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update({RUN_MARKER: self.run_id, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        previous = self.components.get("executor")
        comp = Component("executor", argv, self.component_logs / "executor.log", env=env)
        comp.starts = previous.starts if previous is not None else 0
        if previous is not None and previous.running:
            raise E2EError("the executor is already running")
        self.components["executor"] = comp
        self.start_component("executor")

        def healthy() -> dict[str, Any] | None:
            if not comp.running:
                raise E2EError(f"the executor exited: {self.component_log('executor')[-3000:]}")
            health = self.executor_health()
            return health if health.get("status") == "ok" else None

        return wait_until(healthy, timeout=timeout, interval=0.2, what="the zimage-executor")

    def executor_health(self) -> dict[str, Any]:
        return httpx.get(f"{self.executor_origin}/health", timeout=5).json()

    def executor_metric(self, name: str) -> float:
        """The sum of a Prometheus counter/gauge over its labels, from the running executor."""
        text = httpx.get(f"{self.executor_origin}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            head = line.split(" ", 1)[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        """SIGTERM every group, then SIGKILL whatever is left, including re-parented orphans."""
        procs = [c.proc for c in self.components.values() if c.proc is not None]
        if self.runware is not None and self.runware.proc is not None:
            procs.append(self.runware.proc)
        # Remembered before anything dies: once a parent is gone its children are re-parented to
        # init and no longer findable through the tree.
        below = self.descendants()
        self._seen = list(below)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                self._seen.append(psutil.Process(proc.pid))
        for proc in procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for straggler in [*below, *_marked_processes(self.run_id)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                straggler.kill()
        if self.api is not None:
            self.api.close()
        if self.control is not None:
            self.control.close()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each component's process tree (finished children included).

        Reported with the figures: on two cores, CPU, not the Runware server, sets the pace.
        """
        out: dict[str, float] = {}
        comps = list(self.components.values()) + ([self.runware] if self.runware is not None else [])
        for comp in comps:
            if comp.proc is None or comp.proc.poll() is not None:
                continue
            out[comp.name] = round(cpu_of_tree(comp.proc.pid), 1)
        return out

    def leftover_processes(self) -> list[int]:
        """Processes of this deployment still alive (after `stop()` this must be empty)."""
        alive = {p.pid for p in self._seen if _alive(p)}
        return sorted(alive | {p.pid for p in _marked_processes(self.run_id)})

    # -- readiness --------------------------------------------------------------------------------

    def wait_healthy(self, *, timeout: float = 120) -> dict[str, Any]:
        """Until the API answers and scheduler, triggerer and dag-processor report healthy heartbeats."""
        assert self.api is not None

        def healthy() -> dict[str, Any] | None:
            for comp in (self.components[name] for name in COMPONENTS):
                if comp.proc is not None and comp.proc.poll() is not None:
                    raise E2EError(f"{comp.name} exited early:\n{self.component_log(comp.name)[-4000:]}")
            health = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()
            parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
            if all((health.get(p) or {}).get("status") == "healthy" for p in parts):
                return health
            return None

        return wait_until(healthy, timeout=timeout, interval=1, what="a healthy deployment")

    def wait_for_dags(self, dag_ids: Iterable[str], *, timeout: float = 180) -> None:
        assert self.api is not None
        api = self.api
        wanted = set(dag_ids)

        def parsed() -> bool:
            errors = api.get("/api/v2/importErrors").get("import_errors", [])
            if errors:
                raise E2EError(f"DAG import errors: {errors}")
            dags = api.get("/api/v2/dags", params={"limit": 100}).get("dags", [])
            return wanted <= {d["dag_id"] for d in dags}

        wait_until(parsed, timeout=timeout, interval=1, what=f"DAGs {sorted(wanted)} to be parsed")

    # -- evidence ---------------------------------------------------------------------------------

    def component_log(self, name: str) -> str:
        path = self.component_logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def task_log_files(self, dag_id: str | None = None) -> list[Path]:
        root = self.log_folder
        files = [p for p in root.rglob("*") if p.is_file()]
        if dag_id is not None:
            files = [p for p in files if f"dag_id={dag_id}" in p.parts]
        return sorted(files)

    def task_log_text(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
        """Every try's log of one task instance, from the log folder (`dag_id=/run_id=/task_id=/...`)."""
        base = self.log_folder / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        if map_index >= 0:
            base = base / f"map_index={map_index}"
        if not base.exists():
            return ""
        return "\n".join(p.read_text(errors="replace") for p in sorted(base.glob("attempt=*")))

    def descendants(self) -> list[psutil.Process]:
        """Every live process below the components (LocalExecutor workers, task runners, ...).

        Found through the process tree, not the environment marker: setproctitle rewrites the memory
        that /proc/<pid>/environ shows, so a task runner's marker may no longer be readable.
        """
        out: list[psutil.Process] = []
        for comp in [*self.components.values(), self.runware]:
            if comp is None or comp.proc is None:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                out.extend(psutil.Process(comp.proc.pid).children(recursive=True))
        return out

    def task_processes(self) -> list[psutil.Process]:
        """Task runner processes: `airflow worker -- <ti id>` after setproctitle (the LocalExecutor's
        own workers are titled `airflow worker -- LocalExecutor: ...`)."""
        out = []
        for proc in self.descendants():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                cmd = " ".join(proc.cmdline())
                if cmd.startswith("airflow worker -- ") and "LocalExecutor" not in cmd:
                    out.append(proc)
        return out


# -- REST clients ---------------------------------------------------------------------------------------


class AirflowAPI:
    """The public REST API (v2) with a JWT from the simple auth manager; records every response body.

    The recording is what the secrets scenario searches: "no API response of the deployment".
    """

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url
        self.username = username
        self.password = password
        self.client = httpx.Client(base_url=base_url, timeout=30)
        self.responses: list[str] = []
        self._token: str | None = None

    def close(self) -> None:
        self.client.close()

    def token(self, *, refresh: bool = False) -> str:
        if self._token is None or refresh:
            resp = self.client.post(
                "/auth/token", json={"username": self.username, "password": self.password}
            )
            if resp.status_code != 201:
                raise E2EError(f"POST /auth/token: {resp.status_code} {resp.text[:500]}")
            self.responses.append(resp.text)
            self._token = resp.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call, re-authenticating once on 401 and retrying while the API server restarts."""
        deadline = time.monotonic() + 90
        extra_headers = kwargs.pop("headers", {})
        while True:
            try:
                headers = {**extra_headers, "Authorization": f"Bearer {self.token()}"}
                resp = self.client.request(method, path, headers=headers, **kwargs)
                if resp.status_code == 401:
                    headers = {**extra_headers, "Authorization": f"Bearer {self.token(refresh=True)}"}
                    resp = self.client.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
                continue
            self.responses.append(resp.text)
            return resp

    def get(self, path: str, **kwargs: Any) -> Any:
        resp = self.request("GET", path, **kwargs)
        if resp.status_code >= 400:
            raise E2EError(f"GET {path}: {resp.status_code} {resp.text[:1000]}")
        return resp.json() if "json" in resp.headers.get("content-type", "") else resp.text

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = self.request(
            "POST",
            f"/api/v2/dags/{dag_id}/dagRuns",
            json={"dag_run_id": run_id, "logical_date": None, "conf": conf or {}},
        )
        if resp.status_code >= 400:
            raise E2EError(f"triggering {dag_id}: {resp.status_code} {resp.text[:1000]}")
        return resp.json()

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")

    def wait_dag_run(
        self, dag_id: str, run_id: str, *, timeout: float, on_poll: Callable[[], None] | None = None
    ) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            if on_poll is not None:
                on_poll()
            run = self.dag_run(dag_id, run_id)
            return run if run["state"] in ("success", "failed") else None

        try:
            return wait_until(finished, timeout=timeout, interval=2, what=f"dag run {dag_id}/{run_id}")
        except E2EError as exc:
            states = self.state_counts(dag_id, run_id)
            raise E2EError(f"{exc}; task states: {states}") from None

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self.get(
                f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": len(out)},
            )
            out.extend(page["task_instances"])
            if not page["task_instances"] or len(out) >= page["total_entries"]:
                return out

    def state_counts(self, dag_id: str, run_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ti in self.task_instances(dag_id, run_id):
            key = f"{ti['task_id']}:{ti['state']}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str, map_index: int = -1) -> Any:
        resp = self.request(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"map_index": map_index, "deserialize": True},
        )
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise E2EError(f"xcom {task_id}[{map_index}] {key}: {resp.status_code} {resp.text[:500]}")
        return resp.json()["value"]

    def xcom_entries(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self.get(
                f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/~/xcomEntries",
                params={"limit": 100, "offset": len(out)},
            )
            out.extend(page["xcom_entries"])
            if not page["xcom_entries"] or len(out) >= page["total_entries"]:
                return out

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        resp = self.request(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"map_index": map_index, "full_content": True},
            headers={"Accept": "text/plain"},
        )
        return resp.text


class RunwareControl:
    """The Runware test server's HTTP control API (the server runs in its own process)."""

    def __init__(self, api_url: str) -> None:
        origin = api_url.split("/v1")[0].rstrip("/")
        self.client = httpx.Client(base_url=f"{origin}/_control", timeout=30)

    def close(self) -> None:
        self.client.close()

    def stats(self) -> dict[str, Any]:
        return self.client.get("/stats").raise_for_status().json()

    def reset(self) -> None:
        self.client.post("/reset").raise_for_status()

    def request_bodies(self) -> list[Any]:
        """Every API request body the server received since the last reset, in order."""
        stats = self.client.get("/stats", params={"bodies": "1"}).raise_for_status().json()
        return list(stats["request_bodies"])

    def faults(self, body: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
        return self.client.post("/faults", json=body).raise_for_status().json()

    def clear_faults(self) -> None:
        self.client.delete("/faults").raise_for_status()

    def configure(self, **options: Any) -> None:
        self.client.post("/config", json=options).raise_for_status()
