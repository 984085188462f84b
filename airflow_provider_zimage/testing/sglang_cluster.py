"""Real SGLang Diffusion workers behind a real `sglang-router`, on loopback, for tests and the bench.

The OpenAI-images backend is proven against the engine users run, not a fake of it: `sglang serve` on
the tiny checkpoint (`tiny_model.py`) on the CPU, two workers on two ports, and SGLang's Rust router in
front of them. SGLang lives in a venv of its own (`make install-sglang`, about 11 GB), never in the
package's dependencies: this module only starts its programs, it imports nothing of SGLang.

Found by `sglang_venv()`: `$ZIMAGE_SGLANG_VENV`, else `.venv-sglang` in the working directory (the
repository root, where the Makefile builds it).

What the engine needs that the tiny checkpoint lacks: SGLang's own Z-Image transformer reads
`num_attention_heads` / `num_layers` from `transformer/config.json`, where diffusers writes `n_heads` /
`n_layers`; `prepare_for_sglang` copies the folder and adds both keys (diffusers still loads it).

Start-up options and why (`WORKER_OPTIONS`): `--warmup-mode off` (the default warms up at 1024x1024 for
minutes on a CPU), `--sleep-on-idle` (without it an idle worker spins a core), `--output-path ""` (the
answer carries the image; nothing is written beside the server).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "MODEL_ID",
    "NginxRouter",
    "SGLangCluster",
    "SGLangRouter",
    "SGLangWorker",
    "free_port",
    "prepare_for_sglang",
    "sglang_venv",
]

#: The model name the workers serve (`--model-id`): SGLang picks its native Z-Image pipeline by it.
MODEL_ID = "Z-Image-Turbo"

WORKER_OPTIONS: tuple[str, ...] = (
    "--num-gpus",
    "1",
    "--warmup-mode",
    "off",
    "--sleep-on-idle",
    "--output-path",
    "",
)

# `sglang.cli.main` has no `__main__` guard; python -c rather than bin/sglang, whose first line names the
# folder the venv was built in (a venv moved elsewhere still runs this way).
_SGLANG_MAIN = "import sys; from sglang.cli.main import main; sys.exit(main())"

#: Written by `prepare_for_sglang` when the copy is complete (a crashed copy is redone).
_PREPARED = ".sglang-ready"


def sglang_venv(venv: str | os.PathLike[str] | None = None) -> Path:
    """The venv holding `sglang` and `sglang_router`; FileNotFoundError naming where it looked, and how to
    build it (`make install-sglang`)."""
    candidate = Path(venv or os.environ.get("ZIMAGE_SGLANG_VENV") or ".venv-sglang").absolute()
    if not (candidate / "bin" / "python").exists() or not list(
        candidate.glob("lib/python*/site-packages/sglang_router")
    ):
        raise FileNotFoundError(
            f"no SGLang at {candidate} (bin/python with sglang_router missing): run "
            "`make install-sglang`, or set "
            "ZIMAGE_SGLANG_VENV to a venv with sglang[diffusion] and sglang-router"
        )
    return candidate


def prepare_for_sglang(model_path: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """A copy of a diffusers Z-Image folder that SGLang's native model loads too.

    Only `transformer/config.json` changes (two keys added, none removed); the weights are hard-linked
    where the file system allows it, so the tiny checkpoint's copy costs nothing.
    """
    source, destination = Path(model_path), Path(target)
    if (destination / _PREPARED).is_file():
        return destination
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(source, destination, copy_function=_link_or_copy)
    config_path = destination / "transformer" / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text())
    config_path.unlink()  # a hard link: rewriting it in place would change the source's config too
    config.setdefault("num_attention_heads", config["n_heads"])
    config.setdefault("num_layers", config["n_layers"])
    config_path.write_text(json.dumps(config, indent=2))
    (destination / _PREPARED).write_text("1")
    return destination


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def free_port(span: int = 1) -> int:
    """A TCP port free on loopback now, with the `span - 1` ports above it free too.

    The OS picks it, so a race with another binder stays possible: the router, whose port is taken last,
    retries on a clash (`SGLangRouter.start`). A worker takes its port + 1 for its job broker.
    """
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + span <= 65535 and all(_free(port + offset) for offset in range(1, span)):
            return port
    raise RuntimeError(f"no {span} free ports in a row on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class _Process:
    """A child in its own process group, so stop/kill reach the workers SGLang forks under it."""

    name = "process"

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = Path(workdir)
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"{self.name}-{port}.log"
        self.started_seconds: float | None = None  # from Popen to /health 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def launch(self, env: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self._launched = time.monotonic()

    def wait_healthy(self, timeout: float) -> None:
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} on port {self.port} exited with {self.process.returncode}:\n"
                    + self.log()[-4000:]
                )
            if self.healthy():
                self.started_seconds = time.monotonic() - self._launched
                return
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(
            f"{self.name} on port {self.port} not healthy within {timeout:.0f}s:\n{self.log()[-4000:]}"
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the group, SIGKILL what is left after `timeout`."""
        if self.process is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group now: the machine-died case (no drain, no goodbye to the router)."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def _signal_group(self, signum: int) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class SGLangWorker(_Process):
    """One `sglang serve` of `model_path` on 127.0.0.1:`port` (a diffusion worker)."""

    name = "sglang-worker"

    def __init__(self, venv: Path, model_path: Path, workdir: Path, port: int, *args: str) -> None:
        super().__init__(workdir, port)
        self.venv = venv
        self.model_path = model_path
        self.args: Sequence[str] = args

    def command(self) -> list[str]:
        return [
            str(self.venv / "bin" / "python"),
            "-c",
            _SGLANG_MAIN,
            "serve",
            "--model-path",
            str(self.model_path),
            "--model-id",
            MODEL_ID,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            # Distinct internal ports: two workers on one machine would both take the defaults.
            "--master-port",
            str(free_port()),
            "--scheduler-port",
            str(free_port()),
            *WORKER_OPTIONS,
            *self.args,
        ]


