"""The batch ledger: one deterministic taskUUID per request of a `ZImageBatchGenerateOperator`.

The same three layers as `state` (deterministic taskUUID, intent before the POST and submitted after,
on object storage next to the artifacts), for thousands of requests in one task instance: a retry or a
killed worker reads it and reattaches to every submitted request, and sends only what was never accepted.

Written in time linear in the batch (a catalogue is 100,000 rows; rewriting the whole ledger per chunk
cost the square of that): `_zimage_batch.json` is a snapshot (written atomically, versioned), and every
state change after it is a small record in a journal segment, one object per save
(`_zimage_batch.journal/{seq}.jsonl`, written atomically: object stores have no append). Loading reads
the snapshot and replays the segments after it; the job compacts (a new snapshot, then the segments
removed) when it finishes, defers, or the journal outgrows the live state. A crash at any moment leaves
a snapshot and whole segments, so a retry always has a record to reattach to.

The request's index is part of the taskUUID material, so two identical requests in one batch are two
images (the user listed them twice), and an edited row gets a new fingerprint, hence a new taskUUID.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from airflow_provider_zimage.jobs.ledger import JsonLedgerStore, derive_task_uuid
from airflow_provider_zimage.storage.artifacts import (
    ZImageStorageError,
    as_path,
    dumps_json,
    dumps_json_lines,
    write_bytes_atomic,
    write_chunks_atomic,
)

log = logging.getLogger(__name__)

BATCH_STATE_FILE = "_zimage_batch.json"
BATCH_JOURNAL_DIR = "_zimage_batch.journal"
BATCH_STATE_VERSION = 1

# What a journal record of an entry already journaled under the same taskUUID carries: the fields a
# state change moves. Everything else (fingerprint, taskUUID, digests) is written once per generation.
_MUTABLE = ("status", "submitted_at", "reason", "ended_try")
_SEGMENT = re.compile(r"^(\d{12})\.jsonl$")

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
    # Indexes changed since the last save (`touch`, `record`, `forget`): what the next journal segment
    # holds. Not part of the document.
    dirty: set[int] = field(default_factory=set, repr=False, compare=False)

    def touch(self, entry: BatchEntry) -> None:
        """Something about `entry` changed outside `record` (ended_try, reason, a new generation)."""
        self.entries[entry.index] = entry
        self.dirty.add(entry.index)

    def forget(self, index: int) -> None:
        """A request removed from the list (a shorter re-run)."""
        if self.entries.pop(index, None) is not None:
            self.dirty.add(index)

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
            self.dirty.add(index)
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
        self.dirty.add(entry.index)

    def to_dict(self, *, entries: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "dag_id": self.dag_id,
            "task_id": self.task_id,
            "run_id": self.run_id,
            "map_index": self.map_index,
        }
        if entries:
            # A shallow copy per entry, not dataclasses.asdict: asdict deep-copies every image dict.
            data["entries"] = {str(i): dict(vars(e)) for i, e in sorted(self.entries.items())}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchLedger:
        if data.get("version") != BATCH_STATE_VERSION:
            raise ValueError(
                f"unsupported batch ledger version {data.get('version')!r} (this provider writes 1)"
            )
        entries = {int(k): BatchEntry(**v) for k, v in (data.get("entries") or {}).items()}
        return cls(data["dag_id"], data["task_id"], data["run_id"], int(data["map_index"]), entries)

    def apply(self, record: dict[str, Any]) -> None:
        """One journal record: a whole entry, the fields a state change moved, or a removal."""
        index = int(record.pop("i"))
        if record.get("deleted"):
            self.entries.pop(index, None)
        elif "task_uuid" in record:
            self.entries[index] = BatchEntry(index=index, **record)
        elif index in self.entries:
            for name, value in record.items():
                setattr(self.entries[index], name, value)


class BatchLedgerStore(JsonLedgerStore[BatchLedger]):
    """The batch ledger of one task instance: `_zimage_batch.json` and its journal (module docstring)."""

    file_name = BATCH_STATE_FILE
    description = "batch ledger"
    # Compact: by machines for machines.
    indent = None

    def __init__(self, directory: Any) -> None:
        super().__init__(directory)
        self.journal = as_path(directory) / BATCH_JOURNAL_DIR
        # The last segment written or read, and what the snapshot already holds.
        self.seq = 0
        self.snapshot_seq = 0
        # Bytes in the journal since the snapshot, and the snapshot's own size: the journal is
        # compacted when it outgrows the live state, so a reader never replays much more than it keeps.
        self.journal_bytes = 0
        self.snapshot_bytes = 0
        # taskUUID each entry was last journaled (or loaded) under: later records carry only `_MUTABLE`.
        self._written: dict[int, str] = {}
        # Images are written once per generation: the count last journaled for each entry.
        self._images: dict[int, int] = {}
        self.bytes_written = 0
        self.files_written = 0

    def empty(self, dag_id: str, task_id: str, run_id: str, map_index: int) -> BatchLedger:
        return BatchLedger(dag_id, task_id, run_id, map_index)

    def parse(self, data: dict[str, Any]) -> BatchLedger:
        self.snapshot_seq = self.seq = int(data.get("journal_seq") or 0)
        return BatchLedger.from_dict(data)

    def load(self, *, dag_id: str, task_id: str, run_id: str, map_index: int) -> BatchLedger:
        """The snapshot, then every whole journal segment after it, in order."""
        ledger = super().load(dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=map_index)
        for seq, path in self._segments():
            self.seq = max(self.seq, seq)
            if seq <= self.snapshot_seq:
                continue  # compacted into the snapshot; its removal was interrupted
            try:
                raw = path.fs.cat_file(path.path)
                for line in raw.decode("utf-8").splitlines():
                    if line.strip():
                        ledger.apply(json.loads(line))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # A segment is written whole or not at all; an unreadable one is someone else's damage.
                # Skipping it can at worst resubmit, which the deterministic taskUUIDs make a conflict.
                log.warning("ignoring unreadable %s segment %s: %s", self.description, path, exc)
                continue
            self.journal_bytes += len(raw)
        self._written = {i: e.task_uuid for i, e in ledger.entries.items()}
        self._images = {i: len(e.images) for i, e in ledger.entries.items()}
        ledger.dirty.clear()
        return ledger

    def _segments(self) -> list[tuple[int, Any]]:
        try:
            children = list(self.journal.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = []
        for child in children:
            match = _SEGMENT.match(child.name)
            if match:
                found.append((int(match.group(1)), child))
        return sorted(found, key=lambda s: s[0])

    def _record(self, ledger: BatchLedger, index: int) -> dict[str, Any]:
        entry = ledger.entries.get(index)
        if entry is None:
            self._written.pop(index, None)
            self._images.pop(index, None)
            return {"i": index, "deleted": True}
        if self._written.get(index) != entry.task_uuid:
            record = {"i": index, **{k: v for k, v in vars(entry).items() if k != "index"}}
        else:
            record = {"i": index, **{k: getattr(entry, k) for k in _MUTABLE}}
            if self._images.get(index) != len(entry.images) or entry.status == "stored":
                record["images"] = entry.images
        self._written[index] = entry.task_uuid
        self._images[index] = len(entry.images)
        return record

    def save(self, ledger: BatchLedger) -> None:
        """What changed since the last save, as one journal segment (or a snapshot when it outgrew it)."""
        if not ledger.dirty:
            return
        payload = b"".join(dumps_json(self._record(ledger, i), indent=None) for i in sorted(ledger.dirty))
        self.seq += 1
        write_bytes_atomic(self.journal / f"{self.seq:012d}.jsonl", payload)
        ledger.dirty.clear()
        self.journal_bytes += len(payload)
        self.bytes_written += len(payload)
        self.files_written += 1
        # A journal that replays much more than it keeps (rounds of ended_try on the same entries):
        # compact. A plain run writes each entry about three times and never gets here before its end.
        if self.journal_bytes > 4 * max(self.snapshot_bytes, 1 << 20):
            self.compact(ledger)

    def compact(self, ledger: BatchLedger) -> None:
        """The whole ledger as the snapshot, then the journal it replaces removed.

        The snapshot names the last segment it holds (`journal_seq`), so a crash between the two steps
        leaves segments that the next load skips, never replays over newer state.
        """
        ledger.dirty.clear()  # changed entries go straight into the snapshot
        head = ledger.to_dict(entries=False)
        head["journal_seq"] = self.seq
        # One entry encoded at a time: 100,000 entries are never held a second time, as text.
        head["entries"] = ((str(i), dict(vars(e))) for i, e in sorted(ledger.entries.items()))
        _, size = write_chunks_atomic(self.path, dumps_json_lines(head, "entries", pairs=True))
        self.bytes_written += size
        self.files_written += 1
        self.snapshot_seq = self.seq
        self.snapshot_bytes = size
        self.journal_bytes = 0
        self._written = {i: e.task_uuid for i, e in ledger.entries.items()}
        self._images = {i: len(e.images) for i, e in ledger.entries.items()}
        segments = [path for seq, path in self._segments() if seq <= self.seq]
        if segments:
            try:
                segments[0].fs.rm([p.path for p in segments])
            except (OSError, ZImageStorageError) as exc:  # skipped by the next load: left, not harmful
                log.warning("could not remove the compacted %s journal: %s", self.description, exc)
