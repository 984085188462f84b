"""The webhook inbox: where the API server leaves what Runware pushed, for the triggerer to pick up.

The process that receives a webhook (the Airflow API server) and the one waiting for it (the
triggerer) can be different processes on different machines, and either may restart at any moment.
Object storage is what both reach and what survives them, so an accepted webhook is written there
*before* Runware gets its 2xx, and the trigger finds it by listing the task's folder.

Layout, one object per finished item so that Runware's retries and duplicate deliveries overwrite an
object with identical bytes instead of adding one::

    {inbox}/{conn_id}/{taskUUID}/result-{imageUUID}.json
    {inbox}/{conn_id}/{taskUUID}/error-{sha256(code, message)[:16]}.json

Each connection has its own part: the API server writes a delivery into the part of the connection
whose secret checked its token, and a task reads only its own connection's part, so a connection's
secret can never put results in front of another connection's task (`webhooks.tokens`).

What nobody collects (a late or replayed delivery, a task that gave up) is removed by `sweep` once it
is older than `[zimage] webhook_inbox_ttl`; the webhook app runs it now and then (`webhooks.app`).

The inbox is `[zimage] webhook_inbox`, by default `file://{AIRFLOW_HOME}/zimage-webhook-inbox`; that
default only works when the API server and the triggerer share a disk (one machine, or `dag.test()`).

Synchronous like `storage`: async callers go through `asyncio.to_thread` (see `storage`'s docstring).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Collection, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_zimage import config
from airflow_provider_zimage.exceptions import ForeignTaskError as ForeignTaskError  # re-exported
from airflow_provider_zimage.exceptions import ZImageStorageError
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.protocol import RunwareResponse
from airflow_provider_zimage.storage.artifacts import (
    _airflow_home,
    as_path,
    read_json,
    safe_segment,
    write_json_atomic,
)

log = logging.getLogger(__name__)

DEFAULT_INBOX_DIR = "zimage-webhook-inbox"


def default_inbox_path() -> ObjectStoragePath:
    configured = config.webhook_inbox()
    if configured:
        return as_path(configured)
    return as_path(os.path.join(_airflow_home(), DEFAULT_INBOX_DIR))


def _modified(info: Mapping[str, Any]) -> float | None:
    """Epoch seconds an object was last written, from whichever key its filesystem reports."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
                return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()
    return None


def sweep(base: ObjectStoragePath | str | None, ttl: float, now: float | None = None) -> int:
    """Remove every inbox object older than `ttl` seconds (every connection, and the layout of 0.2);
    returns how many. One recursive listing; on local disks the folders it empties go too.

    Safe beside running tasks: a delivery is read within a few seconds of arriving, and a task whose
    delivery was removed finishes by polling `getResponse`, as after any lost webhook.
    """
    root = default_inbox_path() if base is None else as_path(base)
    fs = root.fs
    fs.invalidate_cache(root.path)
    cutoff = (time.time() if now is None else now) - ttl
    try:
        listed = fs.find(root.path, detail=True)
    except FileNotFoundError:
        return 0
    removed = 0
    parents: set[str] = set()
    for path, info in listed.items():
        modified = _modified(info)
        if modified is None or modified >= cutoff:
            continue
        with contextlib.suppress(FileNotFoundError):  # another API server swept it first
            fs.rm_file(path)
            removed += 1
        parents.add(str(path).rstrip("/").rsplit("/", 1)[0])
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        # Object stores have no folders; a local one keeps empty ones unless they are removed.
        top = str(root.path).rstrip("/")
        for parent in sorted(parents, key=len, reverse=True):
            while parent.startswith(top + "/"):
                try:
                    os.rmdir(parent)
                except OSError:  # not empty (or gone): its parents are not empty either
                    break
                parent = parent.rsplit("/", 1)[0]
    return removed


def inbox_entries(task_uuid: str, body: Any) -> dict[str, dict[str, Any]]:
    """The objects a webhook body becomes, keyed by object name; items still processing are dropped.

    Both documented body shapes are read (`protocol.webhook_items`), plus the `errors` array of the
    enveloped one. Errors are normalised to one shape so that the same error, delivered in `data` and
    in `errors`, or twice, lands in one object with the same bytes.

    :raises ForeignTaskError: an item names a taskUUID other than `task_uuid`.
    """
    items = protocol.webhook_items(body)
    if isinstance(body, Mapping) and isinstance(body.get("errors"), list):
        items += [{**e, "status": "error"} for e in body["errors"] if isinstance(e, Mapping)]
    entries: dict[str, dict[str, Any]] = {}
    for item in items:
        named = item.get("taskUUID")
        if named not in (None, task_uuid):
            raise ForeignTaskError(f"an item names task {named!r}, not the task of this webhook URL")
        if item.get("status") == "error":
            error = {
                "taskType": item.get("taskType") or "imageInference",
                "taskUUID": task_uuid,
                "status": "error",
                "code": item.get("code") or item.get("error") or "taskFailed",
                "message": item.get("message") or "the task failed at Runware",
                "parameter": item.get("parameter"),
            }
            digest = hashlib.sha256(f"{error['code']}\x1f{error['message']}".encode()).hexdigest()[:16]
            entries[f"error-{digest}.json"] = {k: v for k, v in error.items() if v is not None}
        elif item.get("imageUUID"):
            entries[f"result-{safe_segment(str(item['imageUUID']))}.json"] = {**item, "taskUUID": task_uuid}
    return entries


