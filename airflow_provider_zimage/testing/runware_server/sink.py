"""`HTTPSink`: the other end of webhooks and upload endpoints, for tests.

Runware calls out to the client (webhook POSTs, upload PUTs); a test needs a server that records what
arrived and can refuse it on cue (to prove retries and `uploadFailed`). A PUT body is kept per path and
served back on GET, like a presigned bucket, so an uploaded image's `imageURL` really downloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from airflow_provider_zimage.executor.transport import HTTPServer, Request, Response


@dataclass(frozen=True)
class SinkRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


class HTTPSink:
    """Records every request; answers statuses from a script (then `default_status`)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, statuses: Iterable[int] = (), default_status: int = 200
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.default_status = default_status
        self._statuses: deque[int] = deque(statuses)
        self._lock = threading.Lock()
        self._requests: list[SinkRequest] = []
        self._objects: dict[str, tuple[bytes, str]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("HTTPSink is not started")
        return f"http://{self.host}:{self.port}"

    def script(self, statuses: Iterable[int]) -> None:
        """Answer the next requests with these statuses, in order."""
        with self._lock:
            self._statuses.extend(statuses)

    @property
    def requests(self) -> list[SinkRequest]:
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[SinkRequest]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.requests
            if len(got) >= count:
                return got
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(got)} of {count} requests arrived within {timeout} s")
            time.sleep(0.01)

    def start(self) -> HTTPSink:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._main, name="http-sink", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"HTTPSink failed to start: {self._error}")
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> HTTPSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        server = HTTPServer(self._handle, name="runware-test-server")
        try:

            async def serve() -> None:
                self._stop_event = asyncio.Event()
                self.port = await server.start(self.host, self._requested_port)
                self._ready.set()
                await self._stop_event.wait()
                await server.close()

            loop.run_until_complete(serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _handle(self, request: Request) -> Response:
        with self._lock:
            status = self._statuses.popleft() if self._statuses else self.default_status
            ok = 200 <= status < 300
            self._requests.append(
                SinkRequest(
                    request.method, request.path, request.query, request.headers, request.body, status
                )
            )
            if ok and request.method == "PUT":
                content_type = request.headers.get("content-type", "application/octet-stream")
                self._objects[request.path] = (request.body, content_type)
            stored = self._objects.get(request.path) if request.method in ("GET", "HEAD") else None
        if stored is not None and ok:
            return Response(status, stored[0], stored[1])
        return Response.json(status, {} if ok else {"error": f"scripted {status}"})
