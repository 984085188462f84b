"""The production-shaped deployment: CeleryExecutor on PostgreSQL and Redis, two of every Airflow node.

`harness.Deployment` runs what `airflow standalone` runs (SQLite, LocalExecutor, one of each), where one
scheduler and one triggerer can never disagree and no broker can redeliver a task. This subclass starts,
on loopback, what a team running image generation for a living runs:

- PostgreSQL 15 (Debian's `postgresql`): a throwaway cluster made by `initdb` in a temp dir and started
  with `pg_ctl`, both as an unprivileged user (`nobody` when the tests run as root: PostgreSQL refuses
  to run as root), fsync off (the data dies with the test);
- Redis (Debian's `redis-server`) as the Celery broker, no persistence;
- moto's S3 server (its own process), holding the webhook inbox that the API server writes and both
  triggerers read;
- two schedulers, two triggerers, one dag-processor, the API server (with the provider's plugins);
- two Celery workers, `worker-default` on the `default` queue and `worker-gpu` on the `gpu` queue, next
  to a `zimage-executor` serving the tiny random-weight model (`executor.process.ExecutorProcess`);
- the Runware test server, as in the single-machine deployment.

Every Airflow component gets `ZIMAGE_E2E_NODE=<its name>` and `[core] hostname_callable` reads it
(`node.py`), so task instances, jobs and triggers name the node that ran them, as on separate machines.
All nodes share the disk, which stands in for the shared object storage of `output_path`.

The infrastructure (PostgreSQL, Redis, moto) carries its own environment marker, so `Deployment.stop()`
(which SIGKILLs whatever carries the run's marker) leaves it to `stop()` here, which stops it after the
Airflow components, cleanly, then sweeps its marker too.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from airflow_provider_zimage.executor.process import ExecutorProcess
from tests.e2e.harness import (
    RUN_MARKER,
    AirflowAPI,
    Component,
    Deployment,
    DeploymentConfig,
    E2EError,
    _marked_processes,
    cpu_of,
    cpu_of_tree,
    free_port,
    wait_until,
)
from tests.s3_server import MotoS3Server

EXECUTOR = "zimage-executor"
GPU_CONN_ID = "zimage_gpu"
TINY_AIR = "runware:z-image@turbo"


def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary: Debian keeps them out of PATH, under /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if found:
        return found[0]
    on_path = shutil.which(name)
    if on_path is None:
        raise E2EError(f"{name} not found: apt-get install -y postgresql redis-server (make e2e-distributed)")
    return on_path


def missing_packages() -> str | None:
    """None when PostgreSQL, Redis and the Celery provider are installed, else what is missing."""
    missing = []
    try:
        postgres_bin("initdb")
    except E2EError:
        missing.append("postgresql (apt)")
    if shutil.which("redis-server") is None:
        missing.append("redis-server (apt)")
    for module, package in (
        ("airflow.providers.celery", "apache-airflow-providers-celery"),
        ("psycopg2", "psycopg2-binary"),
    ):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{package} (pip, the dev extra)")
    return ", ".join(missing) or None


@dataclass
class ClusterConfig(DeploymentConfig):
    """The settings the distributed figures were measured with (README, docs/scaling.md)."""

    parallelism: int = 16  # per scheduler: task instances its CeleryExecutor keeps queued or running
    default_concurrency: int = 4  # Celery processes of worker-default (Runware tasks: submit, defer, store)
    gpu_concurrency: int = 2  # Celery processes of worker-gpu, for its one (CPU-standing-in) device
    triggerer_capacity: int = 500  # each triggerer alone can hold every trigger of the largest scenario
    api_pool_slots: int = 64  # pool `zimage_api`: Runware tasks at once, across DAGs
    gpu_pool_slots: int = 8  # pool `zimage_gpu`: 2 x --max-batch x devices of the executor
    executor_max_batch: int = 4
    tiny_model: Path | None = None


@dataclass
class Infra:
    """One infrastructure process (PostgreSQL is found through its pid file, the others are children)."""

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)


class ClusterDeployment(Deployment):
    """See the module docstring. Same interface as `Deployment`; component names:
    api-server, scheduler-1/2, dag-processor, triggerer-1/2, worker-default, worker-gpu, zimage-executor."""

    SCHEDULERS = ("scheduler-1", "scheduler-2")
    TRIGGERERS = ("triggerer-1", "triggerer-2")
    WORKERS = ("worker-default", "worker-gpu")

    def __init__(self, dag_files: dict[str, str], config: ClusterConfig | None = None) -> None:
        self.cluster = config or ClusterConfig()
        super().__init__(dag_files, self.cluster)
        self.infra_marker = f"{self.run_id}-infra"
        self.infra: dict[str, Infra] = {}
        self.pg_port = free_port()
        self.redis_port = free_port()
        self.moto: MotoS3Server | None = None
        self.inbox_bucket = "zimage-webhook-inbox"
        self.gpu_artifacts = self.artifacts / "gpu"
        self.executor: ExecutorProcess | None = None
        self.executor_starts = 0
        self.timings: dict[str, float] = {}
        self.cpu_of_killed: dict[str, float] = {}  # CPU seconds of the processes each kill ended

    # -- infrastructure ---------------------------------------------------------------------------

    @property
    def pg_dsn(self) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.pg_port}/airflow"

    def _as_postgres_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["runuser", "-u", "nobody", "--", *argv]

    def _infra_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env[RUN_MARKER] = self.infra_marker
        return env

    def _run_logged(self, name: str, argv: list[str], *, timeout: float = 120) -> None:
        log_path = self.component_logs / f"{name}.log"
        with open(log_path, "ab") as log:
            result = subprocess.run(
                argv,
                env=self._infra_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=True,
            )
        if result.returncode != 0:
            raise E2EError(f"{' '.join(argv[:4])} failed:\n{log_path.read_text(errors='replace')[-3000:]}")

    def _start_postgres(self) -> None:
        root = self.home / "postgres"
        data, sockets = root / "data", root / "run"
        sockets.mkdir(parents=True)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            # mkdtemp made the home 0700: the postgres user must reach its own folder below it.
            self.home.chmod(0o711)
            for path in (root, sockets):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        log_path = self.component_logs / "postgres.log"
        log_path.touch()
        if os.geteuid() == 0:
            os.chown(log_path, pwd.getpwnam("nobody").pw_uid, -1)
        self._run_logged(
            "postgres-initdb",
            self._as_postgres_user(
                [
                    postgres_bin("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "airflow",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ]
            ),
        )
        options = " ".join(
            [
                f"-p {self.pg_port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={sockets}",
                # A throwaway cluster: durability costs CPU and disk flushes the other engineers share.
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                # Two schedulers, two triggerers, API server, dag-processor, workers and the Celery
                # result backend, each with a small SQLAlchemy pool (sql_alchemy_pool_size below).
                "-c max_connections=300 -c shared_buffers=64MB",
            ]
        )
        self._run_logged(
            "postgres-pg_ctl",
            self._as_postgres_user(
                [
                    postgres_bin("pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log_path),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
        )
        pid = int((data / "postmaster.pid").read_text().split()[0])
        self.infra["postgres"] = Infra("postgres", log_path, pids=[pid])
        self._run_logged(
            "postgres-createdb",
            [
                postgres_bin("createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.pg_port),
                "-U",
                "airflow",
                "airflow",
            ],
        )

    def _start_infra_process(self, name: str, argv: list[str]) -> Infra:
        log_path = self.component_logs / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                env=self._infra_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        infra = Infra(name, log_path, proc=proc, pids=[proc.pid])
        self.infra[name] = infra
        return infra

    def _start_redis(self) -> None:
        infra = self._start_infra_process(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.home),
            ],
        )

        def ready() -> bool:
            if infra.proc is not None and infra.proc.poll() is not None:
                raise E2EError(f"redis-server exited: {infra.log_path.read_text()[-2000:]}")
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1):
                return True

        wait_until(ready, timeout=30, interval=0.1, what="redis-server")

    def _start_moto(self) -> None:
        port = free_port()
        infra = self._start_infra_process(
            "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        )

        def ready() -> bool:
            if infra.proc is not None and infra.proc.poll() is not None:
                raise E2EError(f"moto server exited: {infra.log_path.read_text()[-2000:]}")
            return httpx.get(f"http://127.0.0.1:{port}/moto-api/", timeout=2).status_code < 500

        wait_until(ready, timeout=60, interval=0.2, what="the moto S3 server")
        self.moto = MotoS3Server(port=port)
        self.moto.create_bucket(self.inbox_bucket)

    def _start_executor(self) -> None:
        """The `zimage-executor` next to worker-gpu: the tiny model on the CPU, state kept on disk so a
        restarted executor answers for the tasks it accepted before."""
        if self.cluster.tiny_model is None:
            raise E2EError("ClusterConfig.tiny_model: build it with testing.tiny_model.build_tiny_zimage")
        if self.executor is None:
            self.executor = ExecutorProcess(
                {TINY_AIR: str(self.cluster.tiny_model)},
                self.home / "executor",
                "--devices",
                "cpu",
                "--max-batch",
                str(self.cluster.executor_max_batch),
                "--output-dir",
                str(self.home / "executor" / "state"),
                port=free_port(),
                env={RUN_MARKER: self.run_id, "ZIMAGE_E2E_NODE": EXECUTOR},
            )
        self.executor.start(timeout=180)
        self.executor_starts += 1
        comp = self.components.setdefault(EXECUTOR, Component(EXECUTOR, [], self.executor.log_path))
        comp.proc = self.executor.process
        comp.starts = self.executor_starts

    def kill_executor(self) -> None:
        assert self.executor is not None
        self._remember_cpu(EXECUTOR, self.tree(EXECUTOR))
        self.executor.kill()

    def start_executor(self) -> None:
        self._start_executor()

    # -- Airflow ----------------------------------------------------------------------------------

    def gpu_connection(self) -> dict[str, Any]:
        assert self.executor is not None
        # Retries long enough to ride out an executor restart (~10 s to import torch and load).
        return self.executor.connection(max_retries=8, backoff_base=0.5, backoff_max=4.0, timeout=30)

    def env(self) -> dict[str, str]:
        env = super().env()
        assert self.moto is not None
        c = self.cluster
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.pg_dsn,
                # Small pools: ~10 processes hold connections; PostgreSQL allows 300.
                "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "3",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "5",
                "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.pg_dsn}",
                "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
                "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
                # Redis redelivers an unacknowledged task only after this; Airflow's heartbeat timeout
                # (30 s below) fails and retries the task of a dead worker long before.
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "21600",
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.e2e.distributed.node.hostname",
                "AIRFLOW__CORE__PARALLELISM": str(c.parallelism),
                "AIRFLOW__TRIGGERER__CAPACITY": str(c.triggerer_capacity),
                # A scheduler that stops heartbeating is dead after 10 s, and the other adopts its
                # queued and running tasks at its next orphan check (every 10 s, default 300).
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
                "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
                "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "180",
                # Two schedulers polling: half a second between idle loops keeps them off the CPU.
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
                "AIRFLOW__ZIMAGE__WEBHOOK_INBOX": f"s3://{self.moto.conn_id}@{self.inbox_bucket}/inbox",
                f"AIRFLOW_CONN_{GPU_CONN_ID.upper()}": json.dumps(self.gpu_connection()),
                **self.moto.env(),
                **c.extra_env,
            }
        )
        return env

    def _node_argv(self, name: str) -> list[str]:
        airflow = [sys.executable, "-m", "airflow"]
        c = self.cluster
        if name == "api-server":
            return [*airflow, "api-server", "--port", str(self.api_port), "--host", "127.0.0.1"]
        if name in self.SCHEDULERS:
            return [*airflow, "scheduler", "--skip-serve-logs"]
        if name in self.TRIGGERERS:
            return [*airflow, "triggerer", "--skip-serve-logs", "--capacity", str(c.triggerer_capacity)]
        if name == "dag-processor":
            return [*airflow, "dag-processor"]
        if name in self.WORKERS:
            queue, concurrency = ("default", c.default_concurrency)
            if name == "worker-gpu":
                queue, concurrency = ("gpu", c.gpu_concurrency)
            return [*airflow, "celery", "worker", "--queues", queue, "--concurrency", str(concurrency),
                    "--celery-hostname", f"{name}@%h", "--skip-serve-logs", "--without-mingle",
                    "--without-gossip"]  # fmt: skip
        raise E2EError(f"unknown component {name}")

    def start(self, *, timeout: float = 300) -> None:
        t0 = time.monotonic()
        self._start_postgres()
        self._start_redis()
        self._start_moto()
        self._start_runware()
        self._start_executor()
        self.timings["infra_s"] = round(time.monotonic() - t0, 1)
        self._env = self.env()
        t1 = time.monotonic()
        self._migrate(timeout=timeout)
        self.timings["db_migrate_s"] = round(time.monotonic() - t1, 1)
        (self.home / "passwords.json").write_text(json.dumps({"e2e": self.password}))
        names = ["api-server", *self.SCHEDULERS, "dag-processor", *self.TRIGGERERS, *self.WORKERS]
        for name in names:
            comp = Component(name, self._node_argv(name), self.component_logs / f"{name}.log")
            comp.env = {"ZIMAGE_E2E_NODE": name}
            self.components[name] = comp
            self.start_component(name)
        self.api = AirflowAPI(self.api_url, "e2e", self.password)
        self.wait_healthy(timeout=max(60.0, timeout - (time.monotonic() - t0)))
        self._create_pools()
        self.startup_seconds = time.monotonic() - t0
        self.timings["startup_s"] = round(self.startup_seconds, 1)

    def _create_pools(self) -> None:
        assert self.api is not None
        for name, slots, what in (
            ("zimage_api", self.cluster.api_pool_slots, "Runware tasks at once, across DAGs"),
            ("zimage_gpu", self.cluster.gpu_pool_slots, "tasks of the zimage-executor next to worker-gpu"),
        ):
            resp = self.api.request(
                "POST", "/api/v2/pools", json={"name": name, "slots": slots, "description": what}
            )
            if resp.status_code >= 400:
                raise E2EError(f"creating pool {name}: {resp.status_code} {resp.text[:500]}")

    def wait_healthy(self, *, timeout: float = 180) -> dict[str, Any]:
        """The API's health (a scheduler, a triggerer, the dag-processor) and both Celery workers ready."""
        health = super().wait_healthy(timeout=timeout)
        for name in self.WORKERS:
            if name in self.components:
                self.wait_worker_ready(name, timeout=timeout)
        return health

    def wait_worker_ready(self, name: str, *, timeout: float = 120) -> None:
        comp = self.components[name]

        def ready() -> bool:
            if not comp.running:
                raise E2EError(f"{name} exited:\n{self.component_log(name)[-4000:]}")
            # Celery prints "<hostname> ready." once it consumes; only this start's output counts.
            this_start = self.component_log(name).rsplit("===== start #", 1)[-1]
            return f"{name}@" in this_start and " ready." in this_start

        wait_until(ready, timeout=timeout, interval=0.5, what=f"Celery worker {name} ready")

    # -- killing ----------------------------------------------------------------------------------

    def tree(self, name: str) -> list[psutil.Process]:
        comp = self.components[name]
        if comp.proc is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(comp.proc.pid)
            return [root, *root.children(recursive=True)]
        return []

    def kill_tree(self, name: str) -> int:
        """SIGKILL a component and every process below it at once (a machine losing power): unlike a
        process-group kill this also reaches task runners that started a session of their own."""
        victims = self.tree(name)
        self._remember_cpu(name, victims)
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        self.kill_component(name, signal.SIGKILL)
        psutil.wait_procs(victims, timeout=30)
        return len(victims)

    # -- evidence ---------------------------------------------------------------------------------

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """A read-only look into the metadata DB (which triggerer holds which trigger, job heartbeats)."""
        import psycopg2

        with (
            contextlib.closing(
                psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="airflow", dbname="airflow")
            ) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(query, args)
            return list(cur.fetchall())

    def triggers_by_triggerer(self) -> dict[str, int]:
        rows = self.sql(
            "SELECT COALESCE(j.hostname, 'unassigned'), count(*) FROM trigger t "
            "LEFT JOIN job j ON j.id = t.triggerer_id GROUP BY 1"
        )
        return {str(host): int(n) for host, n in rows}

    def infra_cpu_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for infra in self.infra.values():
            out[infra.name] = round(sum(cpu_of_tree(pid) for pid in infra.pids), 1)
        return out

    def _remember_cpu(self, name: str, procs: list[psutil.Process]) -> None:
        self.cpu_of_killed[name] = self.cpu_of_killed.get(name, 0.0) + cpu_of(procs)

    def cpu_seconds(self) -> dict[str, float]:
        """Per component over the whole run: live processes plus those a scenario killed."""
        live = {**super().cpu_seconds(), **self.infra_cpu_seconds()}
        for name, spent in self.cpu_of_killed.items():
            live[name] = round(live.get(name, 0.0) + spent, 1)
        return live

    def infra_log(self, name: str) -> str:
        path = self.component_logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def executor_log(self) -> str:
        return self.executor.log() if self.executor is not None else ""

    # -- teardown ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """Airflow first (it still reaches its database while it shuts down), then the infrastructure."""
        try:
            if self.executor is not None:
                self.executor.stop(timeout=15)
            super().stop()
        finally:
            self._stop_infra()

    def _stop_infra(self) -> None:
        postgres = self.infra.get("postgres")
        if postgres is not None:
            with contextlib.suppress(E2EError, subprocess.TimeoutExpired):
                self._run_logged(
                    "postgres-pg_ctl",
                    self._as_postgres_user(
                        [
                            postgres_bin("pg_ctl"),
                            "-D",
                            str(self.home / "postgres" / "data"),
                            "-m",
                            "fast",
                            "-w",
                            "-t",
                            "20",
                            "stop",
                        ]
                    ),
                    timeout=30,
                )
        for infra in self.infra.values():
            if infra.proc is not None and infra.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(infra.proc.pid, signal.SIGTERM)
                try:
                    infra.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(infra.proc.pid, signal.SIGKILL)
                    infra.proc.wait(timeout=5)
        for straggler in _marked_processes(self.infra_marker):
            with contextlib.suppress(psutil.NoSuchProcess):
                straggler.kill()

    def leftover_processes(self) -> list[int]:
        return sorted(
            set(super().leftover_processes()) | {p.pid for p in _marked_processes(self.infra_marker)}
        )
