"""`RunwareTestServer`: the stand-in for the paid Runware REST API.

Everything the provider promises about money ("a retry never pays twice", "a lost answer is reattached,
not resubmitted") can only be proved by counting what reached the API. This server is that API for
tests, benchmarks and the end-to-end harness: it speaks the protocol of the seeds (task arrays, sync and
async delivery, getResponse polling, webhooks, upload endpoints, the ErrorResponse shape), returns real
images, counts every submission per taskUUID, and misbehaves on request (error statuses, dropped
connections before or after the work was accepted, slow or failing tasks, lost webhooks).

It runs on its own asyncio loop in a background thread, so synchronous tests, async tests and other
processes (through the HTTP control API under /_control/) all drive it the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import json
import logging
import random
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from airflow_provider_zimage.executor.transport import (
    Drop,
    HTTPServer,
    Request,
    Response,
    task_array_response,
)

from .faults import Fault, FaultPlan, error_item, status_error
from .images import CONTENT_TYPES, EXTENSIONS, image_cost, render_image
from .schema import MISSING_PARAMETER, validate_inference_task

log = logging.getLogger(__name__)

DEFAULT_API_KEY = "test-key"
INFERENCE = "imageInference"
GET_RESPONSE = "getResponse"
AUTHENTICATION = "authentication"
PING = "ping"

CONFLICT_TASK_UUID = "conflictTaskUUID"
TASK_NOT_FOUND = "taskNotFound"
TASK_EXPIRED = "taskExpired"
UPLOAD_FAILED = "uploadFailed"
TASK_FAILED = "taskFailed"
INVALID_REQUEST_BODY = "invalidRequestBody"
UNSUPPORTED_TASK_TYPE = "unsupportedTaskType"

# Prompt markers: how a test scripts one task's fate without touching the server's configuration.
_FAIL_RE = re.compile(r"__fail(?::([A-Za-z0-9_]+))?__")
# Fails the first task with this exact prompt and lets later ones (a new generation) succeed: a
# failure at Runware that a resubmission fixes.
FAIL_ONCE_MARKER = "__fail_once__"
_DELAY_RE = re.compile(r"__delay:([0-9]+(?:\.[0-9]+)?)__")
NSFW_MARKER = "__nsfw__"

_MAX_RECORDED = 10_000


@dataclass(frozen=True)
class ServerOptions:
    """Everything configurable; `reset()` returns to the values given to the constructor."""

    api_key: str | None = DEFAULT_API_KEY
    delay: float = 0.0
    stagger: float = 0.0
    webhook_envelope: bool = False
    webhook_max_attempts: int = 4
    webhook_backoff: float = 0.05
    webhook_timeout: float = 5.0
    webhook_drop_rate: float = 0.0
    upload_timeout: float = 10.0
    result_ttl: float | None = None
    image_url_ttl: bool = True
    strict_uuid_v4: bool = False
    prices: dict[str, float] | None = None
    public_origin: str | None = None
    seeds_dir: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    record_bodies: bool = True
    image_workers: int = 4
    image_cache_size: int = 64
    idle_timeout: float = 120.0


_RUNTIME_OPTIONS = frozenset(
    {
        "api_key",
        "delay",
        "stagger",
        "webhook_envelope",
        "webhook_max_attempts",
        "webhook_backoff",
        "webhook_timeout",
        "webhook_drop_rate",
        "upload_timeout",
        "result_ttl",
        "image_url_ttl",
        "strict_uuid_v4",
        "prices",
        "record_bodies",
    }
)


@dataclass(frozen=True)
class _ImageSpec:
    prompt: str
    seed: int
    width: int
    height: int
    output_format: str
    quality: int


@dataclass
class _ImageRecord:
    spec: _ImageSpec
    expires_at: float | None


@dataclass
class _Task:
    task_uuid: str
    payload: dict[str, Any]
    number_results: int
    seed: int
    delay: float
    stagger: float
    accepted_at: float
    done: asyncio.Event
    items: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    finished_at: float | None = None


class _Counters:
    """Thread-safe: bumped on the loop thread, read from test threads and the control API."""

    _SCALARS = (
        "requests",
        "total_accepted",
        "get_response_polls",
        "conflicts",
        "validation_errors",
        "auth_failures",
        "dropped_connections",
        "webhook_attempts",
        "webhook_deliveries",
        "webhook_failures",
        "webhooks_dropped",
        "uploads_attempted",
        "uploads_succeeded",
        "uploads_failed",
        "images_rendered",
        "image_downloads",
        "tasks_finished",
    )

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.scalars: Counter[str] = Counter({k: 0 for k in self._SCALARS})
            self.accepted: Counter[str] = Counter()
            self.by_type: Counter[str] = Counter()
            self.faults: Counter[str] = Counter()
            self.bodies: list[Any] = []
            self.webhook_log: list[dict[str, Any]] = []

    def bump(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.scalars[name] += n


class RunwareTestServer:
    """A Runware-compatible API on 127.0.0.1; see the package docstring for the whole contract.

    >>> with RunwareTestServer(delay=0.2) as server:
    ...     httpx.post(server.url, json=[...], headers={"Authorization": "Bearer test-key"})
    ...     server.accepted_submissions(task_uuid)
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        unknown = set(options) - {f.name for f in dataclasses.fields(ServerOptions)}
        if unknown:
            raise TypeError(f"unknown RunwareTestServer options: {sorted(unknown)}")
        self.host = host
        self._requested_port = port
        self._initial_options = ServerOptions(**options)
        self.options = self._initial_options
        self.port: int | None = None
        self._counters = _Counters()
        self._faults = FaultPlan()
        self._webhook_rng = random.Random()
        self._seed_rng = random.Random()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        self._http: HTTPServer | None = None
        self._client: httpx.AsyncClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: dict[str, _Task] = {}
        self._failed_once: set[str] = set()
        self._runners: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._images: dict[str, _ImageRecord] = {}
        self._image_cache: OrderedDict[_ImageSpec, bytes] = OrderedDict()
        self._rendering: dict[_ImageSpec, asyncio.Future[bytes]] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> RunwareTestServer:
        if self._thread is not None:
            return self
        _raise_fd_limit()
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._thread_main, name="runware-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("RunwareTestServer did not start within 30 s")
        if self._startup_error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(
                f"RunwareTestServer failed to start: {self._startup_error}"
            ) from self._startup_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("RunwareTestServer thread did not stop")
        self._thread = None

    def __enter__(self) -> RunwareTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._startup())
            except BaseException as exc:  # reported to start() in the caller's thread
                self._startup_error = exc
                self._ready.set()
                return
            self._ready.set()
            assert self._stop_event is not None
            loop.run_until_complete(self._stop_event.wait())
            loop.run_until_complete(self._shutdown())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
            asyncio.set_event_loop(None)
            loop.close()

    async def _startup(self) -> None:
        self._stop_event = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, self.options.image_workers), thread_name_prefix="runware-image"
        )
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        self._http = HTTPServer(
            self._handle,
            max_body_bytes=self.options.max_body_bytes,
            idle_timeout=self.options.idle_timeout,
            on_drop=lambda: self._counters.bump("dropped_connections"),
            name="runware-test-server",
        )
        # Load the schema now: a missing seed file fails start(), not the first request.
        validate_inference_task({}, directory=self.options.seeds_dir)
        self.port = await self._http.start(self.host, self._requested_port)

    async def _shutdown(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self._cancel_work()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _cancel_work(self) -> None:
        pending = [*self._runners, *self._background, *self._rendering.values()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._runners.clear()
        self._background.clear()
        self._rendering.clear()

    def _spawn(self, coro: Any, bucket: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        bucket.add(task)
        task.add_done_callback(bucket.discard)
        return task

    # ------------------------------------------------------------------ addresses

    @property
    def origin(self) -> str:
        """Where clients reach the server: image URLs point here too."""
        if self.options.public_origin:
            return self.options.public_origin.rstrip("/")
        if self.port is None:
            raise RuntimeError("RunwareTestServer is not started")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The API base URL, what a client uses as its host (POST works on it and on `origin`/)."""
        return f"{self.origin}/v1"

    @property
    def control_url(self) -> str:
        return f"{self.origin}/_control"

    @property
    def api_key(self) -> str | None:
        return self.options.api_key

    # ------------------------------------------------------------------ accounting (any thread)

    def accepted_submissions(self, task_uuid: str) -> int:
        """How many times this taskUUID was accepted, i.e. paid for."""
        with self._counters.lock:
            return self._counters.accepted[task_uuid]

    @property
    def total_accepted(self) -> int:
        """Accepted inference tasks, all taskUUIDs together: the pictures Runware would have billed."""
        with self._counters.lock:
            return self._counters.scalars["total_accepted"]

    @property
    def stats(self) -> dict[str, Any]:
        """A JSON-able snapshot; the same object GET /_control/stats returns."""
        c = self._counters
        with c.lock:
            snapshot: dict[str, Any] = dict(c.scalars)
            snapshot["accepted"] = dict(c.accepted)
            snapshot["requests_by_type"] = dict(c.by_type)
            snapshot["faults_injected"] = dict(c.faults)
        snapshot["tasks_in_progress"] = snapshot["total_accepted"] - snapshot["tasks_finished"]
        http = self._http
        snapshot["connections_opened"] = http.connections_opened if http else 0
        snapshot["open_connections"] = http.open_connections if http else 0
        snapshot["max_open_connections"] = http.max_open_connections if http else 0
        return snapshot

    @property
    def request_bodies(self) -> list[Any]:
        """Parsed bodies of API requests in arrival order, API keys replaced by "***"."""
        with self._counters.lock:
            return copy.deepcopy(self._counters.bodies)

    @property
    def webhook_log(self) -> list[dict[str, Any]]:
        """One entry per webhook attempt: url, attempt, status (None on a connection error), body."""
        with self._counters.lock:
            return copy.deepcopy(self._counters.webhook_log)

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0, interval: float = 0.01
    ) -> dict[str, Any]:
        """Poll `stats` until predicate(stats) holds; background work (webhooks) finishes after answers."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.stats
            if predicate(snapshot):
                return snapshot
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s; stats: {snapshot}")
            time.sleep(interval)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until every accepted task finished and every webhook/upload is done."""
        self._call(self._idle(), timeout)

    async def _idle(self) -> None:
        while self._runners or self._background:
            await asyncio.gather(*self._runners, *self._background, return_exceptions=True)

    # ------------------------------------------------------------------ scripting (any thread)

    def configure(self, **options: Any) -> None:
        """Change runtime options (delay, stagger, api_key, webhook_*...) of a running server."""
        bad = set(options) - _RUNTIME_OPTIONS
        if bad:
            raise TypeError(f"options that cannot change at runtime or do not exist: {sorted(bad)}")
        self.options = dataclasses.replace(self.options, **options)

    def script_faults(
        self,
        queue: Iterable[Mapping[str, Any] | Fault] | None = None,
        *,
        rates: Mapping[str, float] | None = None,
        seed: int | None = None,
        task_type: str | None = None,
        retry_after: float | str | None = None,
        delay: float | None = None,
        stagger: float | None = None,
        webhook_drop_rate: float | None = None,
        replace: bool = False,
    ) -> None:
        """Queue one-shot faults and/or set fault rates; see `faults.py` for the fault format.

        `task_type` and `retry_after` apply to the rates; queued faults carry their own. `seed` seeds
        both the rate draws and the webhook drops. `replace=True` empties the queue first.
        """
        if replace:
            self._faults.clear()
        if queue is not None:
            self._faults.add(list(queue))
        if rates is not None:
            self._faults.set_rates(rates, seed=seed, task_type=task_type, retry_after=retry_after)
        if seed is not None:
            self._webhook_rng.seed(seed)
        changes: dict[str, Any] = {}
        if delay is not None:
            changes["delay"] = float(delay)
        if stagger is not None:
            changes["stagger"] = float(stagger)
        if webhook_drop_rate is not None:
            if not 0.0 <= webhook_drop_rate <= 1.0:
                raise ValueError("webhook_drop_rate must be within [0, 1]")
            changes["webhook_drop_rate"] = float(webhook_drop_rate)
        if changes:
            self.configure(**changes)

    def apply_fault_spec(self, spec: Mapping[str, Any] | list[Any]) -> None:
        """The JSON body of POST /_control/faults: a list (the queue) or an object of script_faults args."""
        if isinstance(spec, list):
            self.script_faults(spec)
            return
        if not isinstance(spec, Mapping):
            raise ValueError("fault spec must be a JSON array or object")
        allowed = {
            "queue",
            "rates",
            "seed",
            "task_type",
            "taskType",
            "retry_after",
            "retryAfter",
            "delay",
            "stagger",
            "webhook_drop_rate",
            "replace",
            "clear",
        }
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(f"unknown fault spec keys {sorted(unknown)}")
        if spec.get("clear"):
            self.clear_faults()
        self.script_faults(
            spec.get("queue"),
            rates=spec.get("rates"),
            seed=spec.get("seed"),
            task_type=spec.get("task_type", spec.get("taskType")),
            retry_after=spec.get("retry_after", spec.get("retryAfter")),
            delay=spec.get("delay"),
            stagger=spec.get("stagger"),
            webhook_drop_rate=spec.get("webhook_drop_rate"),
            replace=bool(spec.get("replace")),
        )

    def fail_next(
        self,
        status: int,
        times: int = 1,
        *,
        task_type: str | None = None,
        retry_after: float | str | None = None,
        code: str | None = None,
    ) -> None:
        self.script_faults(
            [
                {
                    "status": status,
                    "times": times,
                    "task_type": task_type,
                    "retry_after": retry_after,
                    "code": code,
                }
            ]
        )

    def drop_next(
        self, times: int = 1, *, after_accept: bool = False, task_type: str | None = None, reset: bool = False
    ) -> None:
        """Close the next connection(s) with no answer; `after_accept` does the work first."""
        mode = "reset" if reset else "close"
        key = "drop_after_accept" if after_accept else "drop"
        self.script_faults([{key: mode, "times": times, "task_type": task_type}])

    def clear_faults(self) -> None:
        self._faults.clear()
        self.configure(
            delay=self._initial_options.delay,
            stagger=self._initial_options.stagger,
            webhook_drop_rate=self._initial_options.webhook_drop_rate,
        )

    @property
    def faults(self) -> dict[str, Any]:
        snap = self._faults.snapshot()
        snap.update(
            delay=self.options.delay,
            stagger=self.options.stagger,
            webhook_drop_rate=self.options.webhook_drop_rate,
        )
        return snap

    def reset(self) -> None:
        """Back to the state just after start(): no tasks, counters at zero, no faults, initial options."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._call(self._reset(), 10)
        else:
            self._reset_state()

    async def _reset(self) -> None:
        await self._cancel_work()
        self._reset_state()

    def _reset_state(self) -> None:
        self._tasks.clear()
        self._failed_once.clear()
        self._images.clear()
        self._image_cache.clear()
        self._faults.clear()
        self._webhook_rng = random.Random()
        self.options = self._initial_options
        self._counters.reset()
        if self._http is not None:
            self._http.connections_opened = self._http.open_connections
            self._http.max_open_connections = self._http.open_connections

    def _call(self, coro: Any, timeout: float) -> Any:
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            raise RuntimeError("RunwareTestServer is not running")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError("call the async variant from the server's own loop")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    # ------------------------------------------------------------------ HTTP routing

    async def _handle(self, request: Request) -> Response | Drop:
        path = request.path.rstrip("/") or "/"
        if path.startswith("/_control"):
            return await self._control(request, path[len("/_control") :] or "/")
        if path.startswith(("/image/", "/v1/image/")) and request.method in ("GET", "HEAD"):
            return await self._serve_image(path.rsplit("/", 1)[-1])
        if path in ("/", "/v1"):
            if request.method != "POST":
                return Response.json(
                    405, {"errors": [error_item("methodNotAllowed", "POST a JSON array of tasks")]}
                )
            return await self._api(request)
        return Response.json(404, {"errors": [error_item("notFound", f"no route for {request.path}")]})

    async def _control(self, request: Request, sub: str) -> Response:
        try:
            if sub in ("/", "/health"):
                return Response.json(200, {"ok": True, "url": self.url})
            if sub == "/stats" and request.method == "GET":
                payload = self.stats
                if request.query.get("bodies") in ("1", "true"):
                    payload["request_bodies"] = self.request_bodies
                    payload["webhook_log"] = self.webhook_log
                return Response.json(200, payload)
            if sub == "/faults" and request.method == "GET":
                return Response.json(200, self.faults)
            if sub == "/faults" and request.method == "POST":
                self.apply_fault_spec(json.loads(request.body or b"{}"))
                return Response.json(200, self.faults)
            if sub == "/faults" and request.method == "DELETE":
                self.clear_faults()
                return Response.json(200, self.faults)
            if sub == "/config" and request.method == "POST":
                self.configure(**json.loads(request.body or b"{}"))
                return Response.json(200, dataclasses.asdict(self.options))
            if sub == "/reset" and request.method == "POST":
                await self._reset()
                return Response.json(200, {"ok": True})
        except (ValueError, TypeError) as exc:
            return Response.json(400, {"errors": [error_item("invalidControlRequest", str(exc))]})
        return Response.json(
            404, {"errors": [error_item("notFound", f"no control route {request.method} {sub}")]}
        )

    # ------------------------------------------------------------------ the API

    async def _api(self, request: Request) -> Response | Drop:
        c = self._counters
        c.bump("requests")
        try:
            tasks: Any = json.loads(request.body)
        except ValueError:
            tasks = None
        task_types: set[str] = set()
        if isinstance(tasks, list):
            with c.lock:
                for t in tasks:
                    if isinstance(t, dict):
                        c.by_type[str(t.get("taskType"))] += 1
                        if t.get("taskType") != AUTHENTICATION:
                            task_types.add(str(t.get("taskType")))
        if self.options.record_bodies:
            self._record_body(tasks if tasks is not None else request.body.decode("utf-8", "replace"))

        fault = self._faults.next_fault(task_types)
        if fault is not None:
            with c.lock:
                c.faults[fault.kind] += 1
            if fault.drop:
                return Drop(fault.drop)
            if fault.status is not None:
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                headers = []
                if fault.retry_after is not None:
                    headers.append(("retry-after", _retry_after_text(fault.retry_after)))
                body = {"errors": [status_error(fault.status, fault.code, fault.message)]}
                return Response.json(fault.status, body, headers)

        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            message = "The request body must be a non-empty JSON array of task objects."
            return Response.json(400, {"errors": [error_item(INVALID_REQUEST_BODY, message)]})

        if not self._authenticated(request, tasks):
            c.bump("auth_failures")
            return Response.json(401, {"errors": [status_error(401)]})

        work = [t for t in tasks if t.get("taskType") != AUTHENTICATION]
        if not work:
            return Response.json(
                200, {"data": [{"taskType": AUTHENTICATION, "connectionSessionUUID": str(uuid.uuid4())}]}
            )

        errors = self._validate(work)
        if errors:
            return Response.json(400, {"errors": errors})

        self._accept(work)
        if fault is not None and fault.drop_after_accept:
            return Drop(fault.drop_after_accept)
        response = await self._respond(work)
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        return response

    def _record_body(self, body: Any) -> None:
        if isinstance(body, list):
            body = [
                {**t, "apiKey": "***"} if isinstance(t, dict) and "apiKey" in t else copy.deepcopy(t)
                for t in body
            ]
        with self._counters.lock:
            if len(self._counters.bodies) < _MAX_RECORDED:
                self._counters.bodies.append(body)

    def _authenticated(self, request: Request, tasks: list[dict[str, Any]]) -> bool:
        key = self.options.api_key
        if key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip() == key:
            return True
        first = tasks[0]
        return first.get("taskType") == AUTHENTICATION and first.get("apiKey") == key

    def _validate(self, work: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All errors of the request; any error rejects the whole request, so nothing is half-accepted."""
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        conflicts = 0
        invalid = 0
        for task in work:
            task_type = task.get("taskType")
            task_uuid = task.get("taskUUID")
            if task_type == INFERENCE:
                found = validate_inference_task(
                    task, directory=self.options.seeds_dir, strict_uuid_v4=self.options.strict_uuid_v4
                )
                invalid += bool(found)
                errors += found
                if isinstance(task_uuid, str):
                    if task_uuid in self._tasks or task_uuid in seen:
                        conflicts += 1
                        errors.append(
                            error_item(
                                CONFLICT_TASK_UUID,
                                f"A task with taskUUID {task_uuid} was already submitted.",
                                parameter="taskUUID",
                                taskType=INFERENCE,
                                taskUUID=task_uuid,
                            )
                        )
                    seen.add(task_uuid)
            elif task_type == GET_RESPONSE:
                if not isinstance(task_uuid, str) or not task_uuid:
                    invalid += 1
                    errors.append(
                        error_item(
                            MISSING_PARAMETER,
                            "Missing required parameter 'taskUUID'.",
                            parameter="taskUUID",
                            taskType=GET_RESPONSE,
                        )
                    )
            elif task_type != PING:
                invalid += 1
                errors.append(
                    error_item(
                        UNSUPPORTED_TASK_TYPE,
                        f"Unsupported taskType {json.dumps(task_type)}.",
                        parameter="taskType",
                        taskType=task_type if isinstance(task_type, str) else None,
                        taskUUID=task_uuid if isinstance(task_uuid, str) else None,
                    )
                )
        self._counters.bump("conflicts", conflicts)
        self._counters.bump("validation_errors", invalid)
        return errors

    def _accept(self, work: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        for payload in work:
            if payload.get("taskType") != INFERENCE:
                continue
            prompt = str(payload.get("positivePrompt", ""))
            marker = _DELAY_RE.search(prompt)
            seed = payload.get("seed")
            task = _Task(
                task_uuid=payload["taskUUID"],
                payload=payload,
                number_results=int(payload.get("numberResults", 1)),
                seed=int(seed) if seed is not None else self._seed_rng.randrange(2**32),
                delay=float(marker.group(1)) if marker else opts.delay,
                stagger=opts.stagger,
                accepted_at=loop.time(),
                done=asyncio.Event(),
            )
            self._tasks[task.task_uuid] = task
            with self._counters.lock:
                self._counters.accepted[task.task_uuid] += 1
                self._counters.scalars["total_accepted"] += 1
            self._spawn(self._run_task(task), self._runners)

    async def _respond(self, work: list[dict[str, Any]]) -> Response:
        data: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for payload in work:
            task_type = payload.get("taskType")
            task_uuid = str(payload.get("taskUUID"))
            if task_type == INFERENCE:
                task = self._tasks.get(task_uuid)
                if task is None:  # reset() raced this request
                    errors.append(
                        error_item(TASK_NOT_FOUND, "Task vanished (server reset).", taskUUID=task_uuid)
                    )
                    continue
                if payload.get("deliveryMethod") == "async":
                    data.append({"taskType": INFERENCE, "taskUUID": task_uuid, "status": "processing"})
                    continue
                await task.done.wait()
                data += [i for i in task.items if i.get("status") != "error"]
                errors += task.errors
            elif task_type == GET_RESPONSE:
                self._counters.bump("get_response_polls")
                items, errs = self._poll(task_uuid)
                data += items
                errors += errs
            elif task_type == PING:
                data.append({"taskType": PING, "pong": True})
        return task_array_response(data, errors)

    def _poll(self, task_uuid: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        task = self._tasks.get(task_uuid)
        if task is None:
            message = f"No task with taskUUID {task_uuid} is known (never accepted, or expired)."
            err = error_item(
                TASK_NOT_FOUND, message, parameter="taskUUID", taskType=GET_RESPONSE, taskUUID=task_uuid
            )
            return [], [err]
        ttl = self.options.result_ttl
        if ttl is not None and task.finished_at is not None:
            if asyncio.get_running_loop().time() - task.finished_at > ttl:
                message = f"The results of task {task_uuid} expired."
                err = error_item(
                    TASK_EXPIRED, message, parameter="taskUUID", taskType=GET_RESPONSE, taskUUID=task_uuid
                )
                return [], [err]
        if not task.items:
            if task.done.is_set():  # cancelled by reset/stop
                return [], list(task.errors)
            return [{"taskType": INFERENCE, "taskUUID": task_uuid, "status": "processing"}], []
        items = [i if i.get("status") == "error" else {**i, "status": "success"} for i in task.items]
        return items, list(task.errors)

    # ------------------------------------------------------------------ generation

    async def _run_task(self, task: _Task) -> None:
        loop = asyncio.get_running_loop()
        prompt = str(task.payload.get("positivePrompt", ""))
        fail = _FAIL_RE.search(prompt)
        fail_once = FAIL_ONCE_MARKER in prompt and prompt not in self._failed_once
        if fail_once:
            self._failed_once.add(prompt)
        try:
            for index in range(task.number_results):
                wait = task.accepted_at + task.delay + index * task.stagger - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if fail:
                    code = fail.group(1) or TASK_FAILED
                    self._record_error(task, code, "The task failed (scripted by a __fail__ prompt marker).")
                    break
                if fail_once:
                    self._record_error(task, TASK_FAILED, "The task failed (scripted by __fail_once__).")
                    break
                try:
                    await self._produce(task, index)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("runware test server: generating %s failed", task.task_uuid)
                    self._record_error(task, "internalError", f"{type(exc).__name__}: {exc}")
        finally:
            task.finished_at = loop.time()
            task.done.set()
            self._counters.bump("tasks_finished")

    def _record_error(self, task: _Task, code: str, message: str, **extra: Any) -> None:
        err = error_item(code, message, taskType=INFERENCE, taskUUID=task.task_uuid, **extra)
        task.errors.append(err)
        item = {"taskType": INFERENCE, "taskUUID": task.task_uuid, "status": "error", **err}
        task.items.append(item)
        self._notify(task, item, err)

    async def _produce(self, task: _Task, index: int) -> None:
        payload = task.payload
        opts = self.options
        prompt = str(payload.get("positivePrompt", ""))
        spec = _ImageSpec(
            prompt=prompt,
            seed=task.seed + index,
            width=int(payload.get("width", 1024)),
            height=int(payload.get("height", 1024)),
            output_format=str(payload.get("outputFormat", "JPG")).upper(),
            quality=int(payload.get("outputQuality", 95)),
        )
        output_type = payload.get("outputType", "URL")
        upload = payload.get("uploadEndpoint")
        content_type = CONTENT_TYPES[spec.output_format]
        image_uuid = str(uuid.uuid4())
        # URL results are rendered when first downloaded: a benchmark of a thousand tasks pays for the
        # images it looks at, and the bytes are the same whenever they are made.
        data = await self._image_bytes(spec) if (output_type != "URL" or upload) else None
        ttl = payload.get("ttl")
        expires = asyncio.get_running_loop().time() + ttl if (ttl and opts.image_url_ttl) else None
        self._images[image_uuid] = _ImageRecord(spec, expires)

        item: dict[str, Any] = {"taskType": INFERENCE, "taskUUID": task.task_uuid, "imageUUID": image_uuid}
        if upload:
            assert data is not None
            if not await self._upload(str(upload), data, content_type):
                message = f"Uploading the image to the uploadEndpoint failed ({_strip_query(str(upload))})."
                self._record_error(task, UPLOAD_FAILED, message, imageUUID=image_uuid)
                return
            item["imageURL"] = _strip_query(str(upload))
        elif output_type == "URL":
            item["imageURL"] = f"{self.origin}/image/{image_uuid}.{EXTENSIONS[spec.output_format]}"
        if data is not None and output_type in ("base64Data", "dataURI"):
            encoded = base64.b64encode(data).decode("ascii")
            if output_type == "base64Data":
                item["imageBase64Data"] = encoded
            else:
                item["imageDataURI"] = f"data:{content_type};base64,{encoded}"
        item["seed"] = spec.seed
        item["NSFWContent"] = NSFW_MARKER in prompt
        if payload.get("includeCost"):
            item["cost"] = image_cost(str(payload.get("model")), spec.width, spec.height, opts.prices)
        task.items.append(item)
        self._notify(task, {**item, "status": "success"}, None)

    async def _image_bytes(self, spec: _ImageSpec) -> bytes:
        cached = self._image_cache.get(spec)
        if cached is not None:
            self._image_cache.move_to_end(spec)
            return cached
        pending = self._rendering.get(spec)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = asyncio.ensure_future(
                loop.run_in_executor(
                    self._executor,
                    render_image,
                    spec.prompt,
                    spec.seed,
                    spec.width,
                    spec.height,
                    spec.output_format,
                    spec.quality,
                )
            )
            self._rendering[spec] = pending
            try:
                data = await asyncio.shield(pending)
            finally:
                self._rendering.pop(spec, None)
            self._counters.bump("images_rendered")
            self._image_cache[spec] = data
            while len(self._image_cache) > max(0, self.options.image_cache_size):
                self._image_cache.popitem(last=False)
            return data
        return await asyncio.shield(pending)

    async def _serve_image(self, name: str) -> Response:
        image_uuid = name.split(".", 1)[0]
        record = self._images.get(image_uuid)
        now = asyncio.get_running_loop().time()
        if record is None or (record.expires_at is not None and now > record.expires_at):
            return Response.json(404, {"errors": [error_item("notFound", f"no image {name}")]})
        data = await self._image_bytes(record.spec)
        self._counters.bump("image_downloads")
        return Response(200, data, CONTENT_TYPES[record.spec.output_format], [("cache-control", "no-store")])

    # ------------------------------------------------------------------ outbound: uploads and webhooks

    async def _upload(self, url: str, data: bytes, content_type: str) -> bool:
        """One PUT, no retry: a failure must surface as uploadFailed, not be hidden."""
        assert self._client is not None
        self._counters.bump("uploads_attempted")
        try:
            response = await self._client.put(
                url, content=data, headers={"content-type": content_type}, timeout=self.options.upload_timeout
            )
            ok = 200 <= response.status_code < 300
        except httpx.HTTPError:
            ok = False
        self._counters.bump("uploads_succeeded" if ok else "uploads_failed")
        return ok

    def _notify(self, task: _Task, item: dict[str, Any], error: dict[str, Any] | None) -> None:
        url = task.payload.get("webhookURL")
        if not url:
            return
        if self.options.webhook_envelope:
            body: dict[str, Any] = {"data": [item]}
            if error is not None:
                body["errors"] = [error]
        else:
            body = item
        self._spawn(self._deliver_webhook(str(url), body), self._background)

    async def _deliver_webhook(self, url: str, body: dict[str, Any]) -> None:
        opts = self.options
        if opts.webhook_drop_rate and self._webhook_rng.random() < opts.webhook_drop_rate:
            self._counters.bump("webhooks_dropped")
            return
        assert self._client is not None
        content = json.dumps(body).encode()
        for attempt in range(max(1, opts.webhook_max_attempts)):
            self._counters.bump("webhook_attempts")
            status: int | None = None
            try:
                response = await self._client.post(
                    url,
                    content=content,
                    headers={"content-type": "application/json"},
                    timeout=opts.webhook_timeout,
                )
                status = response.status_code
            except httpx.HTTPError:
                pass
            with self._counters.lock:
                if len(self._counters.webhook_log) < _MAX_RECORDED:
                    self._counters.webhook_log.append(
                        {"url": url, "attempt": attempt + 1, "status": status, "body": body}
                    )
            if status is not None and 200 <= status < 300:
                self._counters.bump("webhook_deliveries")
                return
            await asyncio.sleep(opts.webhook_backoff * (2**attempt))
        self._counters.bump("webhook_failures")


def _strip_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _retry_after_text(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


def _raise_fd_limit() -> None:
    """A thousand clients and their thousand server-side sockets share this process's fd limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
