"""`ZImageBatchGenerateOperator`: a catalogue in one task instance, each image stored once and paid once.

Proven against the Runware test server's accepted-submission counts, not by mocks.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage.compat import AirflowException, AirflowFailException, TaskDeferred
from airflow_provider_zimage.jobs.batch import BatchJob
from airflow_provider_zimage.jobs.batch_ledger import BATCH_STATE_FILE
from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator, read_manifest_entries
from airflow_provider_zimage.triggers.batch import ZImageBatchTrigger
from tests.dagtest import FakeTI


def batch(output_dir: str, requests: list[dict[str, Any]], **kwargs: Any) -> ZImageBatchGenerateOperator:
    base = {
        "task_id": "catalogue",
        "width": 256,
        "height": 256,
        "poll_interval": 0.02,
        "max_poll_interval": 0.1,
    }
    return ZImageBatchGenerateOperator(output_path=output_dir, requests=requests, **{**base, **kwargs})


def rows(n: int, tag: str = "product") -> list[dict[str, Any]]:
    return [{"prompt": f"{tag} shot number {i}", "seed": 1000 + i} for i in range(n)]


def run_try(op: ZImageBatchGenerateOperator, ti: FakeTI) -> dict[str, Any]:
    """One try as Airflow runs it: execute, then trigger and execute_complete for as long as it defers."""
    context = {"ti": ti}
    call = lambda: op.execute(context)  # noqa: E731
    for _ in range(50):
        try:
            return call()
        except TaskDeferred as deferred:
            assert isinstance(deferred.trigger, ZImageBatchTrigger)
            events = asyncio.run(_events(deferred.trigger))
            assert len(events) == 1
            payload = events[0].payload
            assert len(json.dumps(payload)) < 200 * 100  # ids and outcomes only, no results
            call = lambda payload=payload: op.execute_complete(context, payload)  # noqa: E731
    raise AssertionError("the batch never finished")


async def _events(trigger: ZImageBatchTrigger) -> list[Any]:
    return [event async for event in trigger.run()]


def one_submission_each(server: Any, expected: int) -> None:
    stats = server.stats
    assert stats["total_accepted"] == expected, stats
    assert len(stats["accepted"]) == expected
    assert set(stats["accepted"].values()) == {1}


def stored_files(output_dir: str, ti: FakeTI) -> list[Path]:
    root = Path(output_dir.removeprefix("file://"))
    return [
        p for p in root.rglob("*") if p.suffix in (".jpg", ".png", ".webp") and f"/{ti.dag_id}/" in str(p)
    ]


def test_a_200_image_batch_with_30_percent_faults_stores_every_image_once(zimage_conn, output_dir):
    zimage_conn.script_faults(rates={"503": 0.3}, seed=1)
    ti = FakeTI("manual__faults", dag_id="catalogue_faults")
    summary = run_try(batch(output_dir, rows(200), chunk_size=50), ti)
    assert summary["images"] == 200 and summary["failed"] == 0
    entries = read_manifest_entries(summary["manifest_uri"])
    assert sorted(e["index"] for e in entries) == list(range(200))
    assert len({e["sha256"] for e in entries}) == 200
    assert len(stored_files(output_dir, ti)) == 200
    one_submission_each(zimage_conn, 200)
    assert sum(zimage_conn.stats["faults_injected"].values()) > 0
    assert len(json.dumps(summary)) < 500  # counts and a URI, not 200 entries


def test_a_worker_killed_mid_submission_reattaches_and_sends_only_the_rest(
    zimage_conn, output_dir, monkeypatch
):
    ti = FakeTI("manual__killed", dag_id="catalogue_killed")
    sent: list[int] = []
    original = BatchJob._send_chunk

    def dies_after_two(self, hook, requests):
        if len(sent) == 2:
            raise SystemExit("worker killed")  # after two chunks landed: no handler runs
        sent.append(len(requests))
        return original(self, hook, requests)

    monkeypatch.setattr(BatchJob, "_send_chunk", dies_after_two)
    with pytest.raises(SystemExit):
        run_try(batch(output_dir, rows(50), chunk_size=10), ti)
    assert zimage_conn.stats["total_accepted"] == 20
    monkeypatch.setattr(BatchJob, "_send_chunk", original)

    summary = run_try(batch(output_dir, rows(50), chunk_size=10), ti)
    assert summary["images"] == 50
    one_submission_each(zimage_conn, 50)


def test_a_worker_killed_between_the_post_and_the_ledger_write_pays_nothing_twice(
    zimage_conn, output_dir, monkeypatch
):
    """The POST landed but the worker died before recording it: the re-sent chunk is a conflict."""
    ti = FakeTI("manual__killed_after_post", dag_id="catalogue_killed_post")
    original = BatchJob._send_chunk

    def lands_then_dies(self, hook, requests):
        original(self, hook, requests)
        raise SystemExit("worker killed after the POST")

    monkeypatch.setattr(BatchJob, "_send_chunk", lands_then_dies)
    with pytest.raises(SystemExit):
        run_try(batch(output_dir, rows(10)), ti)
    monkeypatch.setattr(BatchJob, "_send_chunk", original)
    summary = run_try(batch(output_dir, rows(10)), ti)
    assert summary["images"] == 10
    one_submission_each(zimage_conn, 10)
    assert zimage_conn.stats["conflicts"] >= 1


def test_a_partial_failure_is_stored_reported_and_a_retry_resubmits_only_the_failed(zimage_conn, output_dir):
    ti = FakeTI("manual__partial", dag_id="catalogue_partial")
    requests = rows(12)
    for i in (3, 7):
        requests[i]["prompt"] += " __fail__"
    with pytest.raises(AirflowException, match=r"2 of 12 request\(s\) failed.*requests\[3\].*requests\[7\]"):
        run_try(batch(output_dir, requests), ti)
    root = Path(output_dir.removeprefix("file://"))
    (manifest,) = [p for p in root.rglob("manifest.json") if "catalogue_partial" in str(p)]
    written = json.loads(manifest.read_text())
    assert len(written["images"]) == 10
    assert [f["index"] for f in written["failed"]] == [3, 7]
    assert zimage_conn.stats["total_accepted"] == 12

    # The retry: the marker is still there, so they fail again, but only those two are paid again.
    with pytest.raises(AirflowException, match="2 of 12"):
        run_try(batch(output_dir, requests), ti)
    assert zimage_conn.stats["total_accepted"] == 14
    stats = zimage_conn.stats["accepted"]
    assert set(stats.values()) == {1}  # new generations, new taskUUIDs

    requests[3]["prompt"] = requests[3]["prompt"].replace(" __fail__", "")
    requests[7]["prompt"] = requests[7]["prompt"].replace(" __fail__", "")
    summary = run_try(batch(output_dir, requests), ti)
    assert summary == {**summary, "images": 12, "failed": 0}
    assert zimage_conn.stats["total_accepted"] == 16  # only the two changed rows


def test_partial_failure_can_be_tolerated(zimage_conn, output_dir):
    requests = rows(4)
    requests[1]["prompt"] += " __fail__"
    summary = run_try(batch(output_dir, requests, fail_on_partial_error=False), FakeTI(dag_id="tolerant"))
    assert summary["images"] == 3 and summary["failed"] == 1


def test_an_invalid_request_fails_before_any_post_naming_its_index(zimage_conn, output_dir):
    requests = rows(20)
    requests[17]["width"] = 100000
    with pytest.raises(AirflowFailException, match=r"requests\[17\]\.width"):
        run_try(batch(output_dir, requests), FakeTI(dag_id="invalid"))
    requests[17] = {"prompt": "ok", "colour": "red"}
    with pytest.raises(AirflowFailException, match=r"requests\[17\]: unknown argument"):
        run_try(batch(output_dir, requests), FakeTI(dag_id="invalid"))
    assert zimage_conn.stats["requests"] == 0  # not one POST, not even for the valid rows


def test_the_batch_cost_limit_is_checked_before_any_post(zimage_conn, output_dir):
    with pytest.raises(AirflowFailException, match="max_cost_usd.*50 requests"):
        run_try(batch(output_dir, rows(50), max_cost_usd=0.001), FakeTI(dag_id="costly"))
    assert zimage_conn.stats["requests"] == 0


def test_deferrable_waits_in_one_trigger_and_a_rerun_pays_nothing(zimage_conn, output_dir):
    zimage_conn.configure(delay=0.3)
    ti = FakeTI("manual__deferred", dag_id="catalogue_deferred")
    op = batch(output_dir, rows(30), deferrable=True, defer_after=0, max_in_flight=20, chunk_size=10)
    summary = run_try(op, ti)
    assert summary["images"] == 30 and summary["reused"] == 0
    one_submission_each(zimage_conn, 30)

    again = run_try(batch(output_dir, rows(30), deferrable=True, defer_after=0), ti)
    assert again["images"] == 30 and again["reused"] == 30
    one_submission_each(zimage_conn, 30)


def test_the_batch_reports_what_runware_charged_per_image_and_in_total(zimage_conn, output_dir):
    """A paid batch must not say it cost $0: every task asks for its cost, and the summary adds it up."""
    ti = FakeTI("manual__cost", dag_id="catalogue_cost")
    summary = run_try(batch(output_dir, rows(5)), ti)
    tasks = [t for body in zimage_conn.request_bodies for t in body if t.get("taskType") == "imageInference"]
    assert len(tasks) == 5 and all(t.get("includeCost") is True for t in tasks)
    entries = read_manifest_entries(summary["manifest_uri"])
    assert all(e["cost"] > 0 for e in entries)
    assert (
        summary["total_cost"] == pytest.approx(sum(e["cost"] for e in entries)) and summary["total_cost"] > 0
    )
    opted_out = run_try(batch(output_dir, rows(2, "no cost"), include_cost=False), FakeTI("manual__nc"))
    assert all(not e.get("cost") for e in read_manifest_entries(opted_out["manifest_uri"]))


def test_a_deleted_image_is_regenerated_and_the_rest_reused(zimage_conn, output_dir):
    ti = FakeTI("manual__deleted", dag_id="catalogue_deleted")
    summary = run_try(batch(output_dir, rows(5)), ti)
    entries = read_manifest_entries(summary["manifest_uri"])
    Path(entries[2]["uri"].removeprefix("file://")).unlink()
    again = run_try(batch(output_dir, rows(5)), ti)
    assert again["images"] == 5 and again["reused"] == 4
    assert zimage_conn.stats["total_accepted"] == 6


def test_the_ledger_is_one_versioned_file_in_the_task_folder(zimage_conn, output_dir):
    ti = FakeTI("manual__ledger", dag_id="catalogue_ledger")
    run_try(batch(output_dir, rows(3)), ti)
    root = Path(output_dir.removeprefix("file://"))
    (path,) = list(root.rglob(BATCH_STATE_FILE))
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert {e["status"] for e in data["entries"].values()} == {"stored"}
    assert len({e["task_uuid"] for e in data["entries"].values()}) == 3


# -- reuse="content" --------------------------------------------------------------------------------


def test_content_reuse_across_runs_and_dags_pays_only_for_changed_rows(zimage_conn, output_dir):
    day1 = run_try(batch(output_dir, rows(6), reuse="content"), FakeTI("scheduled__day1", dag_id="shop"))
    assert day1["images"] == 6 and day1["reused"] == 0
    assert zimage_conn.stats["total_accepted"] == 6

    # The next day, one row changed: only that one is paid.
    changed = rows(6)
    changed[4]["prompt"] = "a new product photo"
    day2 = run_try(batch(output_dir, changed, reuse="content"), FakeTI("scheduled__day2", dag_id="shop"))
    assert day2["images"] == 6 and day2["reused"] == 5
    assert zimage_conn.stats["total_accepted"] == 7
    entries = read_manifest_entries(day2["manifest_uri"])
    reused = [e for e in entries if "reused_from" in e]
    assert len(reused) == 5 and all(e["cost"] == 0.0 for e in reused)
    assert all("/scheduled__day2/" in e["uri"] and "/scheduled__day1/" in e["reused_from"] for e in reused)
    assert all(Path(e["uri"].removeprefix("file://")).exists() for e in entries)
    assert day2["total_cost"] == pytest.approx(sum(e["cost"] or 0 for e in entries))

    # Another DAG under the same output_path asking for the same seeded pictures pays nothing.
    other = run_try(batch(output_dir, rows(6), reuse="content"), FakeTI("manual__x", dag_id="newsletter"))
    assert other["reused"] == 6
    assert zimage_conn.stats["total_accepted"] == 7

    # reuse="task" (the default) does not look across runs.
    plain = run_try(batch(output_dir, rows(6)), FakeTI("scheduled__day3", dag_id="shop"))
    assert plain["reused"] == 0
    assert zimage_conn.stats["total_accepted"] == 13


def test_content_reuse_ignores_a_deleted_or_corrupted_earlier_file(zimage_conn, output_dir):
    first = run_try(batch(output_dir, rows(3), reuse="content"), FakeTI("scheduled__a", dag_id="gone"))
    entries = read_manifest_entries(first["manifest_uri"])
    Path(entries[0]["uri"].removeprefix("file://")).unlink()
    Path(entries[1]["uri"].removeprefix("file://")).write_bytes(b"not the picture any more")

    second = run_try(batch(output_dir, rows(3), reuse="content"), FakeTI("scheduled__b", dag_id="gone2"))
    assert second["images"] == 3 and second["reused"] == 1
    assert zimage_conn.stats["total_accepted"] == 5
    again = read_manifest_entries(second["manifest_uri"])
    assert [("reused_from" in e) for e in sorted(again, key=lambda e: e["index"])] == [False, False, True]

    # The regenerated ones are indexed again: a third run reuses all three.
    third = run_try(batch(output_dir, rows(3), reuse="content"), FakeTI("scheduled__c", dag_id="gone3"))
    assert third["reused"] == 3
    assert zimage_conn.stats["total_accepted"] == 5


def test_content_reuse_never_reuses_an_unseeded_request(zimage_conn, output_dir):
    unseeded = [{"prompt": f"a random picture {i}"} for i in range(2)]
    run_try(batch(output_dir, unseeded, reuse="content"), FakeTI("manual__r1", dag_id="random"))
    second = run_try(batch(output_dir, unseeded, reuse="content"), FakeTI("manual__r2", dag_id="random"))
    assert second["reused"] == 0
    assert zimage_conn.stats["total_accepted"] == 4


def test_a_batch_past_its_timeout_ends_the_try_and_the_retry_reattaches_without_paying(
    zimage_conn, output_dir
):
    zimage_conn.configure(delay=1.0)
    ti = FakeTI("manual__slow", dag_id="catalogue_slow")
    with pytest.raises(AirflowException, match=r"3 of 3 request\(s\) failed.*unfinished after 0.2s"):
        run_try(batch(output_dir, rows(3), timeout=0.2), ti)
    assert zimage_conn.stats["total_accepted"] == 3
    summary = run_try(batch(output_dir, rows(3)), ti)  # the retry, with a longer timeout
    assert summary["images"] == 3
    one_submission_each(zimage_conn, 3)


def test_a_restarted_triggerer_rebuilds_the_batch_trigger_from_its_serialized_form(zimage_conn, output_dir):
    zimage_conn.configure(delay=0.3)
    ti = FakeTI("manual__restart", dag_id="catalogue_restart")
    op = batch(output_dir, rows(5), deferrable=True, defer_after=0)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    path, kwargs = deferred.value.trigger.serialize()
    assert path == "airflow_provider_zimage.triggers.batch.ZImageBatchTrigger"
    assert len(kwargs["task_uuids"]) == 5
    rebuilt = ZImageBatchTrigger(**json.loads(json.dumps(kwargs)))  # what the triggerer stores
    (event,) = asyncio.run(_events(rebuilt))
    assert event.payload["pending"] == 0 and set(event.payload["finished"].values()) == {"store"}
    summary = op.execute_complete({"ti": ti}, event.payload)
    assert summary["images"] == 5
    one_submission_each(zimage_conn, 5)


def test_the_single_image_operator_reuses_content_too_and_shares_the_index_with_batches(
    zimage_conn, output_dir
):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    def single(**kwargs: Any) -> ZImageGenerateOperator:
        base = {
            "task_id": "one",
            "prompt": "product shot number 0",
            "seed": 1000,
            "width": 256,
            "height": 256,
        }
        return ZImageGenerateOperator(
            output_path=output_dir, poll_interval=0.02, reuse="content", **{**base, **kwargs}
        )

    (first,) = single().execute({"ti": FakeTI("manual__s1", dag_id="single_a")})
    assert "reused_from" not in first
    (second,) = single().execute({"ti": FakeTI("manual__s2", dag_id="single_b")})
    assert second["reused_from"] == first["uri"] and second["cost"] == 0.0
    assert second["sha256"] == first["sha256"] and second["uri"] != first["uri"]
    assert zimage_conn.stats["total_accepted"] == 1

    # A batch under the same output_path finds the single operator's picture (same request, same model).
    summary = run_try(batch(output_dir, rows(2), reuse="content"), FakeTI("manual__b", dag_id="single_c"))
    assert summary["reused"] == 1
    assert zimage_conn.stats["total_accepted"] == 2

    # Unseeded, or reuse="task": a new picture.
    single(seed=None).execute({"ti": FakeTI("manual__s3", dag_id="single_d")})
    assert zimage_conn.stats["total_accepted"] == 3


def test_the_task_log_shows_progress_not_a_line_per_image(zimage_conn, output_dir, caplog, capfd):
    """A 5,000-image catalogue must not write 5,000 "Stored" lines into the task log (the Airflow UI
    loads it whole): progress lines with done/total, rate and cost, per-image detail only at DEBUG."""
    import logging

    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        run_try(batch(output_dir, rows(40, "quiet")), FakeTI("manual__quiet", dag_id="quiet_log"))
    # Airflow's task loggers print through structlog (captured output), the package's through logging.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    lines += [line for line in capfd.readouterr().out.splitlines() if "[info" in line or "[warn" in line]
    assert not [m for m in lines if "Stored file://" in m], lines[:5]
    progress = [m for m in lines if "Batch progress: " in m]
    assert progress and "40/40 stored" in progress[-1] and "images/min" in progress[-1]
    assert "cost so far $" in progress[-1]
    assert len(lines) < 30, lines
