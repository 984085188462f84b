"""The batch ledger's journal: every save a small segment, a snapshot at the end, a crash anywhere readable.

Local paths and S3 (moto) both: object storage has no append, so a segment is a new object.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage.jobs.batch_ledger import (
    BATCH_JOURNAL_DIR,
    BATCH_STATE_FILE,
    BatchLedger,
    BatchLedgerStore,
)
from airflow_provider_zimage.storage.artifacts import as_path, write_json_atomic
from tests.s3_server import MOTO_CONN_ID  # the s3_bucket fixture comes with tests/conftest.py

IDENTITY = {"dag_id": "shop", "task_id": "catalogue", "run_id": "manual__1", "map_index": -1}


def fresh(store: BatchLedgerStore) -> BatchLedger:
    return store.load(**IDENTITY)


def a_batch(store: BatchLedgerStore, n: int) -> BatchLedger:
    """`n` requests sent in chunks of 10 and stored, saved as the job saves them."""
    ledger = fresh(store)
    entries = [ledger.entry_for(i, f"fp{i}", 1, fresh=True) for i in range(n)]
    for start in range(0, n, 10):
        chunk = entries[start : start + 10]
        for e in chunk:
            ledger.record(e, "intent")
        store.save(ledger)
        for e in chunk:
            ledger.record(e, "submitted")
        store.save(ledger)
        for e in chunk:
            e.images = [{"uri": f"file:///x/{e.task_uuid}.jpg", "sha256": "0" * 64, "index": e.index}]
            ledger.record(e, "stored")
        store.save(ledger)
    return ledger


def same(a: BatchLedger, b: BatchLedger) -> None:
    assert {i: vars(e) for i, e in a.entries.items()} == {i: vars(e) for i, e in b.entries.items()}


@pytest.fixture(params=["local", "s3"])
def directory(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        return as_path(tmp_path / "task")
    bucket = request.getfixturevalue("s3_bucket")
    return as_path(f"s3://{MOTO_CONN_ID}@{bucket}/out/shop/manual__1/catalogue/unmapped")


def test_a_killed_worker_leaves_a_journal_the_retry_reads_whole(directory: Any):
    ledger = a_batch(BatchLedgerStore(directory), 30)
    again = fresh(BatchLedgerStore(directory))
    same(ledger, again)
    assert {e.status for e in again.entries.values()} == {"stored"}


def test_each_save_writes_only_what_changed(directory: Any):
    store = BatchLedgerStore(directory)
    a_batch(store, 30)
    journal = store.bytes_written
    store.compact(fresh(BatchLedgerStore(directory)))
    # Three small records per request, the first one whole: about the size of the final ledger.
    assert journal <= 1.5 * store.snapshot_bytes, (journal, store.snapshot_bytes)


def test_compaction_folds_the_journal_into_the_snapshot_and_removes_it(directory: Any):
    store = BatchLedgerStore(directory)
    ledger = a_batch(store, 20)
    store.compact(ledger)
    assert store._segments() == []
    again = BatchLedgerStore(directory)
    same(ledger, again.load(**IDENTITY))
    # Saves after a compaction continue the journal after what the snapshot holds.
    ledger.record(ledger.entries[3], "failed", "taskFailed")
    again.save(ledger)
    assert fresh(BatchLedgerStore(directory)).entries[3].status == "failed"


def test_a_crash_between_snapshot_and_journal_removal_never_replays_old_segments(
    directory: Any, monkeypatch: pytest.MonkeyPatch
):
    store = BatchLedgerStore(directory)
    ledger = a_batch(store, 20)
    fs = type(store.journal.fs)
    monkeypatch.setattr(fs, "rm", lambda self, *a, **k: (_ for _ in ()).throw(OSError("killed")))
    store.compact(ledger)  # the removal fails: the folded segments stay
    monkeypatch.undo()
    # The stored entries are not rolled back to the `intent` of an old segment.
    reloaded = BatchLedgerStore(directory)
    same(ledger, reloaded.load(**IDENTITY))
    ledger.entries[5].ended_try = True
    ledger.touch(ledger.entries[5])
    reloaded.save(ledger)  # numbered after the leftovers, so it is replayed
    assert fresh(BatchLedgerStore(directory)).entries[5].ended_try is True


def test_an_unreadable_segment_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    directory = as_path(tmp_path / "task")
    a_batch(BatchLedgerStore(directory), 10)
    (tmp_path / "task" / BATCH_JOURNAL_DIR / "000000000002.jsonl").write_text('{"i": 0, "status": ')
    with caplog.at_level(logging.WARNING):
        ledger = fresh(BatchLedgerStore(directory))
    assert "ignoring unreadable batch ledger segment" in caplog.text
    assert ledger.entries[0].status == "stored"  # the later segments still apply


def test_a_ledger_written_by_the_previous_release_is_read(tmp_path: Path):
    """0.3 wrote the whole ledger as one document after every chunk, no journal."""
    directory = as_path(tmp_path / "task")
    previous = BatchLedger(**IDENTITY)  # type: ignore[arg-type]
    entry = previous.entry_for(0, "fp0", 1, fresh=True)
    previous.record(entry, "submitted")
    write_json_atomic(directory / BATCH_STATE_FILE, previous.to_dict(), indent=None)
    ledger = fresh(BatchLedgerStore(directory))
    assert ledger.entries[0].task_uuid == entry.task_uuid and ledger.entries[0].status == "submitted"
    # and a removed request is journaled as a removal
    store = BatchLedgerStore(directory)
    ledger = store.load(**IDENTITY)
    ledger.forget(0)
    store.save(ledger)
    assert fresh(BatchLedgerStore(directory)).entries == {}
