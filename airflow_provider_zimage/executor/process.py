"""Start and stop a `zimage-executor` in a child process: tests, `make demo` and the benches share it."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ExecutorProcess"]

_LISTENING = re.compile(r"listening on (http://\S+)")


class ExecutorProcess:
    """`python -m airflow_provider_zimage.executor serve ...` on loopback with a fresh token.

    :param models: AIR -> weights, as `--model` takes them.
    :param workdir: holds the token file and the log (`executor.log`).
    :param args: further `serve` options (`--max-batch 1`, `--output-dir D`...).
    """

    def __init__(
        self,
        models: dict[str, str],
        workdir: Path,
        *args: str,
        port: int = 0,
        env: dict[str, str] | None = None,
        token: str | None = None,
    ) -> None:
        self.models = models
        self.workdir = Path(workdir)
        self.args: Sequence[str] = args
        self.port = port
        self.env = env
        self.token = token or secrets.token_urlsafe(24)
        self.url: str | None = None  # the base URL (ends in /v1) once started
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "executor.log"

    def start(self, timeout: float = 120.0) -> ExecutorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        token_file = self.workdir / "token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        command = [sys.executable, "-m", "airflow_provider_zimage.executor", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--token-file", str(token_file)]
        for air, source in self.models.items():
            command += ["--model", f"{air}={source}"]
        command += list(self.args)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})}
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            found = _LISTENING.search(text)
            if found:
                self.url = found.group(1) + "/v1"
                self.port = int(found.group(1).rsplit(":", 1)[1])
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"zimage-executor exited with {self.process.returncode}:\n{text[-3000:]}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"zimage-executor did not start within {timeout:.0f}s")

    @property
    def origin(self) -> str:
        assert self.url is not None
        return self.url.removesuffix("/v1")

    def health(self) -> dict[str, Any]:
        health: dict[str, Any] = httpx.get(f"{self.origin}/health", timeout=10).json()
        return health

    def metrics(self) -> str:
        return httpx.get(f"{self.origin}/metrics", timeout=10).text

    def connection(self, **extra: Any) -> dict[str, Any]:
        """An Airflow `zimage` connection (as AIRFLOW_CONN_... JSON takes it) that runs DAGs here."""
        return {
            "conn_type": "zimage",
            "host": self.url,
            "password": self.token,
            "extra": {"backend": "executor", **extra},
        }

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain), then wait; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ExecutorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