class _Router(_Process):
    """A load balancer on a port chosen when it starts (taken last, after the workers' own ports)."""

    def __init__(self, worker_urls: Sequence[str], workdir: Path) -> None:
        super().__init__(workdir, 0)
        self.worker_urls = list(worker_urls)

    def start(self, timeout: float = 60.0, attempts: int = 3) -> _Router:
        """On a port free now; a port another process took meanwhile means another port, not a failure."""
        for attempt in range(attempts):
            self.port = free_port()
            self.log_path = self.workdir / f"{self.name}-{self.port}.log"
            self.prepare()
            self.launch()
            try:
                self.wait_healthy(timeout)
                return self
            except RuntimeError:
                if attempt == attempts - 1 or "in use" not in self.log():
                    raise
        raise AssertionError("unreachable")

    def prepare(self) -> None:
        """Anything to write before launching (a config file)."""


class SGLangRouter(_Router):
    """`sglang-router` (SGLang's Model Gateway) in front of `worker_urls`.

    Not the cluster's router: sglang-router 0.3.2 and its successor `smg` 1.13.0 route the LLM endpoints
    only and answer `POST /v1/images/generations` with 404 (`unknown_url`). Kept so a test notices the
    day a release routes images (tests/sglang/test_engine.py).
    """

    name = "sglang-router"

    def __init__(self, venv: Path, worker_urls: Sequence[str], workdir: Path, *args: str) -> None:
        super().__init__(worker_urls, workdir)
        self.venv = venv
        self.args: Sequence[str] = args

    def command(self) -> list[str]:
        return [
            str(self.venv / "bin" / "python"),
            "-m",
            "sglang_router.launch_router",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--worker-urls",
            *self.worker_urls,
            "--policy",
            "round_robin",
            *self.args,
        ]

    def wait_workers(self, count: int, timeout: float = 60.0) -> None:
        """Until the router lists `count` healthy workers (it registers them in the background)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                workers = httpx.get(f"{self.url}/workers", timeout=2).json().get("workers", [])
                if sum(1 for w in workers if w.get("is_healthy")) >= count:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"sglang-router did not register {count} workers within {timeout:.0f}s")


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {workdir}/nginx-{port}.pid;
error_log {log} warn;
events {{ worker_connections 512; }}
http {{
    log_format upstream '$request_method|$uri|$status|$upstream_addr|$upstream_status';
    access_log {access} upstream;
    client_body_temp_path {workdir}/nginx-tmp/body;
    proxy_temp_path {workdir}/nginx-tmp/proxy;
    fastcgi_temp_path {workdir}/nginx-tmp/fastcgi;
    uwsgi_temp_path {workdir}/nginx-tmp/uwsgi;
    scgi_temp_path {workdir}/nginx-tmp/scgi;
    client_max_body_size 64m;
    upstream sglang {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sglang;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 600s;
            # A worker that dies mid-request (connection reset) or refuses: the same request goes to the
            # next worker. POST is not idempotent to nginx; an image generation is (same seed, same
            # bytes, no money), so it is retried too.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"""


