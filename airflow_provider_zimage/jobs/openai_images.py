"""One task instance's images on an OpenAI-compatible image server: record, call, store, never twice.

The OpenAI images API is synchronous and has no task ids: nothing can be reattached to after a worker
dies, and an answer lost on the way costs GPU time (cost 0), never money. So the worker makes the calls
itself, `max_in_flight` at a time, and `deferrable` / `defer_after` do not apply (a sync HTTP call
cannot be awaited across a worker restart; a trigger holding them would lose the images with the
triggerer instead). What matters is the ledger, one record per image (`_zimage_images.json`, next to
the artifacts, atomic):

* the seed of every image is chosen and recorded before the first call (image i of a request gets
  seed + i; an unseeded request gets a random base seed, recorded, so a retry makes the same picture),
* the intent is recorded before sending, and the stored manifest entry after the file is written,
* a retry (a killed worker, a failed try) reuses every image whose file is still there and intact,
  and calls the server only for the others: at most the images not yet stored are made again, and
  as every image's file name derives from the task instance, the request and the seed, one image is
  never stored as two files.

With `reuse="content"` (`reuse_content`), a seeded request whose picture any task stored before under
the same output_path with the same fingerprint (request, backend, connection id and served model name)
is copied from there (`content_index`: verified, cost 0, `reused_from`) instead of called; a batch
indexes the seeded pictures it made once it is done, as the Runware batch does.

Orchestration only: bodies and refusals are `openai_images.wire`'s, bytes move through
`hooks.openai_images`, files through `ArtifactStore`.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from airflow_provider_zimage.compat import AirflowException
from airflow_provider_zimage.exceptions import ZImageError, ZImagePermanentError, ZImageValidationError
from airflow_provider_zimage.hooks.openai_images import OpenAIImagesHook
from airflow_provider_zimage.jobs import content_index
from airflow_provider_zimage.jobs.generation import MANIFEST_VERSION, manifest_entry
from airflow_provider_zimage.jobs.ledger import JsonLedgerStore, derive_task_uuid, job_fingerprint
from airflow_provider_zimage.openai_images import wire
from airflow_provider_zimage.openai_images.wire import ImageCall
from airflow_provider_zimage.redaction import redact
from airflow_provider_zimage.runware.catalog import CATALOG
from airflow_provider_zimage.runware.models import ImageInferenceRequest, ImageResult
from airflow_provider_zimage.storage.artifacts import ArtifactStore, verify

IMAGES_STATE_FILE = "_zimage_images.json"
IMAGES_STATE_VERSION = 1
# Threads calling the server at once from one worker: a router spreads them; more only queue there.
MAX_ENGINE_CONCURRENCY = 64
SEED_RANGE = 2**31  # a random base seed every engine's generator takes
DEFERRAL_NOTE = (
    "backend openai_images: the worker makes the calls, at most %d at a time (the OpenAI images API is "
    "synchronous and has no task to reattach to, so deferrable=True and defer_after do not apply); "
    "every stored image is recorded, and a retry makes only the images not yet stored"
)

ImageStatus = Literal["intent", "stored"]


def engine_origin(conn_id: str, served_name: str) -> str:
    """Who makes the picture: the connection and the model name the server knows. Another served model
    (other weights) is another picture; another worker behind the same router is the same one."""
    return f"{conn_id}|{served_name}"


def engine_fingerprint(request: ImageInferenceRequest, conn_id: str, served: dict[str, str]) -> str:
    return job_fingerprint(
        request.fingerprint(),
        backend=wire.BACKEND,
        origin=engine_origin(conn_id, served.get(request.model, "")),
    )


@dataclass
class ImageRecord:
    """One image of one request: its seed, file name, and once stored, its manifest entry."""

    fingerprint: str
    seed: int
    image_uuid: str
    status: ImageStatus
    image: dict[str, Any] | None = None


@dataclass
class ImageLedger:
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    # "<index>" -> the base seed of that request (per fingerprint: an edited row gets its own)
    seeds: dict[str, dict[str, int]] = field(default_factory=dict)
    # "<index>/<offset>" -> the image
    images: dict[str, ImageRecord] = field(default_factory=dict)
    version: int = IMAGES_STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageLedger:
        if data.get("version") != IMAGES_STATE_VERSION:
            raise ValueError(
                f"unsupported image ledger version {data.get('version')!r} (this provider writes 1)"
            )
        images = {k: ImageRecord(**v) for k, v in (data.get("images") or {}).items()}
        seeds = {str(k): {str(f): int(s) for f, s in v.items()} for k, v in (data.get("seeds") or {}).items()}
        return cls(data["dag_id"], data["task_id"], data["run_id"], int(data["map_index"]), seeds, images)


class ImageLedgerStore(JsonLedgerStore[ImageLedger]):
    file_name = IMAGES_STATE_FILE
    description = "image ledger"
    indent = None

    def empty(self, dag_id: str, task_id: str, run_id: str, map_index: int) -> ImageLedger:
        return ImageLedger(dag_id, task_id, run_id, map_index)

    def parse(self, data: dict[str, Any]) -> ImageLedger:
        return ImageLedger.from_dict(data)


@dataclass(frozen=True)
class EngineItem:
    """One validated request of the task (index 0 for `ZImageGenerateOperator`)."""

    index: int
    request: ImageInferenceRequest
    fingerprint: str


@dataclass
class EngineResult:
    images: dict[int, list[dict[str, Any]]]
    failed: dict[int, str]
    reused: int = 0
    generated: int = 0
    permanent: bool = False


@dataclass(frozen=True)
class _Planned:
    item: EngineItem
    call: ImageCall
    key: str
    image_uuid: str


class EngineJob:
    """The images of one task instance on an OpenAI images server.

    :param served: {catalog AIR id: served name}, from the connection's `served_model` extra.
    :param force: make every image again (a new base seed for unseeded requests).
    :param reuse_content: reuse="content": copy a seeded request's picture stored before under the
        output_path (same fingerprint) instead of calling; a batch indexes what it made
        (`run_batch`; the single operator indexes its own through `content_index.record`).
    """

    def __init__(
        self,
        *,
        ref: Any,  # jobs.generation.TaskInstanceRef
        store: ArtifactStore,
        directory: Any,
        served: dict[str, str],
        max_in_flight: int,
        log: Any,
        force: bool = False,
        reuse_content: bool = False,
    ) -> None:
        self.ref = ref
        self.store = store
        self.directory = directory
        self.served = served
        self.max_in_flight = max_in_flight
        self.log = log
        self.force = force
        self.reuse_content = reuse_content
        self.ledgers = ImageLedgerStore(directory)
        self._lock = threading.Lock()

    def _load(self) -> ImageLedger:
        r = self.ref
        return self.ledgers.load(dag_id=r.dag_id, task_id=r.task_id, run_id=r.run_id, map_index=r.map_index)

    def plan(
        self, items: Sequence[EngineItem], ledger: ImageLedger | None = None, *, rows: bool = False
    ) -> list[_Planned]:
        """Every call of every request, refused as a whole (ZImageValidationError) before any is sent;
        `rows`: the error names the batch row (`requests[3].width: ...`)."""
        ledger = ledger or self._load()
        planned = []
        for item in items:
            seeds = ledger.seeds.setdefault(str(item.index), {})
            base = item.request.seed
            if base is None:
                base = seeds.get(item.fingerprint)
                if base is None or self.force:
                    base = secrets.randbelow(SEED_RANGE)
                seeds.clear()  # one seed per row: an edited row's old seed is not kept
                seeds[item.fingerprint] = base
            try:
                calls = wire.plan_calls(item.request, self.served, base)
            except ZImageValidationError as exc:
                if not rows:
                    raise
                first = exc.parameters[0] if exc.parameters else ""
                raise ZImageValidationError(f"requests[{item.index}].{first}: {exc}", exc.errors) from None
            for call in calls:
                key = f"{item.index}/{call.offset}"
                image_uuid = derive_task_uuid(
                    dag_id=self.ref.dag_id,
                    task_id=self.ref.task_id,
                    run_id=self.ref.run_id,
                    map_index=self.ref.map_index,
                    fingerprint=f"{wire.BACKEND}\x1f{key}\x1f{item.fingerprint}\x1f{call.seed}",
                    generation=0,
                )
                planned.append(_Planned(item, call, key, image_uuid))
        return planned

    def run(self, items: Sequence[EngineItem], hook: OpenAIImagesHook) -> EngineResult:
        ledger = self._load()
        planned = self.plan(items, ledger, rows=len(items) > 1)
        # Requests removed from the list are forgotten.
        keys = {p.key for p in planned}
        for key in [k for k in ledger.images if k not in keys]:
            del ledger.images[key]
        result = EngineResult(images={i.index: [] for i in items}, failed={})
        todo: list[_Planned] = []
        for p in planned:
            record = ledger.images.get(p.key)
            if (
                not self.force
                and record is not None
                and record.status == "stored"
                and record.image_uuid == p.image_uuid
                and record.image is not None
                and verify(record.image)
            ):
                result.reused += 1
                continue
            # Intent before sending: the seed and the file name are fixed before the server sees them.
            ledger.images[p.key] = ImageRecord(p.item.fingerprint, p.call.seed, p.image_uuid, "intent")
            todo.append(p)
        if result.reused:
            self.log.info("%d image(s) already stored by an earlier try: not made again", result.reused)
        todo = self._copy_content(todo, ledger, result)
        self.ledgers.save(ledger)
        if not todo:
            return self._ordered(result, planned, ledger)
        self.log.info(DEFERRAL_NOTE, self.max_in_flight)
        with ThreadPoolExecutor(max(1, min(self.max_in_flight, len(todo)))) as pool:
            futures = [(p, pool.submit(self._make, hook, p, ledger)) for p in todo]
            for p, future in futures:
                try:
                    future.result()
                    result.generated += 1
                except ZImageError as exc:
                    message = redact(str(exc), hook.settings.secrets)
                    result.failed.setdefault(
                        p.item.index, f"image {p.call.offset} (seed {p.call.seed}): {message}"
                    )
                    result.permanent = result.permanent or isinstance(exc, ZImagePermanentError)
        return self._ordered(result, planned, ledger)

    def _copy_content(
        self, todo: list[_Planned], ledger: ImageLedger, result: EngineResult
    ) -> list[_Planned]:
        """reuse="content": each seeded request none of whose images this task stored yet is looked up
        in the content index (read once) and copied from where it was stored, all its images or none;
        the copies are recorded as stored here, so a retry of this task keeps them. Returns what is
        still to call."""
        if not self.reuse_content or self.force:
            return todo
        by_item: dict[int, list[_Planned]] = {}
        for p in todo:
            by_item.setdefault(p.item.index, []).append(p)
        candidates = [
            calls
            for calls in by_item.values()
            if calls[0].item.request.seed is not None
            and len(calls) == (calls[0].item.request.number_results or 1)
        ]
        if not candidates:
            return todo
        index = content_index.ContentIndex(self.store)

        def copy(calls: list[_Planned]) -> list[dict[str, Any]] | None:
            item = calls[0].item
            try:
                return index.reuse(item.fingerprint, self.directory, durable=False)
            except ZImageError as exc:  # a copy that fails costs GPU time, never the batch
                self.log.warning("requests[%d]: could not reuse the indexed image: %s", item.index, exc)
                return None

        copied: set[str] = set()
        with ThreadPoolExecutor(max(1, min(self.max_in_flight, len(candidates)))) as pool:
            for calls, copies in zip(candidates, pool.map(copy, candidates), strict=True):
                by_seed = {c.get("seed"): c for c in copies or ()}
                if len(by_seed) != len(calls) or any(p.call.seed not in by_seed for p in calls):
                    continue  # not this request's images after all (a hint): call
                for p in calls:
                    entry = {**by_seed[p.call.seed], "index": p.item.index}
                    ledger.images[p.key] = ImageRecord(
                        p.item.fingerprint, p.call.seed, p.image_uuid, "stored", entry
                    )
                    copied.add(p.key)
        if copied:
            # The copies were written without one flush each; made durable here, all at once.
            self.store.flush()
            result.reused += len(copied)
            self.log.info(
                "reuse='content': %d image(s) stored before under this output_path: copied, not made again",
                len(copied),
            )
        return [p for p in todo if p.key not in copied]

    def _index_content(self, items: Sequence[EngineItem], result: EngineResult) -> None:
        """reuse="content": the seeded pictures this batch made (not copies), one index for the task
        instance, written once it is done."""
        if not self.reuse_content:
            return
        pictures = [
            (item.fingerprint, images)
            for item in items
            if item.request.seed is not None
            and (images := result.images.get(item.index) or [])
            and len(images) == (item.request.number_results or 1)
            and not any("reused_from" in i for i in images)
        ]
        r = self.ref
        try:
            content_index.record_batch(
                self.store, content_index.batch_id(r.dag_id, r.run_id, r.task_id, r.map_index), pictures
            )
        except ZImageError as exc:  # a lost hint costs GPU time later, not these images
            self.log.warning("Could not index the batch's images for reuse: %s", exc)

    def _make(self, hook: OpenAIImagesHook, p: _Planned, ledger: ImageLedger) -> None:
        request = p.item.request
        spec = CATALOG[request.model]
        width, height = request.width or spec.default_width, request.height or spec.default_height
        data = wire.encode_result(hook.generate(p.call), request, width=width, height=height)
        artifact = self.store.write_image(self.directory, p.image_uuid, data)
        result = ImageResult.model_validate(
            {"taskType": "imageInference", "imageUUID": p.image_uuid, "seed": p.call.seed, "cost": 0.0}
        )
        entry = {**manifest_entry(artifact.to_dict(), result, model=request.model), "index": p.item.index}
        with self._lock:
            ledger.images[p.key] = ImageRecord(p.item.fingerprint, p.call.seed, p.image_uuid, "stored", entry)
            self.ledgers.save(ledger)

    @staticmethod
    def _ordered(result: EngineResult, planned: list[_Planned], ledger: ImageLedger) -> EngineResult:
        """Images in request order, then seed order, whatever order the calls finished in."""
        images: dict[int, list[dict[str, Any]]] = {i: [] for i in result.images}
        for p in planned:
            record = ledger.images.get(p.key)
            if record is not None and record.status == "stored" and record.image is not None:
                images[p.item.index].append(record.image)
        result.images = images
        return result

    def run_batch(
        self, items: Sequence[EngineItem], hook: OpenAIImagesHook, *, fail_on_partial_error: bool = True
    ) -> dict[str, Any]:
        """`ZImageBatchGenerateOperator`'s run on this backend: the same manifest (`kind: batch`, one
        entry per image with its request `index`, `failed` rows) and the same small XCom summary."""
        result = self.run(items, hook)
        self._index_content(items, result)
        images = [image for index in sorted(result.images) for image in result.images[index]]
        failed = [{"index": i, "task_uuid": None, "reason": result.failed[i]} for i in sorted(result.failed)]
        manifest = {
            "version": MANIFEST_VERSION,
            "kind": "batch",
            "backend": wire.BACKEND,
            "dag_id": self.ref.dag_id,
            "task_id": self.ref.task_id,
            "run_id": self.ref.run_id,
            "map_index": self.ref.map_index,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "requests": len(items),
            "images": images,
            "failed": failed,
            "total_cost": 0.0,
        }
        path = self.store.write_manifest(self.directory, manifest)
        self.log.info(
            "Batch done: %d image(s) from %d request(s), %d failed, %d reused; cost $0 (%s)",
            len(images),
            len(items),
            len(failed),
            result.reused,
            wire.BACKEND,
        )
        if failed and fail_on_partial_error:
            listing = "; ".join(f"requests[{f['index']}]: {f['reason']}" for f in failed[:20])
            more = f" (and {len(failed) - 20} more)" if len(failed) > 20 else ""
            raise AirflowException(
                f"{len(failed)} of {len(items)} request(s) failed (every other image is stored in {path}); "
                f"a retry makes only the images not yet stored: {listing}{more}"
            )
        return {
            "manifest_uri": str(path),
            "images": len(images),
            "failed": len(failed),
            "reused": result.reused,
            "total_cost": 0.0,
        }
