"""Reliability under a real Airflow 3 deployment: restarts, faults, load and bad input.

Each scenario triggers a DAG run through the REST API of a deployment started by `conftest.py`
(scheduler, dag-processor, triggerer, api-server, each its own process; SQLite + LocalExecutor), and
ends with the same two proofs: every stored file matches the sha256 of its manifest, and the Runware
test server accepted each task exactly once. Figures go to results.json (see report.py).
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e import dags
from tests.e2e.checks import (
    check_batch_summary,
    check_xcoms_match,
    find_literals,
    ledger_generations,
    unlisted_images,
)
from tests.e2e.harness import Deployment, E2EError, wait_until
from tests.e2e.runs import count_state, fresh_server, run_dag, webhook_woken_tasks
from tests.e2e.settings import (
    BATCH_IMAGES,
    BATCH_PARTIAL_IMAGES,
    EXECUTOR_TASKS,
    FAST_IMAGES,
    FAULT_IMAGES,
    LOAD_IMAGES,
    TRIGGERER_DELAY,
    TRIGGERER_TASKS,
    WEBHOOK_IMAGES,
    Results,
    executor_support,
    webhook_support,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


# -- shared steps -----------------------------------------------------------------------------------------


def kill_task_process(deployment: Deployment, dag_id: str, run_id: str, *, with_supervisor: bool) -> int:
    """SIGKILL the task runner of `generate` (`airflow worker -- <ti id>`), and with `with_supervisor`
    its parent too (the LocalExecutor worker supervising it): the whole worker gone at once."""
    assert deployment.api is not None
    ti = deployment.api.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/generate")

    def target() -> Any:
        for proc in deployment.task_processes():
            if str(ti["id"]) in " ".join(proc.cmdline()):
                return proc
        return None

    proc = wait_until(target, timeout=30, interval=0.05, what=f"the task process of {ti['id']}")
    victims = [proc.parent(), proc] if with_supervisor else [proc]
    for victim in victims:
        victim.send_signal(signal.SIGKILL)
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.wait(timeout=30)
    return int(proc.pid)


def ledger_status(deployment: Deployment, dag_id: str, run_id: str) -> str | None:
    path = Path(deployment.artifacts, dag_id, run_id, "generate", "unmapped", "_zimage_state.json")
    if not path.exists():
        return None
    submissions = json.loads(path.read_text())["submissions"]
    return next(iter(submissions.values()))["status"] if submissions else None


# -- 1. load ------------------------------------------------------------------------------------------------


def test_1_two_hundred_mapped_images_deferrable(deployment: Deployment, results: Results) -> None:
    fresh_server(deployment)
    out = run_dag(deployment, dags.LOAD, timeout=1500, prefix="load")
    out.assert_all_stored_once(LOAD_IMAGES)
    assert out.stats["requests_by_type"]["imageInference"] == LOAD_IMAGES  # not one POST re-sent
    collected = out.collect_xcom(deployment)
    assert collected["count"] == LOAD_IMAGES  # the downstream task saw every mapped XCom
    results.record(
        out.row(
            "1",
            "Mapped images, deferrable, polling",
            f"{LOAD_IMAGES} mapped tasks in one run",
            "none",
            LOAD_IMAGES,
            images_per_minute=round(LOAD_IMAGES / out.wall_s * 60, 1),
        )
    )


# -- 2. triggerer killed ---------------------------------------------------------------------------------


def test_2_triggerer_killed_while_tasks_are_deferred(deployment: Deployment, results: Results) -> None:
    """SIGKILL the triggerer once every task is deferred: a new one finishes them all, resubmitting none."""
    fresh_server(deployment, delay=TRIGGERER_DELAY)
    control = deployment.control
    assert control is not None
    killed: dict[str, Any] = {}

    def kill_when_all_deferred(run_id: str) -> None:
        def all_deferred() -> bool:
            finished = control.stats()["tasks_finished"]
            if finished:
                raise E2EError(
                    f"{finished} Runware tasks finished before all {TRIGGERER_TASKS} were deferred: "
                    "raise E2E_TRIGGERER_DELAY"
                )
            return count_state(deployment, dags.TRIGGERER, run_id, "deferred") == TRIGGERER_TASKS

        wait_until(all_deferred, timeout=TRIGGERER_DELAY, interval=1, what="all tasks deferred")
        killed["accepted_before_kill"] = control.stats()["total_accepted"]
        deployment.kill_component("triggerer", signal.SIGKILL)
        killed["at"] = time.monotonic()
        deployment.start_component("triggerer")

    out = run_dag(deployment, dags.TRIGGERER, timeout=900, prefix="triggerer", during=kill_when_all_deferred)
    out.assert_all_stored_once(TRIGGERER_TASKS)
    assert killed["accepted_before_kill"] == TRIGGERER_TASKS
    # None resubmitted: exactly one imageInference POST per task over the whole run, kill included.
    assert out.stats["requests_by_type"]["imageInference"] == TRIGGERER_TASKS
    assert deployment.components["triggerer"].starts == 2
    results.record(
        out.row(
            "2",
            "Triggerer SIGKILLed with every task deferred, then restarted",
            f"{TRIGGERER_TASKS} deferred tasks ({TRIGGERER_DELAY:.0f} s generation)",
            "SIGKILL of the triggerer's process group",
            TRIGGERER_TASKS,
            accepted_before_kill=killed["accepted_before_kill"],
            done_after_kill_s=round(out.finished - killed["at"], 1),
        )
    )


# -- 3. worker killed ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "dag_id", "ledger_at_kill", "retry_log_line"),
    [
        # The POST landed but its answer never came back: the ledger only says `intent`; the retry
        # re-sends the same taskUUID and Runware's conflictTaskUUID turns it into a reattach.
        ("3a", dags.KILL_SUBMIT, "intent", "already holds"),
        # Killed while polling in the worker: the ledger says `submitted`; the retry only polls.
        ("3b", dags.KILL_WAIT, "submitted", "Reattaching to Runware task"),
        # As 3b, but the supervisor dies too, so nobody reports the failure: the scheduler's
        # task-instance heartbeat timeout (30 s here) has to notice before the retry can reattach.
        ("3c", dags.KILL_SUPERVISOR, "submitted", "Reattaching to Runware task"),
    ],
    ids=["in-submit", "while-waiting", "with-supervisor"],
)
def test_3_worker_killed_after_submitting_reattaches_on_retry(
    deployment: Deployment,
    results: Results,
    number: str,
    dag_id: str,
    ledger_at_kill: str,
    retry_log_line: str,
) -> None:
    fresh_server(deployment)
    control = deployment.control
    assert control is not None
    if ledger_at_kill == "intent":
        # The server accepts the task, then holds the answer long enough for the kill to land first.
        control.faults({"queue": [{"delay": 60, "task_type": "imageInference", "times": 1}]})
    seen: dict[str, Any] = {}

    def kill_after_accept(run_id: str) -> None:
        def accepted_and_recorded() -> bool:
            accepted = control.stats()["total_accepted"]
            return accepted == 1 and ledger_status(deployment, dag_id, run_id) == ledger_at_kill

        wait_until(accepted_and_recorded, timeout=180, interval=0.05, what="the submission to be accepted")
        seen["ledger_at_kill"] = ledger_status(deployment, dag_id, run_id)
        kill_task_process(deployment, dag_id, run_id, with_supervisor=number == "3c")

    out = run_dag(deployment, dag_id, timeout=300, prefix="killed", during=kill_after_accept)
    out.assert_all_stored_once(1)
    (ti,) = out.tis
    # The kill costs one try. A third one is Airflow failing a quickly resumed deferred try
    # (apache/airflow#72716, see settings.py); the money checks above hold either way.
    assert ti["try_number"] >= 2, ti
    assert retry_log_line in deployment.task_log_text(dag_id, out.run_id, "generate")
    if ledger_at_kill == "intent":
        assert out.stats["conflicts"] == 1  # the re-send was recognised as landed, not paid again
        assert out.stats["requests_by_type"]["imageInference"] == 2
    else:
        assert out.stats["requests_by_type"]["imageInference"] == 1
    title = {
        "3a": "Worker SIGKILLed after Runware accepted its task, while the submit's answer was in flight",
        "3b": "Worker SIGKILLed after submitting, while waiting for the image",
        "3c": "Worker and its supervisor SIGKILLed after submitting (found by heartbeat timeout)",
    }[number]
    faults = {
        "3a": "server holds the submit's answer; SIGKILL of the task runner",
        "3b": "SIGKILL of the task runner",
        "3c": "SIGKILL of the task runner and its LocalExecutor worker",
    }[number]
    results.record(out.row(number, title, "1 task, retries=2", faults, 1, **seen))


# -- 4. faults -------------------------------------------------------------------------------------------

FAULT_RATES = {"429": 0.08, "500": 0.07, "503": 0.07, "drop": 0.04, "drop_after_accept": 0.04}


def test_4_thirty_percent_of_runware_responses_fail(deployment: Deployment, results: Results) -> None:
    fresh_server(deployment)
    assert deployment.control is not None
    deployment.control.faults({"rates": FAULT_RATES, "seed": 20260101, "retry_after": 0})
    out = run_dag(deployment, dags.FAULTS, timeout=900, prefix="faults")
    injected = out.stats["faults_injected"]
    out.assert_all_stored_once(FAULT_IMAGES)
    assert sum(injected.values()) > 0
    results.record(
        out.row(
            "4",
            "30% of Runware responses fail",
            f"{FAULT_IMAGES} mapped tasks",
            "429 8%, 500 7%, 503 7%, connection dropped 4%, dropped after accepting 4%",
            FAULT_IMAGES,
            faults_injected=injected,
            api_responses=out.stats["requests"],
            fault_share=round(sum(injected.values()) / out.stats["requests"], 3),
        )
    )


# -- 4b. fast images, no retries ---------------------------------------------------------------------------


def test_4b_fast_images_with_no_retries_all_stored(deployment: Deployment, results: Results) -> None:
    """Sub-second to 8-second images, `retries=0`: the fast ones never defer (`defer_after`), the others'
    triggers hold their answer until the scheduler has seen the deferral. No retry hides a lost try."""
    fresh_server(deployment, delay=0.3)
    out = run_dag(deployment, dags.FAST, timeout=600, prefix="fast")
    out.assert_all_stored_once(FAST_IMAGES)
    assert all(int(ti["try_number"]) == 1 for ti in out.tis if ti["task_id"] == "generate")
    results.record(
        out.row(
            "4b",
            "Turbo-fast images (0.3-8 s), retries=0",
            f"{FAST_IMAGES} mapped tasks, deferrable",
            "none; Airflow's deferral race is the hazard",
            FAST_IMAGES,
        )
    )


# -- 5. webhooks -----------------------------------------------------------------------------------------

WEBHOOK_SKIP = webhook_support()


@pytest.mark.skipif(WEBHOOK_SKIP is not None, reason=WEBHOOK_SKIP or "")
def test_5_webhooks_with_the_api_server_restarted(deployment: Deployment, results: Results) -> None:
    """30% of webhooks never sent, and the API server (which receives them) SIGKILLed mid-run."""
    fresh_server(deployment, webhook_drop_rate=0.3)
    control = deployment.control
    assert control is not None
    restarted: dict[str, Any] = {}

    def restart_api_server(run_id: str) -> None:
        wait_until(lambda: control.stats()["webhook_deliveries"] >= 3, timeout=300, what="the first webhooks")
        restarted["deliveries_before_restart"] = control.stats()["webhook_deliveries"]
        t0 = time.monotonic()
        deployment.restart_component("api-server", signal.SIGKILL)
        deployment.wait_healthy(timeout=120)
        restarted["api_server_down_s"] = round(time.monotonic() - t0, 1)

    out = run_dag(deployment, dags.WEBHOOK, timeout=900, prefix="webhook", during=restart_api_server)
    out.assert_all_stored_once(WEBHOOK_IMAGES)
    stats = out.stats
    lost = stats["webhooks_dropped"] + stats["webhook_failures"]
    # Both paths were exercised: webhooks reached the restarted API server, and lost ones were made
    # up for by polling.
    assert stats["webhook_deliveries"] > restarted["deliveries_before_restart"], stats
    assert lost > 0, stats
    via_webhook = webhook_woken_tasks(deployment, dags.WEBHOOK, out.run_id)
    results.record(
        out.row(
            "5",
            "Webhook delivery, API server SIGKILLed mid-run",
            f"{WEBHOOK_IMAGES} mapped tasks, delivery=webhook, results over ~35 s, "
            f"polling fallback after {dags.WEBHOOK_GRACE_S:.0f} s",
            "30% of webhooks never sent; API server SIGKILLed and restarted after the first deliveries",
            WEBHOOK_IMAGES,
            webhook_deliveries=stats["webhook_deliveries"],
            webhooks_lost=lost,
            tasks_woken_by_webhook=via_webhook,
            tasks_completed_by_polling=WEBHOOK_IMAGES - via_webhook,
            # Webhooks that arrive after their task finished stay in the inbox; 0 means none leaked.
            inbox_files_left=sum(
                1 for p in (deployment.home / "zimage-webhook-inbox").rglob("*") if p.is_file()
            ),
            **restarted,
        )
    )


# -- 6. invalid requests ---------------------------------------------------------------------------------


def test_6_invalid_requests_fail_fast_naming_the_parameter(deployment: Deployment, results: Results) -> None:
    fresh_server(deployment)
    out = run_dag(deployment, dags.INVALID, timeout=300, prefix="invalid")
    by_task = {ti["task_id"]: ti for ti in out.tis}
    problems = []
    for task_id, (_, parameter) in dags.INVALID_CASES.items():
        ti = by_task[task_id]
        log = deployment.task_log_text(dags.INVALID, out.run_id, task_id)
        if ti["state"] != "failed" or ti["try_number"] != 1:
            problems.append(f"{task_id}: {ti['state']} after {ti['try_number']} tries (expected failed, 1)")
        if f"{parameter}:" not in log:
            problems.append(f"{task_id}: the log does not name `{parameter}`")
    assert out.run["state"] == "failed"
    assert not problems, "\n".join(problems)
    assert out.stats["requests"] == 0, out.stats  # nothing reached Runware, not even a validation call
    row = out.row(
        "6",
        "Invalid requests fail fast, naming the parameter",
        f"{len(dags.INVALID_CASES)} tasks, retries=3 each",
        "size out of range, bad enums, 3001-character prompt, steps, parameters of another model",
        0,
        runware_requests=out.stats["requests"],
        parameters_named=sorted(p for _, p in dags.INVALID_CASES.values()),
    )
    results.record(row)


# -- 8. the zimage-executor killed mid-batch --------------------------------------------------------

EXECUTOR_SKIP = executor_support()
ACCEPTED_LINE = re.compile(r"Accepted task ([0-9a-f-]{36})")  # once per taskUUID a process takes on
RESUMED_LINE = re.compile(r"Loaded \d+ task record\(s\), (\d+) unfinished")


def executor_records(state: Path) -> dict[str, dict[str, Any]]:
    """taskUUID -> the task record the executor keeps in its --output-dir."""
    return {p.stem: json.loads(p.read_text()) for p in (state / "tasks").glob("*.json")}


@pytest.mark.skipif(EXECUTOR_SKIP is not None, reason=EXECUTOR_SKIP or "")
@pytest.mark.parametrize(
    ("number", "dag_id", "persistent"),
    [("8a", dags.EXECUTOR_RESUME, True), ("8b", dags.EXECUTOR_FORGET, False)],
    ids=["with-output-dir", "without-output-dir"],
)
def test_8_executor_killed_mid_batch_and_restarted(
    deployment: Deployment, results: Results, number: str, dag_id: str, persistent: bool
) -> None:
    """SIGKILL of the zimage-executor while a batch of 2+ images is in its pipeline call, restart.

    With --output-dir it resumes what it had accepted: every task stores its image under its first
    taskUUID. Without, it forgot: the waiting tasks fail retryably (taskNotFound) and their retries
    generate under a new taskUUID. Either way each task stores one image, once.
    """
    from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

    fresh_server(deployment)  # the Runware server must see nothing of this run
    model = build_tiny_zimage(deployment.home / "tiny-zimage")
    state = deployment.home / f"executor-state-{number}"
    args = ["--max-batch", "4", "--drain-timeout", "10"]
    args += ["--output-dir", str(state)] if persistent else []
    log_start = len(deployment.component_log("executor"))  # the log is shared with 8a

    def executor_log() -> str:
        return deployment.component_log("executor")[log_start:]

    deployment.start_executor(model, *args)
    seen: dict[str, Any] = {}

    def kill_mid_batch(run_id: str) -> None:
        def batch_in_pipeline_call() -> int | None:
            busy = int(deployment.executor_health()["devices"][0]["busy"])
            return busy if busy >= 2 else None

        seen["batch_at_kill"] = wait_until(
            batch_in_pipeline_call, timeout=300, interval=0.1, what="a batch of 2+ images being made"
        )
        seen["images_before_kill"] = int(deployment.executor_metric("zimage_executor_images_total"))
        deployment.kill_component("executor", signal.SIGKILL)
        t0 = time.monotonic()
        deployment.start_executor(model, *args)
        seen["executor_down_s"] = round(time.monotonic() - t0, 1)

    out = run_dag(deployment, dag_id, timeout=900, prefix="executor", during=kill_mid_batch)
    made_after = int(deployment.executor_metric("zimage_executor_images_total"))
    deployment.kill_component("executor", signal.SIGTERM)

    assert out.run["state"] == "success", f"run {out.run['state']}: {out.states}"
    problems = list(out.stored.problems) + check_xcoms_match(out.stored, out.xcoms)
    if out.stored.images != EXECUTOR_TASKS:
        problems.append(f"{out.stored.images} verified images stored, expected {EXECUTOR_TASKS}")
    if len(out.stored.task_uuids) != EXECUTOR_TASKS:
        problems.append(f"{len(out.stored.task_uuids)} distinct taskUUIDs in the manifests")
    unlisted = unlisted_images(deployment.artifacts, dag_id, out.run_id)
    problems += [f"stored but in no manifest (a second store?): {f}" for f in unlisted]
    # A taskUUID accepted again is a picture made twice; without --output-dir the restarted executor
    # may legitimately take on again a submission whose answer the kill cut off (nothing was made).
    accepted = collections.Counter(ACCEPTED_LINE.findall(executor_log()))
    twice = {u: n for u, n in accepted.items() if n > 1}
    if twice and persistent:
        problems.append(f"taskUUIDs the executor accepted more than once: {twice}")
    if missing := out.stored.task_uuids - set(accepted):
        problems.append(f"manifests name taskUUIDs the executor never accepted: {sorted(missing)}")
    generations = ledger_generations(deployment.artifacts, dag_id, out.run_id)
    regenerated = sum(1 for g in generations.values() if g > 0)
    if persistent:
        records = executor_records(state)
        # Nothing forgotten, so no task needed a new taskUUID and every record ends with its image.
        if regenerated or set(records) != out.stored.task_uuids:
            problems.append(f"{regenerated} task(s) regenerated; records {len(records)} != manifests")
        if unfinished := [u for u, r in records.items() if r["finishedAt"] is None or len(r["items"]) != 1]:
            problems.append(f"executor records not finished with one image: {unfinished}")
    elif regenerated < seen["batch_at_kill"]:
        # The batch in the pipeline call at the kill was forgotten: its tasks must have regenerated.
        problems.append(f"only {regenerated} task(s) regenerated; {seen['batch_at_kill']} were being made")
    assert out.stats["requests"] == 0, "the Runware server was called"
    assert not problems, "\n".join(problems[:20])
    resumed = RESUMED_LINE.findall(executor_log())
    row = out.row(
        number,
        "zimage-executor SIGKILLed mid-batch, restarted "
        + ("with its --output-dir (resumes)" if persistent else "without --output-dir (forgets)"),
        f"{EXECUTOR_TASKS} mapped tasks, deferrable, tiny model on the CPU, --max-batch 4",
        "SIGKILL of the executor during a pipeline call of 2+ images, then a restart",
        EXECUTOR_TASKS,
        tasks_regenerated=regenerated,
        images_made_after_restart=made_after,
        tasks_resumed_at_restart=int(resumed[-1]) if resumed else 0,
        **seen,
    )
    # Nothing is paid on an executor: this column counts images stored twice instead, and the Runware
    # server's counters (all zero, asserted above) are left out.
    row["duplicate_submissions"] = len(unlisted)
    for key in ("imageInference_requests", "getResponse_polls", "conflicts"):
        row["details"].pop(key)
    row["details"]["accepted_again"] = sum(n - 1 for n in accepted.values())
    results.record(row)


# -- 9. a catalogue in one task instance -------------------------------------------------------------------


def batch_dir(deployment: Deployment, dag_id: str, run_id: str) -> Path:
    return Path(deployment.artifacts, dag_id, run_id, "generate", "unmapped")


def batch_ledger_counts(deployment: Deployment, dag_id: str, run_id: str) -> dict[str, int]:
    """Entries of the batch ledger (`_zimage_batch.json` and its journal) by status, read as a retry does."""
    from airflow_provider_zimage.jobs.batch_ledger import BatchLedgerStore

    folder = batch_dir(deployment, dag_id, run_id)
    if not folder.exists():
        return {}
    ledger = BatchLedgerStore(folder).load(dag_id=dag_id, task_id="generate", run_id=run_id, map_index=-1)
    counts: dict[str, int] = {}
    for entry in ledger.entries.values():
        counts[entry.status] = counts.get(entry.status, 0) + 1
    return counts


def test_9_a_batch_with_faults_and_a_worker_killed_mid_submission(
    deployment: Deployment, results: Results
) -> None:
    """One task instance, 200 requests in chunks of 20, deferrable, 30% of Runware responses failing; the
    worker SIGKILLed after three chunks were recorded and while Runware held the answer to a fourth it
    had accepted. The retry reattaches to the 60, re-sends the 20 (conflicts, not payments) and sends the
    rest; every image is stored once from one accepted submission."""
    fresh_server(deployment)
    control = deployment.control
    assert control is not None
    chunk = dags.BATCH_CHUNK
    answered, held = 3 * chunk, chunk
    control.faults(
        {
            "queue": [
                {"delay": 0.5, "task_type": "imageInference", "times": 3},
                {"delay": 60, "task_type": "imageInference", "times": 1},
            ],
            "rates": FAULT_RATES,
            "seed": 20260102,
            "retry_after": 0,
        }
    )
    seen: dict[str, Any] = {}

    def kill_mid_submission(run_id: str) -> None:
        def fourth_chunk_in_flight() -> bool:
            counts = batch_ledger_counts(deployment, dags.BATCH, run_id)
            accepted = control.stats()["total_accepted"]
            return accepted == answered + held and counts.get("submitted") == answered

        wait_until(fourth_chunk_in_flight, timeout=240, interval=0.05, what="a fourth chunk in flight")
        seen["ledger_at_kill"] = batch_ledger_counts(deployment, dags.BATCH, run_id)
        seen["accepted_at_kill"] = control.stats()["total_accepted"]
        kill_task_process(deployment, dags.BATCH, run_id, with_supervisor=False)

    out = run_dag(deployment, dags.BATCH, timeout=900, prefix="batch", during=kill_mid_submission)
    out.assert_batch_stored_once(BATCH_IMAGES)
    files = [p for p in batch_dir(deployment, dags.BATCH, out.run_id).iterdir() if p.suffix == ".jpg"]
    assert len(files) == BATCH_IMAGES  # nothing stored twice, nothing extra
    (ti,) = [t for t in out.tis if t["task_id"] == "generate"]
    assert int(ti["try_number"]) >= 2, ti
    log = deployment.task_log_text(dags.BATCH, out.run_id, "generate")
    assert f"Reattaching to {answered} submitted task(s) without paying again" in log
    assert "deferring to one ZImageBatchTrigger" in log
    # The held chunk was re-sent by the retry and recognised as landed.
    assert out.stats["conflicts"] >= held, out.stats
    injected = out.stats["faults_injected"]
    rate_faults = {k: v for k, v in injected.items() if k != "delay"}
    assert sum(rate_faults.values()) > 0, injected
    results.record(
        out.row(
            "9",
            "A 200-image batch in one task instance: worker SIGKILLed mid-submission, 30% faults",
            f"{BATCH_IMAGES} requests in one ZImageBatchGenerateOperator (chunks of {chunk}), deferrable",
            "SIGKILL of the task runner with 3 chunks recorded and a 4th accepted, its answer held; "
            "429 8%, 500 7%, 503 7%, dropped 4%, dropped after accepting 4%",
            BATCH_IMAGES,
            faults_injected=rate_faults,
            api_responses=out.stats["requests"],
            images_per_minute=round(BATCH_IMAGES / out.wall_s * 60, 1),
            **seen,
        )
    )


def test_9b_a_batch_partial_failure_is_retried_for_the_failed_requests_only(
    deployment: Deployment, results: Results
) -> None:
    """Runware fails 3 of 20 requests once (results by webhook): the first try stores 17 and fails
    listing the 3; the retry resubmits those 3 only, under new taskUUIDs, and succeeds."""
    fresh_server(deployment)
    control = deployment.control
    assert control is not None
    n = BATCH_PARTIAL_IMAGES
    failing = [i for i in dags.BATCH_FAIL_ONCE if i < n]
    out = run_dag(deployment, dags.BATCH_PARTIAL, timeout=600, prefix="batch_partial")
    key = ("generate", -1)
    assert out.run["state"] == "success", out.states
    problems = out.stored.problems + check_batch_summary(out.stored, key, out.xcoms.get(key), n)
    assert not problems, "\n".join(problems)
    assert out.stored.images == n
    # Each taskUUID accepted once: n first generations, plus one new generation per failed request.
    accepted = out.stats["accepted"]
    assert len(accepted) == n + len(failing) and set(accepted.values()) == {1}, accepted
    sent: dict[str, int] = {}
    for body in control.request_bodies():
        for item in body if isinstance(body, list) else []:
            if item.get("taskType") == "imageInference":
                index = int(item["positivePrompt"].split("#")[1].split()[0])
                sent[str(index)] = sent.get(str(index), 0) + 1
    assert {int(i) for i, count in sent.items() if count == 2} == set(failing), sent
    assert len(sent) == n and set(sent.values()) <= {1, 2}
    (ti,) = [t for t in out.tis if t["task_id"] == "generate"]
    assert int(ti["try_number"]) == 2, ti
    log = deployment.task_log_text(dags.BATCH_PARTIAL, out.run_id, "generate")
    assert f"{len(failing)} of {n} request(s) failed" in log
    assert all(f"requests[{i}]" in log for i in failing)
    assert out.stats["webhook_deliveries"] > 0  # delivered by webhook, through the real API server
    results.record(
        out.row(
            "9b",
            "Batch partial failure: the retry resubmits only the failed requests",
            f"{n} requests in one batch task, delivery=webhook, deferrable, retries=2",
            f"Runware fails requests {failing} once (task-level error)",
            n,
            accepted_task_uuids=len(accepted),
            resubmitted=sorted(int(i) for i, c in sent.items() if c == 2),
            webhook_deliveries=out.stats["webhook_deliveries"],
            getResponse_polls=out.stats["get_response_polls"],
        )
    )


# -- 7. secrets ------------------------------------------------------------------------------------------


def gather_texts(deployment: Deployment) -> dict[str, str]:
    """Everything the deployment shows anyone: task logs (files and API), XComs, rendered templates,
    the components' output, the artifacts' JSON, and every API response this session received."""
    api = deployment.api
    assert api is not None
    texts: dict[str, str] = {}
    for file in deployment.task_log_files():
        texts[f"task log {file.relative_to(deployment.log_folder)}"] = file.read_text(errors="replace")
    for name in ("api-server", "scheduler", "dag-processor", "triggerer", "executor"):
        texts[f"{name} output"] = deployment.component_log(name)
    runs = api.get("/api/v2/dags/~/dagRuns", params={"limit": 100})["dag_runs"]
    for run in runs:
        dag_id, run_id = run["dag_id"], run["dag_run_id"]
        for ti in api.task_instances(dag_id, run_id):
            where = f"{dag_id}/{run_id}/{ti['task_id']}[{ti['map_index']}]"
            texts[f"rendered fields {where}"] = json.dumps(ti.get("rendered_fields"))
            for try_number in range(1, int(ti["try_number"] or 0) + 1):
                texts[f"log API {where}#{try_number}"] = api.task_log(
                    dag_id, run_id, ti["task_id"], try_number, int(ti["map_index"])
                )
        for entry in api.xcom_entries(dag_id, run_id):
            value = api.xcom(dag_id, run_id, entry["task_id"], entry["key"], int(entry["map_index"]))
            where = f"{dag_id}/{run_id}/{entry['task_id']}[{entry['map_index']}] {entry['key']}"
            texts[f"xcom {where}"] = json.dumps(value)
    for path in (
        "/api/v2/dags",
        "/api/v2/plugins",
        "/api/v2/providers",
        "/api/v2/eventLogs",
        "/api/v2/config",
    ):
        api.request("GET", path)
    for dag_id in {r["dag_id"] for r in runs}:
        api.request("GET", f"/api/v2/dags/{dag_id}/details")
        api.request("GET", f"/api/v2/dags/{dag_id}/tasks")
    texts.update({f"API response #{i}": body for i, body in enumerate(api.responses)})
    for file in deployment.artifacts.rglob("*"):
        if file.is_file() and not file.name.endswith((".jpg", ".png", ".webp")):
            texts[f"artifact {file.relative_to(deployment.artifacts)}"] = file.read_text(errors="replace")
    return texts


def test_7_secrets_never_leave_the_connection(deployment: Deployment, results: Results) -> None:
    """The API key and webhook secret: in no task log, XCom, rendered template or API response.

    Runs last, so it searches what every scenario above left, plus its own error paths (Runware refusing
    the key, Runware failing a task).
    """
    assert deployment.control is not None
    fresh_server(deployment)
    deployment.control.faults({"queue": [{"status": 401, "task_type": "imageInference", "times": 1}]})
    out = run_dag(deployment, dags.SECRETS, timeout=300, prefix="secrets")
    states = {ti["task_id"]: ti["state"] for ti in out.tis}
    assert states == {"key_refused": "failed", "runware_failed": "failed", "succeeds": "success"}, states
    # The refusal itself must be readable in the task log, only without the key.
    assert "401" in deployment.task_log_text(dags.SECRETS, out.run_id, "key_refused")

    texts = gather_texts(deployment)
    # The search covered real evidence: task logs of submissions, XComs with images, rendered prompts.
    assert any("Submitted Runware task" in t for k, t in texts.items() if k.startswith("task log"))
    assert any('"sha256"' in t for k, t in texts.items() if k.startswith("xcom"))
    assert any("a cat in a secrets_" in t for k, t in texts.items() if k.startswith("rendered"))
    secrets = {
        "API key": deployment.config.api_key,
        "webhook secret": deployment.config.webhook_secret,
        "executor token": deployment.executor_token,
    }
    # Per-task webhook tokens are credentials too (each one authorises posting results for its task).
    # They sign an expiry chosen at submission, so they cannot be recomputed here: look for any token.
    hits = find_literals(texts, secrets)
    hits += [f"{where}: a webhook token" for where, t in texts.items() if re.search(r"token=[0-9a-f]{64}", t)]
    assert not hits, "secrets found:\n" + "\n".join(hits[:30])
    results.record(
        out.row(
            "7",
            "API key, webhook secret and tokens never exposed",
            f"everything the runs above left + {len(out.tis)} error-path tasks",
            "Runware 401 on the key, a task Runware fails",
            1,
            texts_searched=len(texts),
            megabytes_searched=round(sum(len(t) for t in texts.values()) / 1e6, 1),
            literals_searched=len(secrets),
            secrets_found=len(hits),
        )
    )