class WebhookInbox:
    """The inbox on any ObjectStoragePath; see the module docstring for the layout and why."""

    def __init__(self, base: ObjectStoragePath | str | None = None, *, conn_id: str) -> None:
        self.root = default_inbox_path() if base is None else as_path(base)
        self.conn_id = conn_id
        self.base = self.root / safe_segment(conn_id)
        """This connection's part of the inbox: everything below reads and writes only there."""

    def task_dir(self, task_uuid: str) -> ObjectStoragePath:
        return self.base / safe_segment(task_uuid)

    def put(self, task_uuid: str, entries: Mapping[str, dict[str, Any]]) -> None:
        directory = self.task_dir(task_uuid)
        for name, item in entries.items():
            write_json_atomic(directory / name, item)

    def names(self, task_uuid: str) -> set[str]:
        """Names of the task's stored items; cheap enough to call several times a second.

        The listing cache is dropped first: s3fs caches directory listings for the life of the
        filesystem object, which would hide every webhook that arrives after the first look.
        """
        directory = self.task_dir(task_uuid)
        fs = directory.fs
        fs.invalidate_cache(directory.path)
        try:
            listed = fs.ls(directory.path, detail=False)
        except FileNotFoundError:
            return set()
        names = {str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed}
        # Atomic writes on local disks go through hidden `.{name}.{random}.tmp` files.
        return {n for n in names if n.endswith(".json") and not n.startswith(".")}

    def read(self, task_uuid: str, names: Iterable[str]) -> RunwareResponse:
        """The named items as a getResponse answer would carry them, parsed by the same code."""
        directory = self.task_dir(task_uuid)
        items = []
        for name in sorted(names):
            try:
                item = read_json(directory / name)
            except ZImageStorageError as exc:  # written atomically, so damaged from outside
                log.warning("ignoring unreadable webhook item: %s", exc)
                continue
            if isinstance(item, dict):
                items.append(item)
        return protocol.parse_response(200, json.dumps({"data": items}).encode())

    def listed_tasks(self) -> set[str]:
        """Names of the task folders the connection's part holds, from one listing (cache dropped, as in
        `names`)."""
        fs = self.base.fs
        fs.invalidate_cache(self.base.path)
        try:
            listed = fs.ls(self.base.path, detail=False)
        except FileNotFoundError:
            return set()
        return {str(p).rstrip("/").rsplit("/", 1)[-1] for p in listed}

    def responses(self, task_uuids: Collection[str]) -> RunwareResponse:
        """Everything delivered so far for any of `task_uuids`, as one answer.

        One listing of the inbox finds which of them have items, so a batch of thousands of tasks costs
        one listing per look (plus one per task that has something), not one per task.
        """
        wanted = {safe_segment(u): u for u in task_uuids}
        merged = RunwareResponse()
        for segment in sorted(self.listed_tasks() & set(wanted)):
            task_uuid = wanted[segment]
            answer = self.read(task_uuid, self.names(task_uuid))
            merged.results += answer.results
            merged.errors += answer.errors
        return merged

    def discard(self, task_uuid: str) -> None:
        """Remove a task's items once its images are stored; a failure only leaves a few small files."""
        directory = self.task_dir(task_uuid)
        with contextlib.suppress(FileNotFoundError):
            directory.fs.rm(directory.path, recursive=True)


class InboxHealth:
    """Whether the inbox could be read on the last look, logged only when that changes.

    A failing inbox never ends a wait (getResponse polling after the grace period still finds the
    results), so a line per look would only bury the one that matters: when it started and stopped.
    """

    def __init__(self, log: logging.Logger | Any) -> None:
        self.log = log
        self.failing = False

    def failed(self, exc: Exception) -> None:
        if not self.failing:
            self.log.warning("Cannot read the webhook inbox, relying on polling until it works: %s", exc)
        self.failing = True

    def readable(self) -> None:
        if self.failing:
            self.log.info("The webhook inbox is readable again")
        self.failing = False


class BatchInboxWatch:
    """A batch's view of the inbox: what arrived for its pending tasks, read in one look.

    A failing inbox is reported when it starts and stops failing, not on every look, and never ends a
    wait: getResponse polling after the grace period still finds the results. Synchronous; the trigger
    calls `check` through `asyncio.to_thread`.
    """

    def __init__(self, inbox: str | None, log: logging.Logger | Any, *, conn_id: str) -> None:
        self.inbox = WebhookInbox(inbox, conn_id=conn_id)
        self.health = InboxHealth(log)

    def check(self, task_uuids: Collection[str]) -> RunwareResponse:
        try:
            answer = self.inbox.responses(task_uuids)
        except Exception as exc:
            self.health.failed(exc)
            return RunwareResponse()
        self.health.readable()
        return answer
