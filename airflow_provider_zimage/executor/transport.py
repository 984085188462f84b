"""A small HTTP/1.1 server on asyncio streams and h11: the HTTP layer of `zimage-executor`, and of the
test kit's Runware stand-in (`testing.runware_server`), which builds on it; production owns it so the
shipped service never imports the test kit.

Not uvicorn or aiohttp, because the fault that matters most for a paid API, "the task landed but the
answer never came", needs the handler to close or reset the socket with no response at all, after it
did its work. Owning the socket makes that one line. h11 does the parsing, keep-alive and framing; one
coroutine per connection (no thread per request) keeps a thousand polling clients cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11

from airflow_provider_zimage.exceptions import RequestTooLarge

log = logging.getLogger(__name__)

_READ_CHUNK = 64 * 1024


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> Response:
        return cls(status, json.dumps(payload).encode(), "application/json", list(headers or []))


@dataclass
class Drop:
    """Answer nothing: "close" sends a FIN, "reset" a TCP RST (SO_LINGER 0)."""

    mode: str = "close"


Handler = Callable[[Request], Awaitable["Response | Drop"]]


class HTTPServer:
    """Serves `handler` on host:port; counts connections so tests can see keep-alive at work."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int = 64 * 1024 * 1024,
        idle_timeout: float = 120.0,
        on_drop: Callable[[], None] | None = None,
        name: str = "zimage-executor",
    ) -> None:
        self._handler = handler
        self._name = name  # the Server header and log lines say which service answered
        self._max_body = max_body_bytes
        self._idle_timeout = idle_timeout
        self._on_drop = on_drop
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.connections_opened = 0
        self.max_open_connections = 0

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, backlog=4096, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.connections_opened += 1
        self.max_open_connections = max(self.max_open_connections, len(self._connections))
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        abort = False
        try:
            while True:
                try:
                    request = await self._read_request(conn, reader, writer)
                except RequestTooLarge:
                    too_large = Response.json(413, _error("payloadTooLarge"), [("connection", "close")])
                    await self._send(conn, writer, None, too_large)
                    break
                except h11.RemoteProtocolError as exc:
                    with contextlib.suppress(Exception):
                        await self._send(
                            conn, writer, None, Response.json(400, _error("badRequest", str(exc)))
                        )
                    break
                if request is None:
                    break
                try:
                    reply = await self._handler(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("%s: handler failed", self._name)
                    reply = Response.json(500, _error("internalError", f"{type(exc).__name__}: {exc}"))
                if isinstance(reply, Drop):
                    if self._on_drop is not None:
                        self._on_drop()
                    abort = reply.mode == "reset"
                    break
                await self._send(conn, writer, request, reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, TimeoutError, h11.LocalProtocolError, OSError):
            pass
        except asyncio.CancelledError:
            # Shutdown. Finish normally: on 3.11 asyncio.start_server's done-callback calls
            # task.exception(), which raises (and logs) for a cancelled connection task.
            abort = True
        finally:
            self._connections.discard(task)
            if abort:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                try:
                    data = await asyncio.wait_for(reader.read(_READ_CHUNK), self._idle_timeout)
                except (asyncio.TimeoutError, ConnectionError):
                    return None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_body:
                    raise RequestTooLarge
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = head.target.decode("latin-1")
                parts = urlsplit(target)
                return Request(
                    method=head.method.decode("ascii").upper(),
                    target=target,
                    path=parts.path or "/",
                    query=dict(parse_qsl(parts.query)),
                    headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers},
                    body=bytes(body),
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, request: Request | None, reply: Response
    ) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("server", self._name),
            *reply.headers,
        ]
        out = conn.send(h11.Response(status_code=reply.status, headers=headers))
        if request is None or request.method != "HEAD":
            out += conn.send(h11.Data(data=reply.body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()


def task_array_response(data: list[dict[str, Any]], errors: list[dict[str, Any]]) -> Response:
    """Runware's answer to a task array, as the executor and the test server both give it: 200 whenever
    an item is there (errors of other tasks ride along in `errors`), 400 when only errors are."""
    body: dict[str, Any] = {"data": data}
    if errors:
        body["errors"] = errors
    return Response.json(200 if data or not errors else 400, body)


def _error(code: str, message: str | None = None) -> dict[str, Any]:
    return {"errors": [{"code": code, "message": message or code}]}
