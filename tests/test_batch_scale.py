"""A catalogue's cost per image stays flat: what a task instance writes grows with the batch, not its square.

Counted through spies on the storage layer (bytes and files written, sleeps of the wait loop, the
thread that copies a reused image), never by wall time, so a loaded machine cannot make them pass or fail.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage.jobs.batch_ledger import BATCH_JOURNAL_DIR, BATCH_STATE_FILE, BatchLedgerStore
from airflow_provider_zimage.storage import atomic
from tests.dagtest import FakeTI
from tests.test_batch import batch, one_submission_each, rows, run_try


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(path, bytes) of every local atomic write, in order."""
    seen: list[tuple[str, int]] = []
    real = atomic._write_local_atomic

    def spy(target: str, data: bytes, durable: bool = True) -> None:
        seen.append((target, len(data)))
        real(target, data, durable)

    monkeypatch.setattr(atomic, "_write_local_atomic", spy)
    return seen


def ledger_bytes(seen: list[tuple[str, int]]) -> int:
    return sum(n for path, n in seen if "_zimage_batch" in path)


def final_ledger_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "_zimage_batch" in str(p))


def test_bytes_written_to_the_batch_ledger_stay_within_3x_its_final_size(zimage_conn, output_dir, written):
    n = 300
    summary = run_try(batch(output_dir, rows(n), chunk_size=10, max_in_flight=50), FakeTI("manual__big"))
    assert summary["images"] == n
    one_submission_each(zimage_conn, n)
    root = Path(output_dir.removeprefix("file://"))
    final = final_ledger_size(root)
    # Rewriting the whole ledger per chunk wrote ~60 full copies here (and N/100 copies at N).
    assert ledger_bytes(written) <= 3 * final, (ledger_bytes(written), final)


def test_a_bigger_batch_writes_proportionally_more_ledger_bytes_not_quadratically(
    zimage_conn, output_dir, written
):
    def run(n: int, run_id: str) -> int:
        start = len(written)
        run_try(batch(output_dir, rows(n, run_id), chunk_size=10, max_in_flight=50), FakeTI(run_id))
        return ledger_bytes(written[start:])

    small, large = run(50, "manual__small"), run(250, "manual__large")
    assert large <= 5 * small * 1.5, (small, large)


def test_a_retry_reads_the_journal_and_reattaches_after_a_kill_between_chunks(
    zimage_conn, output_dir, monkeypatch
):
    """Killed after three chunks were sent: the journal (no final compaction happened) is enough."""
    from airflow_provider_zimage.jobs.batch import BatchJob

    sent = {"chunks": 0}
    real = BatchJob._send_chunk

    def dies_after_three(self: BatchJob, hook: Any, requests: list[Any]) -> object:
        if sent["chunks"] == 3:
            raise KeyboardInterrupt("worker killed")
        sent["chunks"] += 1
        return real(self, hook, requests)

    monkeypatch.setattr(BatchJob, "_send_chunk", dies_after_three)
    ti = FakeTI("manual__killed")
    op = batch(output_dir, rows(50), chunk_size=10, max_in_flight=50, poll_interval=30, max_poll_interval=30)
    with pytest.raises(KeyboardInterrupt):
        run_try(op, ti)
    root = Path(output_dir.removeprefix("file://"))
    assert not list(root.rglob(BATCH_STATE_FILE)), "killed before the snapshot: only the journal"
    (path,) = root.rglob(BATCH_JOURNAL_DIR)
    ledger = BatchLedgerStore(path.parent).load(
        dag_id=ti.dag_id, task_id="catalogue", run_id=ti.run_id, map_index=-1
    )
    assert sum(e.status == "submitted" for e in ledger.entries.values()) == 30
    monkeypatch.setattr(BatchJob, "_send_chunk", real)
    summary = run_try(batch(output_dir, rows(50), chunk_size=10, max_in_flight=50), ti)
    assert summary["images"] == 50
    one_submission_each(zimage_conn, 50)


def test_content_reuse_writes_no_file_per_image(zimage_conn, output_dir, written):
    n = 60
    run_try(
        batch(output_dir, rows(n), reuse="content", chunk_size=10), FakeTI("scheduled__d1", dag_id="shop")
    )
    index_files = {path for path, _ in written if "_zimage_content" in path}
    assert len(index_files) <= 17, len(index_files)  # one per shard of the batch, not one per image
    again = run_try(batch(output_dir, rows(n), reuse="content"), FakeTI("scheduled__d2", dag_id="shop"))
    assert again["reused"] == n
    assert zimage_conn.stats["total_accepted"] == n


def test_reused_images_are_copied_in_the_worker_pool(zimage_conn, output_dir, monkeypatch):
    from airflow_provider_zimage.storage.artifacts import ArtifactStore

    run_try(batch(output_dir, rows(8), reuse="content"), FakeTI("scheduled__p1", dag_id="pool"))
    threads: list[str] = []
    real = ArtifactStore.copy_verified

    def spy(self: ArtifactStore, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ArtifactStore, "copy_verified", spy)
    again = run_try(batch(output_dir, rows(8), reuse="content"), FakeTI("scheduled__p2", dag_id="pool"))
    assert again["reused"] == 8 and len(threads) == 8
    assert threading.main_thread().name not in threads


def test_the_next_window_goes_out_when_the_previous_one_frees_room_not_after_the_poll_timer(
    zimage_conn, output_dir, monkeypatch
):
    """Ten windows of 10 at zero delay, polls growing 0.1 s -> 3 s: the loop sleeps one first poll
    interval per window, not a timer that grew while earlier windows were answered."""
    import airflow_provider_zimage.jobs.batch as batch_module

    slept: list[float] = []
    real_sleep = batch_module.time.sleep
    main = threading.main_thread()

    import time as _time

    def sleep(seconds: float) -> None:
        if threading.current_thread() is main:
            slept.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(_time, "sleep", sleep)
    op = batch(output_dir, rows(100), chunk_size=10, max_in_flight=10, poll_interval=0.1, max_poll_interval=3)
    summary = run_try(op, FakeTI("manual__windows"))
    assert summary["images"] == 100
    # Each window: at most the first poll interval (0.1 s) and a little slack.
    assert sum(slept) <= 10 * 0.1 * 1.5, (sum(slept), slept)
