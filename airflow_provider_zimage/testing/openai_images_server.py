"""A loopback OpenAI images server (`POST /v1/images/generations`) that injects faults, for tests.

Built on the executor's HTTP layer (`executor.transport`), like the Runware stand-in: real HTTP, real
sockets, so the hook's retries, timeouts and dropped connections are exercised as in production. It
answers what SGLang Diffusion answers for Z-Image (one PNG per request, `b64_json` or a URL), with
pixels that are a function of (prompt, seed, size) only: the same seed gives the same bytes, which is
what lets a test prove an image was or was not made again.

Faults are scripted per call (`script(...)`): an HTTP status with headers (429 + Retry-After, 500),
a dropped connection, or a URL answer pointing at any origin. Every request is recorded (path,
headers, body) so a test can count calls (zero for a refused request) and read what was sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from PIL import Image, ImageDraw

from airflow_provider_zimage.executor.transport import Drop, HTTPServer, Request, Response


def seed_png(prompt: str, seed: int, width: int, height: int) -> bytes:
    """A PNG whose pixels derive from (prompt, seed): equal inputs, equal bytes."""
    d = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    image = Image.new("RGB", (width, height), (d[0], d[1], d[2]))
    draw = ImageDraw.Draw(image)
    draw.rectangle(
        (d[3] * width // 256, d[4] * height // 256, width - 1, height - 1), fill=(d[5], d[6], d[7])
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Fault:
    """What the next call gets instead of an image: `status` (+ `headers`, `body`), `drop` (close the
    socket with no answer, after the image was made), or `url` (answer the image as this URL)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    drop: bool = False
    url: str | None = None
    delay: float = 0.0


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


class OpenAIImagesTestServer:
    """`with OpenAIImagesTestServer() as server:` -> `server.url` is the connection's host.

    :param api_key: when set, a request without `Authorization: Bearer <api_key>` gets 401.
    :param latency: seconds each image takes (a slow GPU), so concurrency can be observed.
    """

    def __init__(self, *, api_key: str | None = None, latency: float = 0.0, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.latency = latency
        self.host = host
        self.port = 0
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._faults: deque[Fault] = deque()
        self._images: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: HTTPServer | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> OpenAIImagesTestServer:
        self._thread = threading.Thread(target=self._main, name="openai-images-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("OpenAIImagesTestServer did not start within 30 s")
        return self

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._stop = asyncio.Event()
        self._http = HTTPServer(self._handle, name="openai-images-test-server")
        self.port = loop.run_until_complete(self._http.start(self.host, 0))
        self._ready.set()
        loop.run_until_complete(self._stop.wait())
        loop.run_until_complete(self._http.close())
        loop.close()

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stop is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> OpenAIImagesTestServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """What a connection's host is set to (the router's URL, in production)."""
        return self.origin

    # -- scripting and reading ---------------------------------------------------------------------

    def script(self, *faults: Fault) -> None:
        """The next calls get these, one each, in order; later calls make images."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def generations(self) -> list[Recorded]:
        """The image calls received (faulted ones included)."""
        return [r for r in self.requests if r.path.endswith("/images/generations")]

    # -- HTTP --------------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response | Drop:
        path = request.path.rstrip("/")
        try:
            body = json.loads(request.body) if request.body else {}
        except ValueError:
            body = {"_raw": request.body[:200].decode("utf-8", "replace")}
        with self._lock:
            self.requests.append(Recorded(path, dict(request.headers), body, time.monotonic()))
        if path.startswith("/files/"):
            data = self._images.get(path.removeprefix("/files/"))
            return (
                Response(200, data, "image/png")
                if data is not None
                else Response.json(404, {"detail": "gone"})
            )
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return Response.json(401, {"error": {"message": "invalid api key", "type": "auth"}})
        if path == "/v1/models":
            return Response.json(
                200, {"object": "list", "data": [{"id": "Z-Image-Turbo", "object": "model"}]}
            )
        if path != "/v1/images/generations" or request.method != "POST":
            return Response.json(404, {"detail": "Not Found"})
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if fault is not None and fault.delay:
                await asyncio.sleep(fault.delay)
            if fault is not None and fault.status is not None:
                return Response.json(
                    fault.status,
                    fault.body or {"error": {"message": f"scripted {fault.status}"}},
                    list(fault.headers.items()),
                )
            if self.latency:
                await asyncio.sleep(self.latency)
            width, height = (int(v) for v in str(body.get("size", "1024x1024")).split("x"))
            # SGLang rounds down to multiples of 16 silently; so does this stand-in.
            width, height = width - width % 16, height - height % 16
            data = seed_png(str(body.get("prompt", "")), int(body.get("seed", 1024)), width, height)
            if fault is not None and fault.drop:
                return Drop("close")
            if fault is not None and fault.url is not None:
                name = hashlib.sha256(data).hexdigest()[:16]
                self._images[name] = data
                return Response.json(
                    200, {"created": int(time.time()), "data": [{"url": fault.url.format(name=name)}]}
                )
            encoded = base64.b64encode(data).decode()
            return Response.json(
                200, {"id": "test", "created": int(time.time()), "data": [{"b64_json": encoded}]}
            )
        finally:
            with self._lock:
                self.in_flight -= 1
