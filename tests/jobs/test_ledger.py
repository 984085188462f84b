"""Never paying twice starts with a taskUUID that a retry computes again, and a ledger that remembers."""

from __future__ import annotations

import uuid

from airflow_provider_zimage.jobs.ledger import Ledger, LedgerStore, derive_task_uuid, job_fingerprint

IDENTITY = {"dag_id": "d", "task_id": "t", "run_id": "manual__2026-01-01", "map_index": 3}


def test_task_uuid_is_deterministic_and_a_valid_uuid4():
    a = derive_task_uuid(**IDENTITY, fingerprint="fp", generation=0)
    b = derive_task_uuid(**IDENTITY, fingerprint="fp", generation=0)
    assert a == b
    assert uuid.UUID(a).version == 4
    others = {
        derive_task_uuid(**{**IDENTITY, "map_index": 4}, fingerprint="fp", generation=0),
        derive_task_uuid(**IDENTITY, fingerprint="fp2", generation=0),
        derive_task_uuid(**IDENTITY, fingerprint="fp", generation=1),
        derive_task_uuid(**{**IDENTITY, "run_id": "other"}, fingerprint="fp", generation=0),
    }
    assert a not in others and len(others) == 4


def test_backend_and_connection_are_part_of_what_makes_an_image_the_same():
    assert job_fingerprint("r", backend="runware", origin="a") != job_fingerprint(
        "r", backend="runware", origin="b"
    )
    assert job_fingerprint("r", backend="runware", origin="a") != job_fingerprint(
        "r", backend="local", origin="a"
    )


def test_a_recorded_submission_is_reattached_and_a_failed_one_gets_a_new_generation(tmp_path):
    from airflow.sdk import ObjectStoragePath

    store = LedgerStore(ObjectStoragePath(f"file://{tmp_path}"))
    ledger = store.load(**IDENTITY)
    first = ledger.new_submission("fp", 1)
    assert first.generation == 0
    ledger.record(first, "intent")
    store.save(ledger)

    again = store.load(**IDENTITY).new_submission("fp", 1)
    assert (again.task_uuid, again.status) == (first.task_uuid, "intent")

    ledger = store.load(**IDENTITY)
    ledger.record(ledger.current("fp"), "submitted")
    store.save(ledger)
    assert store.load(**IDENTITY).new_submission("fp", 1).task_uuid == first.task_uuid

    ledger = store.load(**IDENTITY)
    ledger.record(ledger.current("fp"), "failed", "nsfw")
    store.save(ledger)
    retry = store.load(**IDENTITY).new_submission("fp", 1)
    assert retry.generation == 1 and retry.task_uuid != first.task_uuid


def test_every_fingerprint_keeps_its_own_generation(tmp_path):
    from airflow.sdk import ObjectStoragePath

    store = LedgerStore(ObjectStoragePath(f"file://{tmp_path}"))
    ledger = store.load(**IDENTITY)
    a = ledger.new_submission("a", 1)
    ledger.record(a, "stored")
    b = ledger.new_submission("b", 1)
    ledger.record(b, "submitted")
    store.save(ledger)
    reloaded = store.load(**IDENTITY)
    assert reloaded.current("a").status == "stored"
    assert reloaded.new_submission("b", 1).task_uuid == b.task_uuid
    assert reloaded.new_submission("a", 1).generation == 1  # stored but being regenerated


def test_an_unreadable_ledger_starts_over_instead_of_blocking(tmp_path):
    from airflow.sdk import ObjectStoragePath

    (tmp_path / "_zimage_state.json").write_text('{"version": 99}')
    ledger = LedgerStore(ObjectStoragePath(f"file://{tmp_path}")).load(**IDENTITY)
    assert isinstance(ledger, Ledger) and not ledger.submissions
