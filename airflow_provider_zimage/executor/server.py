"""The executor service: Runware's wire protocol (the subset the provider uses) over local GPUs.

`POST /v1` takes a task array exactly as the provider's hook sends it to Runware: `imageInference`
(`deliveryMethod` sync or async, `webhookURL`, `uploadEndpoint`, `outputType` URL / base64Data /
dataURI), `getResponse` (partial results as they come), `ping`. A reused taskUUID answers
`conflictTaskUUID`, which the hook reads as "already submitted": the ledger, the trigger, the batched
poller and retries work unchanged. Anything the local pipelines cannot honour is refused with a 400
naming the parameter, in the words of the in-process backend (both call `local.planning`).

`GET /health` (JSON: models and their weights, devices, queue depth, loads) and `GET /metrics`
(Prometheus text) need no token: they hold no prompt, image or secret. Image URLs need none either
(unguessable, with a TTL). Everything under `/v1` needs `Authorization: Bearer <token>`.

SIGTERM drains: new `imageInference` tasks get 503 (transient: the client retries later, with the
same taskUUID), queued work runs for up to `--drain-timeout`, `getResponse` and image downloads keep
working meanwhile; sync requests still waiting at the end get 503. Without `--output-dir` the results
live only in this process, so the drain also waits (within the same timeout) until every image made in
the last `--fetch-grace` seconds was fetched once: a client polling a second after the last image was
made must still find it. What was
never started, or never fetched, is kept and resumed at the next start with `--output-dir`, and
forgotten without it (clients then see `taskNotFound` and generate again).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import signal
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from airflow_provider_zimage import __version__
from airflow_provider_zimage.exceptions import UploadFailed, ZImageError, ZImageValidationError
from airflow_provider_zimage.executor.config import ExecutorConfig, weights_id
from airflow_provider_zimage.executor.metrics import Metrics
from airflow_provider_zimage.executor.queues import DeviceQueue, Outcome, WorkUnit
from airflow_provider_zimage.executor.tasks import CONTENT_TYPES, ImageStore, TaskRecord, TaskTable
from airflow_provider_zimage.executor.transport import HTTPServer, Request, Response, task_array_response
from airflow_provider_zimage.local import LocalZImageExecutor, Plan, load_count
from airflow_provider_zimage.local.pipelines import import_runtime, resolve_device
from airflow_provider_zimage.runware.models import ImageInferenceRequest, resolve_model

log = logging.getLogger(__name__)

__all__ = ["ExecutorServer"]

INFERENCE, GET_RESPONSE, PING = "imageInference", "getResponse", "ping"
WEBHOOK_ATTEMPTS = 4


def error_item(code: str, message: str, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"code": code, "message": message}
    item.update({k: v for k, v in extra.items() if v is not None})
    return item


def _errors(status: int, items: list[dict[str, Any]], headers: Sequence[tuple[str, str]] = ()) -> Response:
    return Response.json(status, {"errors": items}, list(headers))


def _strip_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class ExecutorServer:
    """One executor process: the models loaded once per device, the queues, the task table, HTTP."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        persistent = config.output_dir
        self.tasks = TaskTable(persistent / "tasks" if persistent else None, config.result_ttl)
        self.images = ImageStore(persistent / "images" if persistent else None)
        self.draining = False
        self.port: int | None = None
        self.weights = {air: weights_id(source) for air, source in config.models.items()}
        # ControlNets are weights too: a client's fingerprint must change when a folder is swapped.
        self.controlnet_weights = {air: weights_id(folder) for air, folder in config.controlnets.items()}
        self._queues: list[DeviceQueue] = []
        self._planner: LocalZImageExecutor | None = None
        self._http = HTTPServer(self._handle)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._closing = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._client: Any = None
        self._by_token: dict[str, dict[str, Any]] = {}

    # -- life cycle ----------------------------------------------------------------------------------

    def _engines(self) -> None:
        """One LocalZImageExecutor per (model, device); the pipeline cache makes each load happen once."""
        import torch  # why: an optional dependency (the `local` extra), needed once the models load

        import_runtime()
        devices: list[str] = []
        for requested in self.config.devices:
            if requested == "auto":
                count = torch.cuda.device_count()
                devices += [f"cuda:{i}" for i in range(count)] if count else ["cpu"]
            else:
                devices.append(resolve_device(torch, requested))
        for device in dict.fromkeys(devices):
            engines = {
                air: LocalZImageExecutor(
                    source,
                    device=device,
                    dtype=self.config.dtype,
                    local_files_only=self.config.local_files_only,
                    max_models_per_device=len(self.config.models),
                    input_roots=list(self.config.input_roots),
                    lora_roots=None if self.config.lora_roots is None else list(self.config.lora_roots),
                    input_origins=list(self.config.input_url_origins),
                    controlnet_paths=self.config.controlnets,
                )
                for air, source in self.config.models.items()
            }
            self._queues.append(DeviceQueue(device, engines, self.config.max_batch, self._batch_done))
        self._planner = next(iter(self._queues[0].engines.values()))

    async def serve(self, ready: Any = None) -> None:
        """Load, listen, serve until SIGTERM/SIGINT, drain, return."""
        import httpx

        self._loop = asyncio.get_running_loop()
        self._engines()
        if self.config.preload:
            for queue in self._queues:
                for air, engine in queue.engines.items():
                    started = time.perf_counter()
                    await asyncio.to_thread(engine.pipeline, air)
                    log.info("Loaded %s on %s in %.1fs", air, queue.device, time.perf_counter() - started)
        self._client = httpx.AsyncClient(timeout=30.0)
        for loop_signal in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(loop_signal, self._stop.set)
        for queue in self._queues:
            queue.start()
        for record in self.tasks.load():
            self._resume(record)
        for record in self.tasks.tasks.values():
            self._by_token.update({i["token"]: i for i in record.items if i.get("token")})
        self.port = await self._http.start(self.config.host, self.config.port)
        log.info(
            "zimage-executor %s listening on %s (devices %s, max batch %d, results %s)",
            __version__,
            self.base_url,
            ", ".join(q.device for q in self._queues),
            self.config.max_batch,
            f"kept in {self.config.output_dir}" if self.tasks.persistent else "in memory only",
        )
        if ready is not None:
            ready(self)
        sweeper = asyncio.create_task(self._sweep())
        await self._stop.wait()
        sweeper.cancel()
        await self._drain()

    def request_stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    async def _drain(self) -> None:
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout
        log.info("Draining: no new tasks; up to %.0fs for the queued work", self.config.drain_timeout)
        while time.monotonic() < deadline and not all(q.idle() for q in self._queues):
            await asyncio.sleep(0.05)
        while self._background and time.monotonic() < deadline + 5:  # uploads and webhooks in flight
            await asyncio.sleep(0.05)
        if not self.tasks.persistent:
            # Results held in memory die with the process: a client that polls a moment after the last
            # image is made (a trigger's next poll, a worker resuming from deferral) would find the
            # executor gone and have to generate again. Keep serving each recent result until it was
            # fetched; one unfetched for --fetch-grace seconds has no client coming for it.
            if waiting := self._unfetched():
                log.info("Waiting for clients to fetch %d result(s) held only in memory", waiting)
            while time.monotonic() < deadline and self._unfetched():
                await asyncio.sleep(0.05)
            if lost := self._unfetched():
                log.warning(
                    "%d recent result(s) not fetched within --drain-timeout are lost (no --output-dir): "
                    "their clients will get taskNotFound and generate them again",
                    lost,
                )
        # A pipeline call cannot be interrupted: wait for the running one (seconds on a GPU), so its
        # images are recorded and the process exits cleanly.
        left = sum(len(q.stop(timeout=300.0)) for q in self._queues)
        if left:
            if self.tasks.persistent:
                log.warning(
                    "%d queued image(s) not started: kept in --output-dir, resumed at next start", left
                )
            else:
                log.warning(
                    "%d queued image(s) not started and forgotten (no --output-dir): clients will get "
                    "taskNotFound and generate them again",
                    left,
                )
        self._closing.set()
        await asyncio.sleep(0.1)  # let waiting sync requests answer 503
        await self._http.close()
        if self._client is not None:
            await self._client.aclose()
        log.info("zimage-executor stopped")

    def _unfetched(self) -> int:
        """Images made in the last `fetch_grace` seconds whose bytes no client has received yet (URL
        never downloaded, inline data never answered, no upload)."""
        since = time.time() - self.config.fetch_grace
        return sum(
            1
            for record in self.tasks.tasks.values()
            for item in record.items
            if not item.get("fetched") and item.get("madeAt", 0.0) >= since
        )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(1.0, self.config.result_ttl / 4)))
            self.tasks.sweep(self.images)
            now = time.time()
            for token in [t for t, i in self._by_token.items() if now > i["expiresAt"]]:
                del self._by_token[token]

    @property
    def base_url(self) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            import socket

            host = socket.gethostname()
        return f"http://{host}:{self.port}"

    # -- HTTP ----------------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        path = request.path.rstrip("/") or "/"
        if request.method in ("GET", "HEAD"):
            if path == "/health":
                return Response.json(200, self.health())
            if path == "/metrics":
                depths = {q.device: q.depth for q in self._queues}
                text = self.metrics.render(depths, load_count(), self.draining)
                return Response(200, text.encode(), "text/plain; version=0.0.4")
            if path.startswith("/v1/image/"):
                return self._image(path.rsplit("/", 1)[-1])
        if path in ("/", "/v1"):
            if request.method != "POST":
                return _errors(405, [error_item("methodNotAllowed", "POST a JSON array of tasks")])
            return await self._api(request)
        return _errors(404, [error_item("notFound", f"no route for {request.method} {request.path}")])

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
            "version": __version__,
            "models": [
                {"model": air, "source": source, "weights": self.weights[air]}
                for air, source in self.config.models.items()
            ],
            "controlNets": [
                {"model": air, "source": folder, "weights": self.controlnet_weights[air]}
                for air, folder in self.config.controlnets.items()
            ],
            "devices": [{"device": q.device, "queueDepth": q.depth, "busy": q.busy} for q in self._queues],
            "queueDepth": sum(q.depth for q in self._queues),
            "loads": load_count(),
            "maxBatch": self.config.max_batch,
            "persistent": self.tasks.persistent,
        }

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.config.token)

    async def _api(self, request: Request) -> Response:
        if not self._authorized(request):
            return _errors(
                401, [error_item("invalidApiKey", "Missing or wrong bearer token for this executor.")]
            )
        try:
            tasks: Any = json.loads(request.body)
        except ValueError:
            tasks = None
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            message = "The request body must be a non-empty JSON array of task objects."
            return _errors(400, [error_item("invalidRequestBody", message)])
        work = [t for t in tasks if t.get("taskType") != "authentication"]
        inference = [t for t in work if t.get("taskType") == INFERENCE]
        if inference and self.draining:
            message = "The executor is shutting down; submit again shortly (same taskUUID)."
            return _errors(503, [error_item("serviceUnavailable", message)], [("retry-after", "5")])
        errors, accepted = await self._validate(work)
        if errors:
            return _errors(400, errors)
        self._accept([(record, plan, plan.seeds) for record, plan in accepted])
        return await self._respond(work)

    async def _validate(self, work: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
        """Every error of the request; any error rejects all of it, so nothing is half-accepted."""
        errors: list[dict[str, Any]] = []
        accepted: list[tuple[TaskRecord, Plan]] = []
        seen: set[str] = set()
        for task in work:
            task_type, task_uuid = task.get("taskType"), task.get("taskUUID")
            ids = {"taskType": task_type if isinstance(task_type, str) else None}
            ids["taskUUID"] = task_uuid if isinstance(task_uuid, str) else None
            if task_type == GET_RESPONSE:
                if not isinstance(task_uuid, str) or not task_uuid:
                    errors.append(
                        error_item("missingParameter", "Missing 'taskUUID'.", parameter="taskUUID", **ids)
                    )
                continue
            if task_type == PING:
                continue
            if task_type != INFERENCE:
                errors.append(
                    error_item(
                        "unsupportedTaskType",
                        f"This executor runs imageInference, getResponse and ping, not {task_type!r}.",
                        parameter="taskType",
                        **ids,
                    )
                )
                continue
            if isinstance(task_uuid, str) and (task_uuid in seen or self.tasks.get(task_uuid) is not None):
                errors.append(
                    error_item(
                        "conflictTaskUUID",
                        f"A task with taskUUID {task_uuid} was already submitted.",
                        parameter="taskUUID",
                        **ids,
                    )
                )
                continue
            if isinstance(task_uuid, str):
                seen.add(task_uuid)
            payload = {k: v for k, v in task.items() if k != "deliveryMethod"}
            try:
                req = ImageInferenceRequest.build(**payload)
                air = resolve_model(req.model).air
                if air not in self.config.models:
                    raise ZImageValidationError(
                        f"model: {req.model} is not served by this executor",
                        [
                            {
                                "parameter": "model",
                                "message": "is not served by this executor (it serves "
                                f"{', '.join(self.config.models)})",
                            }
                        ],
                    )
                assert self._planner is not None
                plan = await asyncio.to_thread(self._planner.plan, req, delivery_supported=True)
                # Before acceptance, with the served model's own tokenizer (local/prompts.py).
                await asyncio.to_thread(self._queues[0].engines[air].check_prompts, plan)
            except ZImageValidationError as exc:
                errors += _refusal_items(exc, ids)
                continue
            except ZImageError as exc:  # an input image that could not be downloaded
                # Named like a refusal of the same parameter: "not allowed" and "not reachable" must
                # read alike to a token holder (local/images.py).
                parameter = getattr(exc, "parameter", None)
                errors.append(error_item("invalidParameter", str(exc), parameter=parameter, **ids))
                continue
            payload.update({"taskUUID": plan.task_uuid, "seed": plan.seeds[0], "model": air})
            record = TaskRecord(plan.task_uuid, payload, len(plan.seeds), time.time())
            accepted.append((record, plan))
        return errors, accepted

    def _accept(
        self, accepted: Sequence[tuple[TaskRecord, Plan, Sequence[int]]], *, resumed: bool = False
    ) -> None:
        """Record the tasks, then enqueue all their images in one step on the least busy device, so
        the device thread sees them together and batches the compatible ones."""
        queue = min(self._queues, key=lambda q: q.depth)
        units = []
        verb = "Resumed" if resumed else "Accepted"  # one "Accepted" line per taskUUID, ever
        for record, plan, seeds in accepted:
            self.tasks.add(record)
            units += [WorkUnit(record.task_uuid, plan, seed) for seed in seeds]
            log.info("%s task %s: %d image(s) on %s", verb, record.task_uuid, len(seeds), queue.device)
        queue.put(units)

    def _resume(self, record: TaskRecord) -> None:
        """A task a previous process accepted and did not finish: make the images it still owes."""
        try:
            req = ImageInferenceRequest.build(**record.payload)
            assert self._planner is not None
            plan = self._planner.plan(req, delivery_supported=True)
        except ZImageError as exc:
            record.errors += _refusal_items(exc, {"taskType": INFERENCE, "taskUUID": record.task_uuid})
            record.failed = record.outstanding
            self._finish(record)
            return
        done = record.seeds_done()
        self._accept([(record, plan, [s for s in plan.seeds if s not in done])], resumed=True)

    async def _respond(self, work: list[dict[str, Any]]) -> Response:
        data: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for task in work:
            task_type, task_uuid = task.get("taskType"), str(task.get("taskUUID"))
            if task_type == INFERENCE:
                record = self.tasks.get(task_uuid)
                assert record is not None
                if task.get("deliveryMethod") == "async":
                    data.append({"taskType": INFERENCE, "taskUUID": task_uuid, "status": "processing"})
                    continue
                closing = asyncio.ensure_future(self._closing.wait())
                finished = asyncio.ensure_future(record.done.wait())
                await asyncio.wait([closing, finished], return_when=asyncio.FIRST_COMPLETED)
                closing.cancel()
                finished.cancel()
                if not record.done.is_set():
                    message = (
                        "The executor shut down before the task finished; send it again (same taskUUID)."
                    )
                    return _errors(503, [error_item("serviceUnavailable", message)], [("retry-after", "5")])
                data += self._answer(record)
                errors += record.errors
            elif task_type == GET_RESPONSE:
                # The same dispatch as the test server's on purpose: both answer Runware's wire, each
                # over its own task table; the answer itself is shared (task_array_response).
                items, errs = self._poll(task_uuid)
                data += items
                errors += errs
            elif task_type == PING:
                data.append({"taskType": PING, "pong": True})
        return task_array_response(data, errors)

    def _poll(self, task_uuid: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        ids = {"parameter": "taskUUID", "taskType": GET_RESPONSE, "taskUUID": task_uuid}
        record = self.tasks.get(task_uuid)
        if record is None:
            if task_uuid in self.tasks.expired:
                return [], [error_item("taskExpired", f"The results of task {task_uuid} expired.", **ids)]
            message = (
                f"No task with taskUUID {task_uuid} is known to this executor "
                "(never accepted, or lost in a restart)."
            )
            return [], [error_item("taskNotFound", message, **ids)]
        if not record.items and not record.errors and not record.done.is_set():
            return [{"taskType": INFERENCE, "taskUUID": task_uuid, "status": "processing"}], []
        # As Runware (and its test server) answer a task that failed: 200, an item with status "error"
        # under the taskUUID beside any images, and the same errors in `errors`. A 400 with no item
        # would read as our poll being refused: "fail, clear to reattach" to a task that can only
        # fail again, instead of "generate again".
        failed = [{**error, "status": "error"} for error in record.errors]
        return self._answer(record) + failed, list(record.errors)

    def _answer(self, record: TaskRecord) -> list[dict[str, Any]]:
        """The task's results for a response; inline data in an answer counts as fetched."""
        wire = [self._wire(record, item) for item in record.items]
        if record.payload.get("outputType", "URL") != "URL":
            for item in record.items:
                item["fetched"] = True
        return wire

    def _wire(self, record: TaskRecord, item: dict[str, Any]) -> dict[str, Any]:
        """A stored result as Runware sends it: the URL built now, inline data read from the store."""
        payload = record.payload
        wire = {
            "taskType": INFERENCE,
            "taskUUID": record.task_uuid,
            "imageUUID": item["imageUUID"],
            "seed": item["seed"],
            "status": "success",
        }
        if item.get("nsfw") is not None:  # only what the classifier said (local/safety.py)
            wire["NSFWContent"] = item["nsfw"]
        if payload.get("includeCost"):
            wire["cost"] = 0.0
        output_type = payload.get("outputType", "URL")
        if item.get("uploadedTo"):
            wire["imageURL"] = item["uploadedTo"]
        elif output_type == "URL":
            wire["imageURL"] = f"{self.base_url}/v1/image/{item['token']}"
        else:
            data = self.images.get(item["token"]) or b""
            encoded = base64.b64encode(data).decode("ascii")
            if output_type == "base64Data":
                wire["imageBase64Data"] = encoded
            else:
                wire["imageDataURI"] = f"data:{CONTENT_TYPES[item['format']]};base64,{encoded}"
        return wire

    def _image(self, token: str) -> Response:
        item = self._by_token.get(token)
        if item is not None and time.time() <= item["expiresAt"]:
            data = self.images.get(token)
            if data is not None:
                item["fetched"] = True
                return Response(200, data, CONTENT_TYPES[item["format"]], [("cache-control", "no-store")])
        return _errors(404, [error_item("notFound", "No such image (or its URL expired).")])

    # -- results from the device threads -------------------------------------------------------------

    def _batch_done(
        self, queue: DeviceQueue, units: list[WorkUnit], outcome: Outcome, started: float
    ) -> None:
        """On a device thread: store the bytes (disk I/O stays off the event loop), then hand over."""
        seconds = time.monotonic() - started
        waits = [started - u.enqueued_at for u in units]
        ok = not isinstance(outcome, BaseException)
        self.metrics.batch(queue.device, len(units), seconds, waits, ok)
        if queue.device.startswith("cuda"):
            import torch

            self.metrics.gpu_memory(queue.device, int(torch.cuda.max_memory_allocated(queue.device)))
        stored: list[dict[str, Any]] | BaseException
        if isinstance(outcome, BaseException):
            stored = outcome
        else:
            stored = []
            for unit, image in zip(units, outcome, strict=True):
                token = self.images.put(image.data, image.format)
                stored.append(
                    {
                        "imageUUID": image.result["imageUUID"],
                        "seed": unit.seed,
                        "token": token,
                        "format": image.format,
                        "data": image.data,
                        "nsfw": image.result.get("NSFWContent"),  # None: no check was asked
                    }
                )
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._record_batch, units, stored)

    def _record_batch(self, units: list[WorkUnit], stored: list[dict[str, Any]] | BaseException) -> None:
        for index, unit in enumerate(units):
            record = self.tasks.get(unit.task_uuid)
            if record is None:
                continue
            if isinstance(stored, BaseException):
                self._fail_image(record, stored)
                continue
            item = dict(stored[index])
            data = item.pop("data")
            ttl = min(float(record.payload.get("ttl") or self.config.result_ttl), self.config.result_ttl)
            item["madeAt"] = time.time()
            item["expiresAt"] = item["madeAt"] + ttl
            upload = record.payload.get("uploadEndpoint")
            if upload:
                self._spawn(self._upload_then_add(record, item, str(upload), data))
            else:
                self._add_item(record, item)

    def _fail_image(self, record: TaskRecord, exc: BaseException) -> None:
        """An accepted task failed: Runware's shape, an error item under the taskUUID (see `_poll`).

        The codes are those of the Runware test server for the same failures: `uploadFailed` (with the
        image's UUID), `taskFailed` for a task this backend could not run (a LoRA that does not load,
        NaN images), `internalError` (transient: the client reattaches) for anything unexpected.
        """
        ids = {"taskType": INFERENCE, "taskUUID": record.task_uuid}
        if isinstance(exc, UploadFailed):
            items = [error_item("uploadFailed", str(exc), imageUUID=exc.image_uuid, **ids)]
        elif isinstance(exc, ZImageValidationError):
            items = [error_item("taskFailed", str(exc), **ids)]
        else:
            code = "taskFailed" if isinstance(exc, ZImageError) else "internalError"
            items = [error_item(code, f"{type(exc).__name__}: {exc}", **ids)]
        record.failed += 1
        if not record.errors:
            record.errors += items
            for item in items:
                self._notify(record, {**item, "status": "error"}, item)
        self._progress(record)

    def _add_item(self, record: TaskRecord, item: dict[str, Any]) -> None:
        record.items.append(item)
        self._by_token[item["token"]] = item
        self._notify(record, self._wire(record, item), None)
        self._progress(record)

    def _progress(self, record: TaskRecord) -> None:
        if record.outstanding <= 0:
            self._finish(record)
        else:
            self.tasks.save(record)

    def _finish(self, record: TaskRecord) -> None:
        record.finished_at = time.time()
        self.tasks.save(record)
        record.done.set()
        self.metrics.task("error" if record.errors else "success")
        log.info(
            "Task %s finished: %d image(s), %d error(s)", record.task_uuid, len(record.items), record.failed
        )

    # -- outbound: uploads and webhooks --------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _upload_then_add(self, record: TaskRecord, item: dict[str, Any], url: str, data: bytes) -> None:
        """One PUT, no retry (as Runware): a failure is the task's `uploadFailed`, never hidden."""
        try:
            response = await self._client.put(
                url, content=data, headers={"content-type": CONTENT_TYPES[item["format"]]}
            )
            ok = 200 <= response.status_code < 300
        except Exception:
            ok = False
        if ok:
            item["uploadedTo"] = _strip_query(url)
            item["fetched"] = True  # the bytes are in the client's storage already
            self._add_item(record, item)
            return
        message = f"Uploading the image to the uploadEndpoint failed ({_strip_query(url)})."
        self._fail_image(record, UploadFailed(message, str(item["imageUUID"])))

    def _notify(self, record: TaskRecord, item: dict[str, Any], error: dict[str, Any] | None) -> None:
        url = record.payload.get("webhookURL")
        if not url:
            return
        body: dict[str, Any] = {"data": [item]}
        if error is not None:
            body["errors"] = [error]
        self._spawn(self._deliver_webhook(str(url), body))

    async def _deliver_webhook(self, url: str, body: dict[str, Any]) -> None:
        content = json.dumps(body).encode()
        for attempt in range(WEBHOOK_ATTEMPTS):
            try:
                response = await self._client.post(
                    url, content=content, headers={"content-type": "application/json"}
                )
                if 200 <= response.status_code < 300:
                    return
                status: Any = response.status_code
            except Exception as exc:
                status = type(exc).__name__
            log.warning("Webhook to %s failed (%s), attempt %d", _strip_query(url), status, attempt + 1)
            await asyncio.sleep(0.5 * 2**attempt)


def _refusal_items(exc: ZImageError, ids: dict[str, Any]) -> list[dict[str, Any]]:
    """A `ZImageValidationError` as Runware-style error items, one per parameter, with Runware's code
    for the kind of mistake (`missingParameter`, `unsupportedParameter`, else `invalidParameter`)."""
    entries = getattr(exc, "errors", None) or []
    items = []
    for entry in entries:
        parameter = entry.get("parameter")
        message = entry.get("message") or str(exc)
        text = f"{parameter}: {message}" if parameter else message
        code = entry.get("code") or "invalidParameter"
        items.append(error_item(code, text, parameter=parameter, **ids))
    return items or [error_item("invalidParameter", str(exc), **ids)]
