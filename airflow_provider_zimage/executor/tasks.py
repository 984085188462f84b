"""The executor's memory of tasks and images: what a `getResponse` answers, what a reused taskUUID hits.

In memory by default; with `--output-dir` every task record and image is also a file, written
atomically, so a restarted executor still answers for its tasks, serves their image URLs until they
expire and resumes the images it had accepted but not yet made. Without it a restart forgets
everything: clients polling a forgotten task get `taskNotFound`, which the provider treats as "results
lost, generate again" (free here, unlike on Runware).

Image URLs are `<public URL>/v1/image/<token>.<ext>` with a random 192-bit token: unguessable, so they
carry no credentials, like Runware's own image URLs; they stop working when their TTL runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ImageStore", "TaskRecord", "TaskTable"]

CONTENT_TYPES = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
EXTENSIONS = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class TaskRecord:
    """One accepted `imageInference` task.

    `payload` is the task as received (with the seed made explicit), kept so that a restart can resume
    it; `items` are its results so far (internal form: an image token instead of a URL); `failed` counts
    images that ended in an error.
    """

    task_uuid: str
    payload: dict[str, Any] = field(repr=False)
    expected: int
    accepted_at: float
    items: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    failed: int = 0
    finished_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    @property
    def outstanding(self) -> int:
        return self.expected - len(self.items) - self.failed

    def seeds_done(self) -> set[int]:
        return {int(i["seed"]) for i in self.items}

    def to_json(self) -> dict[str, Any]:
        return {
            "taskUUID": self.task_uuid,
            "payload": self.payload,
            "expected": self.expected,
            "acceptedAt": self.accepted_at,
            "items": self.items,
            "errors": self.errors,
            "failed": self.failed,
            "finishedAt": self.finished_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskRecord:
        record = cls(
            task_uuid=data["taskUUID"],
            payload=data["payload"],
            expected=int(data["expected"]),
            accepted_at=float(data["acceptedAt"]),
            items=list(data.get("items") or []),
            errors=list(data.get("errors") or []),
            failed=int(data.get("failed") or 0),
            finished_at=data.get("finishedAt"),
        )
        if record.finished_at is not None:
            record.done.set()
        return record


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb", opener=lambda p, f: os.open(p, f, 0o600)) as handle:
        handle.write(data)
    os.replace(tmp, path)


class ImageStore:
    """Encoded images by token; thread-safe (the device threads put, the event loop reads)."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._memory: dict[str, bytes] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def put(self, data: bytes, output_format: str) -> str:
        token = f"{secrets.token_urlsafe(24)}.{EXTENSIONS[output_format]}"
        if self._directory is not None:
            _write_atomic(self._directory / token, data)
        else:
            with self._lock:
                self._memory[token] = data
        return token

    def get(self, token: str) -> bytes | None:
        if "/" in token or token.startswith("."):
            return None
        if self._directory is not None:
            try:
                return (self._directory / token).read_bytes()
            except OSError:
                return None
        with self._lock:
            return self._memory.get(token)

    def delete(self, token: str) -> None:
        if self._directory is not None:
            with contextlib.suppress(OSError):
                (self._directory / token).unlink()
        else:
            with self._lock:
                self._memory.pop(token, None)


class TaskTable:
    """Every known task by taskUUID, expired after `result_ttl`, mirrored to disk when persistent."""

    def __init__(self, directory: Path | None, result_ttl: float) -> None:
        self._directory = directory
        self.result_ttl = result_ttl
        self.tasks: dict[str, TaskRecord] = {}
        self.expired: set[str] = set()  # answered taskExpired until the process ends
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def persistent(self) -> bool:
        return self._directory is not None

    def load(self) -> list[TaskRecord]:
        """Read the records a previous process left; returns the unfinished ones to resume."""
        if self._directory is None:
            return []
        unfinished = []
        for path in sorted(self._directory.glob("*.json")):
            try:
                record = TaskRecord.from_json(json.loads(path.read_bytes()))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("Ignoring unreadable task record %s: %s", path.name, exc)
                continue
            self.tasks[record.task_uuid] = record
            if record.finished_at is None:
                unfinished.append(record)
        log.info("Loaded %d task record(s), %d unfinished", len(self.tasks), len(unfinished))
        return unfinished

    def get(self, task_uuid: str) -> TaskRecord | None:
        return self.tasks.get(task_uuid)

    def add(self, record: TaskRecord) -> None:
        self.tasks[record.task_uuid] = record
        self.save(record)

    def save(self, record: TaskRecord) -> None:
        if self._directory is not None:
            data = json.dumps(record.to_json(), separators=(",", ":")).encode()
            _write_atomic(self._directory / f"{record.task_uuid}.json", data)

    def sweep(self, images: ImageStore, now: float | None = None) -> int:
        """Forget tasks finished longer than `result_ttl` ago, and delete their images."""
        now = time.time() if now is None else now
        gone = [
            r
            for r in self.tasks.values()
            if r.finished_at is not None and now - r.finished_at > self.result_ttl
        ]
        for record in gone:
            for item in record.items:
                if item.get("token"):
                    images.delete(item["token"])
            del self.tasks[record.task_uuid]
            self.expired.add(record.task_uuid)
            if self._directory is not None:
                with contextlib.suppress(OSError):
                    (self._directory / f"{record.task_uuid}.json").unlink()
        return len(gone)
