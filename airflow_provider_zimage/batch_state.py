"""The batch ledger: one deterministic taskUUID per request of a `ZImageBatchGenerateOperator`.

The same three layers as `state` (deterministic taskUUID, intent before the POST and submitted after,
on object storage next to the artifacts), for thousands of requests in one task instance. One file per
task instance (`_zimage_batch.json`, written atomically, versioned): a retry or a killed worker reads it
and reattaches to every submitted request, and sends only what was never accepted.

The request's index is part of the taskUUID material, so two identical requests in one batch are two
images (the user listed them twice), and an edited row gets a new fingerprint, hence a new taskUUID.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow_provider_zimage.state import derive_task_uuid
from airflow_provider_zimage.storage import ZImageStorageError, read_json, write_json_atomic

log = logging.getLogger(__name__)

BATCH_STATE_FILE = "_zimage_batch.json"
BATCH_STATE_VERSION = 1

EntryStatus = Literal["intent", "submitted", "failed", "stored"]


@dataclass
class BatchEntry:
    """One request of the batch: its current generation and what is known about it."""

    index: int
    fingerprint: str
    generation: int
    task_uuid: str
    status: EntryStatus
    expected_results: int = 1
    submitted_at: float | None = None
    reason: str | None = None
    # Set when this try ended waiting on the entry without moving the ledger (a transient task-level
    # error, or its deadline): the next try reattaches to the same taskUUID.
    ended_try: bool = False
    images: list[dict[str, Any]] = field(default_factory=list)
    # What was paid for, small enough for thousands of entries: the model, one short digest per request
    # parameter (to name what a template renders differently, never the values) and the digest of the
    # row as the DAG wrote it, before rendering (see `generation.arguments_digest`).
    model: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    arguments: str | None = None


@dataclass
class BatchLedger:
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    entries: dict[int, BatchEntry] = field(default_factory=dict)
    version: int = BATCH_STATE_VERSION

    def _uuid(self, index: int, fingerprint: str, generation: int) -> str:
        return derive_task_uuid(
            dag_id=self.dag_id,
            task_id=self.task_id,
            run_id=self.run_id,
            map_index=self.map_index,
            fingerprint=f"batch\x1f{index}\x1f{fingerprint}",
            generation=generation,
        )

    def entry_for(
        self,
        index: int,
        fingerprint: str,
        expected_results: int,
        *,
        fresh: bool,
        legacy: Sequence[str] = (),
        arguments: str | None = None,
        keep_stored: bool = True,
    ) -> BatchEntry:
        """The recorded entry to reattach to, or the next generation for a new, changed or failed request.

        `fresh` (a new try) moves a failed entry to a new generation; within one try (a deferral resumed)
        a failed entry stays failed, so it is paid for at most once per try. `legacy`: what an earlier
        release called the same picture; such an entry is kept, taskUUID and images, under `fingerprint`.

        A request that renders differently (another fingerprint) keeps the recorded entry within a try,
        whatever it is: what was submitted is what gets stored. On a new try it keeps a pending entry,
        and a stored one unless `keep_stored` is False (force=True), when the row as written in the DAG
        (`arguments`) is unchanged; an edited row is a new request.
        """
        previous = self.entries.get(index)
        if previous is not None and previous.fingerprint in legacy:
            previous.fingerprint = fingerprint
        if previous is not None and previous.fingerprint != fingerprint:
            same_row = arguments is not None and previous.arguments == arguments
            pending = previous.status in ("intent", "submitted") or (
                keep_stored and previous.status == "stored"
            )
            if not fresh or (same_row and pending):
                return previous
        if previous is not None and previous.fingerprint == fingerprint:
            if previous.status in ("intent", "submitted", "stored") or not fresh:
                return previous
            generation = previous.generation + 1
        else:
            generation = 0
        entry = BatchEntry(
            index,
            fingerprint,
            generation,
            self._uuid(index, fingerprint, generation),
            "intent",
            expected_results,
        )
        return entry

    def regenerate(self, entry: BatchEntry) -> BatchEntry:
        """A stored entry whose files are gone (or force=True): the next generation, paid again."""
        generation = entry.generation + 1
        return BatchEntry(
            entry.index,
            entry.fingerprint,
            generation,
            self._uuid(entry.index, entry.fingerprint, generation),
            "intent",
            entry.expected_results,
        )

    def record(self, entry: BatchEntry, status: EntryStatus, reason: str | None = None) -> None:
        entry.status = status
        entry.reason = reason
        if status == "submitted" and entry.submitted_at is None:
            entry.submitted_at = time.time()
        self.entries[entry.index] = entry

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "dag_id": self.dag_id,
            "task_id": self.task_id,
            "run_id": self.run_id,
            "map_index": self.map_index,
            # A shallow copy per entry, not dataclasses.asdict: asdict deep-copies every image dict and
            # was half the cost of each save of a 1,000-request ledger.
            "entries": {str(i): dict(vars(e)) for i, e in sorted(self.entries.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchLedger:
        if data.get("version") != BATCH_STATE_VERSION:
            raise ValueError(
                f"unsupported batch ledger version {data.get('version')!r} (this provider writes 1)"
            )
        entries = {int(k): BatchEntry(**v) for k, v in (data.get("entries") or {}).items()}
        return cls(data["dag_id"], data["task_id"], data["run_id"], int(data["map_index"]), entries)


class BatchLedgerStore:
    def __init__(self, directory: Any) -> None:
        self.path = directory / BATCH_STATE_FILE

    def load(self, *, dag_id: str, task_id: str, run_id: str, map_index: int) -> BatchLedger:
        try:
            data = read_json(self.path)
            if data is None:
                return BatchLedger(dag_id, task_id, run_id, map_index)
            return BatchLedger.from_dict(data)
        except (KeyError, TypeError, ValueError, ZImageStorageError) as exc:
            # Starting over can at worst re-send: the deterministic taskUUIDs turn that into conflicts.
            log.warning("ignoring unreadable batch ledger %s: %s", self.path, exc)
            return BatchLedger(dag_id, task_id, run_id, map_index)

    def save(self, ledger: BatchLedger) -> None:
        # Compact: rewritten after every chunk and every round of results, by machines for machines.
        write_json_atomic(self.path, ledger.to_dict(), indent=None)