class NginxRouter(_Router):
    """nginx round-robin in front of `worker_urls`, failing over to the next worker on a dead one.

    The cluster's router: SGLang's own router does not route the images endpoint (`SGLangRouter`). Its
    access log names the worker that answered each request (`requests()`), so a test can tell where a
    batch went and that nothing reached the router at all.
    """

    name = "nginx-router"

    def __init__(self, worker_urls: Sequence[str], workdir: Path, nginx: str | None = None) -> None:
        super().__init__(worker_urls, workdir)
        found = (
            nginx
            or shutil.which("nginx")
            or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
        )
        if found is None:
            raise FileNotFoundError(
                "no nginx (the cluster's router): apt-get install nginx, or make install-sglang"
            )
        self.nginx = found

    @property
    def conf_path(self) -> Path:
        return self.workdir / f"nginx-{self.port}.conf"

    @property
    def access_path(self) -> Path:
        return self.workdir / f"nginx-{self.port}-access.log"

    def prepare(self) -> None:
        (self.workdir / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        servers = "\n".join(
            f"        server {url.removeprefix('http://')} max_fails=1 fail_timeout=30s;"
            for url in self.worker_urls
        )
        self.conf_path.write_text(
            NGINX_CONF.format(
                workdir=self.workdir,
                port=self.port,
                log=self.log_path,
                access=self.access_path,
                servers=servers,
            )
        )

    def command(self) -> list[str]:
        return [self.nginx, "-p", str(self.workdir), "-c", str(self.conf_path), "-e", str(self.log_path)]

    def requests(self, path: str = "/v1/images/generations") -> list[dict[str, str]]:
        """What reached the router for `path`: status, every worker tried (`upstream`, comma-separated)."""
        if not self.access_path.exists():
            return []
        entries = []
        for line in self.access_path.read_text().splitlines():
            # "|" between fields: nginx joins the workers it tried with ", " inside one field.
            method, uri, status, upstream, upstream_status = (line.split("|") + [""] * 5)[:5]
            if uri == path:
                entries.append(
                    {
                        "method": method,
                        "status": status,
                        "upstream": upstream,
                        "upstream_status": upstream_status,
                    }
                )
        return entries


class SGLangCluster:
    """`workers` SGLang workers on the tiny (or any) Z-Image folder and one router in front of them.

        with SGLangCluster(model_path, tmp_path, workers=2) as cluster:
            httpx.post(f"{cluster.url}/v1/images/generations", json={...})
            cluster.kill_worker(0)   # SIGKILL, as a machine dies

    :param model_path: a diffusers Z-Image folder; a copy SGLang loads is made under `workdir`.
    :param workdir: logs and the prepared checkpoint.
    :param venv: the SGLang venv (default: `sglang_venv()`).
    :param router: "nginx" (the default; fails over to the survivor), "sglang" (`SGLangRouter`, which
        does not route images) or None (clients talk to the workers directly).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        *,
        workers: int = 2,
        venv: str | os.PathLike[str] | None = None,
        router: str | None = "nginx",
        worker_args: Sequence[str] = (),
    ) -> None:
        self.venv = sglang_venv(venv)
        self.workdir = Path(workdir)
        self.model_path = prepare_for_sglang(model_path, self.workdir / "model-sglang")
        self.workers = [
            SGLangWorker(self.venv, self.model_path, self.workdir, free_port(span=2), *worker_args)
            for _ in range(workers)
        ]
        urls = [w.url for w in self.workers]
        self.router: _Router | None
        if router == "nginx":
            self.router = NginxRouter(urls, self.workdir)
        elif router == "sglang":
            self.router = SGLangRouter(self.venv, urls, self.workdir)
        elif router is None:
            self.router = None
        else:
            raise ValueError(f"router: {router!r}, expected 'nginx', 'sglang' or None")

    @property
    def url(self) -> str:
        """Where clients send: the router, or the only worker without one."""
        if self.router is not None:
            return self.router.url
        return self.workers[0].url

    def start(self, timeout: float = 300.0) -> SGLangCluster:
        """Workers start side by side (their load is mostly Python imports), then the router."""
        try:
            for worker in self.workers:
                worker.launch()
            with ThreadPoolExecutor(len(self.workers)) as pool:
                list(pool.map(lambda w: w.wait_healthy(timeout), self.workers))
            if self.router is not None:
                self.router.start()
        except BaseException:
            self.stop()
            raise
        return self

    def restart_dead_workers(self, timeout: float = 300.0) -> list[SGLangWorker]:
        """Start again, on the same port, each worker that died or was killed; the router finds it there."""
        dead = [w for w in self.workers if not w.alive]
        for worker in dead:
            worker.launch()
        for worker in dead:
            worker.wait_healthy(timeout)
        return dead

    def kill_worker(self, index: int) -> SGLangWorker:
        worker = self.workers[index]
        worker.kill()
        return worker

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop(10)
        for worker in self.workers:
            worker.stop()

    def logs(self) -> str:
        parts = [*self.workers, *([self.router] if self.router else [])]
        return "\n".join(f"== {p.log_path.name}\n{p.log()[-3000:]}" for p in parts)

    def __enter__(self) -> SGLangCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def sglang_cluster(
    model_path: str | os.PathLike[str], workdir: str | os.PathLike[str], **options: Any
) -> Iterator[SGLangCluster]:
    """`SGLangCluster(...)` started, stopped on exit (the shape the fixtures use)."""
    cluster = SGLangCluster(model_path, workdir, **options).start()
    try:
        yield cluster
    finally:
        cluster.stop()
