"""A run's images as the views show them: read from the manifests the operators wrote, never from XCom.

The run folder is `{output_path}/{dag_id}/{run_id}/{task}/{map index}/manifest.json` (see
`storage.ArtifactStore`), so one listing of the run's folder finds every manifest, however many task
instances wrote one. Parsed manifests are cached per process, keyed by path and the size and modification
time the listing reports, so turning the pages of a 10,000-image run reads each manifest once.

Files are served only by paths this module computes: the DAG and run segments from the ids (through
`storage.safe_segment`, as the writer did), the task and map-index segments and the file name from the
request, each checked against the characters the writer can produce; a name that is not an image, a
hidden file, `..`, or a local path whose real location is outside the output folder is refused.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_zimage.exceptions import NotServed
from airflow_provider_zimage.storage.artifacts import (
    MANIFEST_NAME,
    UNMAPPED_SEGMENT,
    ArtifactStore,
    as_path,
    read_json,
    safe_segment,
)

__all__ = [
    "IMAGE_TYPES",
    "Card",
    "Failure",
    "NotServed",
    "RunImages",
    "image_path",
    "read_run",
]

IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=-]{0,199}$")
_MAX_CACHED = 20_000


@dataclass(frozen=True)
class Card:
    """One stored image and what was asked for it."""

    task_id: str
    map_index: int
    task_segment: str
    map_segment: str
    name: str
    uri: str
    prompt: str
    negative_prompt: str
    seed: Any
    model: str
    width: int
    height: int
    format: str
    cost: float | None
    nsfw: bool


@dataclass(frozen=True)
class Failure:
    """A request of a batch manifest that produced no image, and why."""

    task_id: str
    map_index: int
    prompt: str
    reason: str


@dataclass
class RunImages:
    """Everything the Images tab of one run (or one task) shows."""

    dag_id: str
    run_id: str
    cards: list[Card] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    total_cost: float = 0.0
    manifests: int = 0
    skipped_nsfw: int = 0

    @property
    def count(self) -> int:
        return len(self.cards)

    def pages(self, per_page: int) -> int:
        return max(1, math.ceil(len(self.cards) / per_page))

    def page(self, number: int, per_page: int) -> list[Card]:
        start = (number - 1) * per_page
        return self.cards[start : start + per_page]


# -- reading manifests -------------------------------------------------------------------------------

_cache: OrderedDict[str, tuple[tuple[Any, ...], dict[str, Any]]] = OrderedDict()
_cache_lock = threading.Lock()


def _signature(info: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        info.get("size"),
        info.get("mtime") or info.get("LastModified") or info.get("last_modified"),
        info.get("ETag") or info.get("etag"),
    )


def _cached_manifest(path: ObjectStoragePath, info: Mapping[str, Any]) -> dict[str, Any] | None:
    key, signature = str(path), _signature(info)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == signature and signature != (None, None, None):
            _cache.move_to_end(key)
            return hit[1]
    data = read_json(path)
    if not isinstance(data, dict):
        return None
    with _cache_lock:
        _cache[key] = (signature, data)
        while len(_cache) > _MAX_CACHED:
            _cache.popitem(last=False)
    return data


def _run_dir(store: ArtifactStore, dag_id: str, run_id: str) -> ObjectStoragePath:
    return store.base / safe_segment(dag_id) / safe_segment(run_id)


def _manifests(run_dir: ObjectStoragePath) -> Iterable[tuple[str, str, ObjectStoragePath, Mapping[str, Any]]]:
    """(task segment, map segment, manifest path, listing info) of every manifest below the run folder."""
    fs = run_dir.fs
    try:
        found = fs.glob(f"{run_dir.path}/*/*/{MANIFEST_NAME}", detail=True)
    except FileNotFoundError:
        return
    for raw_path, info in sorted(found.items()):
        parts = str(raw_path).rstrip("/").split("/")
        task_segment, map_segment = parts[-3], parts[-2]
        yield task_segment, map_segment, run_dir / task_segment / map_segment / MANIFEST_NAME, info


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = mapping.get(key)
        if value not in (None, ""):
            return value
    return None


def _reason(item: Mapping[str, Any]) -> str:
    reason = _first(item, "reason", "message", "error", "errors")
    if isinstance(reason, list):
        reason = "; ".join(_text(e.get("message", e)) if isinstance(e, Mapping) else _text(e) for e in reason)
    elif isinstance(reason, Mapping):
        reason = _first(reason, "message", "code") or reason
    return _text(reason) or "no reason recorded"


def _map_index(manifest: Mapping[str, Any], map_segment: str) -> int:
    value = manifest.get("map_index")
    if isinstance(value, int):
        return value
    return int(map_segment) if map_segment.isdigit() else -1


def read_run(
    store: ArtifactStore,
    dag_id: str,
    run_id: str,
    *,
    task_id: str | None = None,
    map_index: int | None = None,
) -> RunImages:
    """The cards and failures of a run, in task, map-index and manifest order.

    `task_id` keeps one task (all its map indexes, or `map_index` alone when it is >= 0).
    """
    result = RunImages(dag_id=dag_id, run_id=run_id)
    wanted_task = safe_segment(task_id) if task_id else None
    entries = []
    for task_segment, map_segment, path, info in _manifests(_run_dir(store, dag_id, run_id)):
        if wanted_task is not None and task_segment != wanted_task:
            continue
        manifest = _cached_manifest(path, info)
        if manifest is None:
            continue
        index = _map_index(manifest, map_segment)
        if wanted_task is not None and map_index is not None and map_index >= 0 and index != map_index:
            continue
        task = _text(manifest.get("task_id")) or task_segment
        entries.append((task, index, task_segment, map_segment, manifest))
    entries.sort(key=lambda e: (e[0], e[1]))

    total = 0.0
    for task, index, task_segment, map_segment, manifest in entries:
        result.manifests += 1
        request: Mapping[str, Any] = (
            manifest["request"] if isinstance(manifest.get("request"), Mapping) else {}
        )
        images = [i for i in manifest.get("images") or [] if isinstance(i, Mapping)]
        cost = manifest.get("total_cost")
        total += float(cost) if cost is not None else sum(float(i.get("cost") or 0.0) for i in images)
        result.skipped_nsfw += int(manifest.get("skipped_nsfw") or 0)
        for image in images:
            own: Mapping[str, Any] = image["request"] if isinstance(image.get("request"), Mapping) else {}
            uri = _text(image.get("uri"))
            width, height = int(image.get("width") or 0), int(image.get("height") or 0)
            result.cards.append(
                Card(
                    task_id=task,
                    map_index=index,
                    task_segment=task_segment,
                    map_segment=map_segment,
                    name=_text(image.get("name")) or uri.rstrip("/").rsplit("/", 1)[-1],
                    uri=uri,
                    prompt=_text(
                        _first(image, "prompt", "positive_prompt", "positivePrompt")
                        or _first(own, "positivePrompt", "positive_prompt")
                        or _first(request, "positivePrompt", "positive_prompt")
                    ),
                    negative_prompt=_text(
                        _first(image, "negative_prompt", "negativePrompt")
                        or _first(own, "negativePrompt", "negative_prompt")
                        or _first(request, "negativePrompt", "negative_prompt")
                    ),
                    seed=image.get("seed"),
                    model=_text(image.get("model") or manifest.get("model") or request.get("model")),
                    width=width,
                    height=height,
                    format=_text(image.get("format")),
                    cost=None if image.get("cost") is None else float(image["cost"]),
                    nsfw=bool(image.get("nsfw")),
                )
            )
        for failed in manifest.get("failed") or []:
            item = failed if isinstance(failed, Mapping) else {"reason": failed}
            own = item["request"] if isinstance(item.get("request"), Mapping) else {}
            result.failures.append(
                Failure(
                    task_id=task,
                    map_index=index,
                    prompt=_text(
                        _first(item, "prompt", "positive_prompt", "positivePrompt")
                        or _first(own, "positivePrompt", "positive_prompt")
                    ),
                    reason=_reason(item),
                )
            )
    result.total_cost = round(total, 6)
    return result


# -- serving files -----------------------------------------------------------------------------------


def _check_segment(value: str, what: str) -> None:
    if not _SEGMENT.match(value) or value.strip(".") == "":
        raise NotServed(f"{what} {value!r} is not a folder or file this app writes")


def image_path(
    store: ArtifactStore, dag_id: str, run_id: str, task_segment: str, map_segment: str, name: str
) -> ObjectStoragePath:
    """The stored image a request names, computed below the output folder, or NotServed."""
    _check_segment(task_segment, "task folder")
    if map_segment != UNMAPPED_SEGMENT and not map_segment.isdigit():
        raise NotServed(f"map index folder {map_segment!r} is neither {UNMAPPED_SEGMENT!r} nor a number")
    _check_segment(name, "file name")
    if name.rsplit(".", 1)[-1].lower() not in IMAGE_TYPES:
        raise NotServed(f"{name!r} is not an image")
    path = _run_dir(store, dag_id, run_id) / task_segment / map_segment / name
    if path.protocol in ("", "file", "local"):
        root = os.path.realpath(as_path(store.base).path)
        real = os.path.realpath(path.path)
        if os.path.commonpath([root, real]) != root:
            raise NotServed(f"{name!r} resolves outside the output folder")
    return path
