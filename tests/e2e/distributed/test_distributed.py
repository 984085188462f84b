"""The never-lose, never-pay-twice promises on CeleryExecutor + PostgreSQL, two of every node, nodes killed.

One deployment (cluster.py) runs the scenarios in order; each restores what it killed. Every scenario
ends like the single-machine ones: the test server's accepted submissions against the manifests
(`checks.check_paid_once`), every stored file re-hashed, the XComs against the manifests. Local images
are judged the same way against the zimage-executor's accepted tasks (`checks.executor_stats`).
Figures go to results-distributed.json; `python -m tests.e2e.report --distributed` prints the table.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from tests.e2e.checks import (
    check_paid_once,
    check_xcoms_match,
    duplicate_submissions,
    executor_stats,
    verify_stored,
)
from tests.e2e.distributed import dags, settings
from tests.e2e.distributed.cluster import ClusterDeployment
from tests.e2e.harness import E2EError, wait_until
from tests.e2e.runs import Outcome, count_state, fresh_server, run_dag, webhook_woken_tasks
from tests.e2e.settings import Results

pytestmark = [pytest.mark.e2e_distributed, pytest.mark.timeout(3600)]

# 20% of all Runware API calls (submissions and polls) fail, in every way the single-machine scenario 4
# injects, including the connection dropped after the task was accepted.
FAULT_RATES = {"429": 0.05, "500": 0.05, "503": 0.04, "drop": 0.03, "drop_after_accept": 0.03}
ALL_NODES = "2 schedulers, 2 triggerers, API server, dag-processor, worker-default (4), worker-gpu (2)"


class LocalImages:
    """What the executor-backed tasks of one run left: their files and the executor's acceptances."""

    def __init__(self, cluster: ClusterDeployment, out: Outcome, log_offset: int, task_id: str) -> None:
        self.stored = verify_stored(cluster.gpu_artifacts, out.dag_id, out.run_id)
        self.stats = executor_stats(cluster.executor_log()[log_offset:])
        self.xcoms = {k: v for k, v in out.xcoms.items() if k[0] == task_id}

    def problems(self, expected: int) -> list[str]:
        return check_paid_once(self.stats, self.stored, expected) + check_xcoms_match(self.stored, self.xcoms)


def hosts(out: Outcome, task_id: str) -> dict[str, int]:
    """Which node ran the final try of each task instance (`hostname` as the task runner reported it)."""
    counts: dict[str, int] = {}
    for ti in out.tis:
        if ti["task_id"] == task_id:
            counts[ti["hostname"]] = counts.get(ti["hostname"], 0) + 1
    return counts


def row(
    out: Outcome,
    number: str,
    title: str,
    *,
    nodes: str,
    load: str,
    faults: str,
    expected: int,
    **details: Any,
) -> dict:
    """`Outcome.row` plus the nodes the scenario ran on (the distributed table's second column)."""
    return {**out.row(number, title, load, faults, expected, **details), "nodes": nodes}


# -- 1. load across both workers, 20% API faults -----------------------------------------------------------


def test_1_three_hundred_images_across_both_workers_with_api_faults(
    cluster: ClusterDeployment, dist_results: Results
) -> None:
    fresh_server(cluster)
    assert cluster.control is not None and cluster.executor is not None
    cluster.control.faults({"rates": FAULT_RATES, "seed": 20260214, "retry_after": 0})
    offset = len(cluster.executor_log())
    out = run_dag(cluster, dags.LOAD, timeout=2400, prefix="load", image_tasks=("generate", "generate_local"))
    runware = settings.MAPPED + settings.BATCH
    out.assert_all_stored_once(runware)  # mapped and batch: one accepted submission per image
    local = LocalImages(cluster, out, offset, "generate_local")
    problems = local.problems(settings.LOCAL)
    assert not problems, "\n".join(problems[:20])
    batch = cluster.api.xcom(dags.LOAD, out.run_id, "batch", "return_value") if cluster.api else None
    assert batch is not None and batch["images"] == settings.BATCH and batch["failed"] == 0, batch
    injected = out.stats["faults_injected"]
    assert sum(injected.values()) > 0
    # Both workers did their share: Runware tasks on worker-default, local ones on worker-gpu only.
    assert set(hosts(out, "generate")) == {"worker-default"}, hosts(out, "generate")
    assert set(hosts(out, "generate_local")) == {"worker-gpu"}, hosts(out, "generate_local")
    health = cluster.executor.health()
    assert health["loads"] == 1, health  # one model load for every local task
    expected = runware + settings.LOCAL
    result = row(
        out,
        "D1",
        "300 images across both workers: mapped, batch and local, deferrable",
        nodes=ALL_NODES,
        faults="20% of Runware API calls: 429 5%, 500 5%, 503 4%, dropped 3%, dropped after accepting 3%",
        expected=expected,
        load=f"{settings.MAPPED} mapped + 1 batch of {settings.BATCH} (Runware), "
        f"{settings.LOCAL} mapped local (gpu queue)",
        faults_injected=injected,
        fault_share=round(sum(injected.values()) / out.stats["requests"], 3),
        executor_accepted=local.stats["total_accepted"],
        executor_loads=health["loads"],
        hosts={t: hosts(out, t) for t in ("generate", "batch", "generate_local")},
        images_per_minute=round(expected / out.wall_s * 60, 1),
    )
    result["stored"] = out.stored.images + local.stored.images
    result["duplicate_submissions"] = duplicate_submissions(out.stats) + duplicate_submissions(local.stats)
    dist_results.record(result)


# -- 2. a Celery worker SIGKILLed ---------------------------------------------------------------------------


def test_2_worker_killed_while_its_tasks_submit_and_wait(
    cluster: ClusterDeployment, dist_results: Results
) -> None:
    """worker-default and every process below it SIGKILLed with two tasks mid-submit (Runware accepted
    them, their answers are held) and two polling in the worker; it comes back 5 s later. Nobody
    reports the four: the scheduler's heartbeat timeout fails them, their retries reattach."""
    fresh_server(cluster)
    control = cluster.control
    assert control is not None
    n = settings.KILL_WORKER
    control.faults({"queue": [{"delay": 60, "task_type": "imageInference", "times": 2}]})
    seen: dict[str, Any] = {}

    def kill_worker(run_id: str) -> None:
        wait_until(
            lambda: control.stats()["total_accepted"] >= 4, timeout=300, interval=0.1, what="4 accepted tasks"
        )
        seen["accepted_at_kill"] = control.stats()["total_accepted"]
        seen["running_at_kill"] = count_state(cluster, dags.KILL_WORKER, run_id, "running")
        seen["processes_killed"] = cluster.kill_tree("worker-default")
        time.sleep(5)  # the machine is down a moment, then its service manager starts the worker again
        cluster.start_component("worker-default")
        cluster.wait_worker_ready("worker-default")

    out = run_dag(cluster, dags.KILL_WORKER, timeout=900, prefix="worker_killed", during=kill_worker)
    out.assert_all_stored_once(n)
    retried = sum(1 for ti in out.tis if ti["task_id"] == "generate" and int(ti["try_number"]) >= 2)
    assert retried >= 4, out.tis  # the four the dead worker held needed another try
    # The two held submissions were re-sent with their taskUUIDs and recognised, not paid again.
    assert out.stats["conflicts"] >= 2, out.stats
    dist_results.record(
        row(
            out,
            "D2",
            "Celery worker SIGKILLed (whole process tree) with tasks mid-submit and waiting",
            nodes=ALL_NODES,
            load=f"{n} mapped tasks polling in the worker (deferrable=False), 25 s generation",
            faults="2 submit answers held by the server; SIGKILL of worker-default's tree, back after 5 s",
            expected=n,
            retried_tasks=retried,
            **seen,
        )
    )


# -- 3. one of two triggerers SIGKILLed ---------------------------------------------------------------------


def test_3_triggerer_killed_the_other_takes_its_triggers(
    cluster: ClusterDeployment, dist_results: Results
) -> None:
    fresh_server(cluster, delay=settings.TRIGGERER_DELAY)
    control = cluster.control
    assert control is not None
    n = settings.TRIGGERER
    seen: dict[str, Any] = {}

    def kill_busier_triggerer(run_id: str) -> None:
        def all_deferred() -> bool:
            if finished := control.stats()["tasks_finished"]:
                raise E2EError(
                    f"{finished} tasks finished before all {n} deferred: raise E2E_DIST_TRIGGERER_DELAY"
                )
            return count_state(cluster, dags.TRIGGERER_HA, run_id, "deferred") == n

        wait_until(all_deferred, timeout=settings.TRIGGERER_DELAY, interval=2, what=f"{n} deferred tasks")
        seen["deferred_after_s"] = round(time.monotonic() - started, 1)

        def assigned() -> dict[str, int] | None:
            held = cluster.triggers_by_triggerer()
            return held if "unassigned" not in held and sum(held.values()) >= n else None

        held = wait_until(assigned, timeout=60, interval=1, what="every trigger assigned to a triggerer")
        victim = max(cluster.TRIGGERERS, key=lambda t: held.get(t, 0))
        survivor = next(t for t in cluster.TRIGGERERS if t != victim)
        seen["triggers_before_kill"] = held
        seen["killed"] = victim
        cluster.kill_tree(victim)
        killed_at = time.monotonic()
        wait_until(
            lambda: cluster.triggers_by_triggerer().get(survivor, 0) >= n - control.stats()["tasks_finished"],
            timeout=120,
            interval=1,
            what=f"{survivor} to take over every trigger",
        )
        seen["takeover_s"] = round(time.monotonic() - killed_at, 1)
        seen["tasks_finished_at_takeover"] = control.stats()["tasks_finished"]

    started = time.monotonic()
    out = run_dag(
        cluster, dags.TRIGGERER_HA, timeout=1200, prefix="triggerer_ha", during=kill_busier_triggerer
    )
    out.assert_all_stored_once(n)
    assert out.stats["requests_by_type"]["imageInference"] == n  # nothing resubmitted
    assert seen["triggers_before_kill"].get(seen["killed"], 0) > 0
    cluster.start_component(seen["killed"])  # two triggerers again for the scenarios after this one
    dist_results.record(
        row(
            out,
            "D3",
            "One of two triggerers SIGKILLed with every task deferred; not restarted",
            nodes=ALL_NODES,
            load=f"{n} deferred tasks ({settings.TRIGGERER_DELAY:.0f} s generation)",
            faults="SIGKILL of the triggerer holding more triggers (its whole process tree)",
            expected=n,
            **seen,
        )
    )


# -- 4. one of two schedulers SIGKILLed ---------------------------------------------------------------------


def test_4_scheduler_killed_mid_run(cluster: ClusterDeployment, dist_results: Results) -> None:
    fresh_server(cluster)
    control = cluster.control
    assert control is not None
    n = settings.SCHEDULER
    seen: dict[str, Any] = {}
    before = len(cluster.component_log("scheduler-2"))

    def kill_scheduler(run_id: str) -> None:
        wait_until(
            lambda: control.stats()["total_accepted"] >= n // 3,
            timeout=600,
            interval=0.5,
            what=f"{n // 3} accepted tasks",
        )
        seen["accepted_at_kill"] = control.stats()["total_accepted"]
        seen["states_at_kill"] = {
            k.split(":", 1)[1]: v
            for k, v in cluster.api.state_counts(dags.SCHEDULER_HA, run_id).items()  # type: ignore[union-attr]
            if k.startswith("generate:")
        }
        cluster.kill_tree("scheduler-1")

    out = run_dag(cluster, dags.SCHEDULER_HA, timeout=1200, prefix="scheduler_ha", during=kill_scheduler)
    out.assert_all_stored_once(n)
    survivor_log = cluster.component_log("scheduler-2")[before:]
    seen["survivor_adoption_lines"] = len(re.findall(r"(?i)adopt|orphan", survivor_log))
    cluster.start_component("scheduler-1")
    dist_results.record(
        row(
            out,
            "D4",
            "One of two schedulers SIGKILLed mid-run; not restarted until the run ended",
            nodes=ALL_NODES,
            load=f"{n} mapped deferrable tasks",
            faults="SIGKILL of scheduler-1 (and its executor's processes) after a third were accepted",
            expected=n,
            **seen,
        )
    )


# -- 5. local tasks on the gpu queue, executor SIGKILLed and restarted ---------------------------------------


def test_5_gpu_queue_executor_killed_and_restarted(cluster: ClusterDeployment, dist_results: Results) -> None:
    fresh_server(cluster)
    assert cluster.executor is not None
    n = settings.GPU
    offset = len(cluster.executor_log())
    seen: dict[str, Any] = {}

    def restart_executor(run_id: str) -> None:
        wait_until(
            lambda: executor_stats(cluster.executor_log()[offset:])["total_accepted"] >= n // 3,
            timeout=600,
            interval=0.5,
            what=f"{n // 3} tasks accepted by the executor",
        )
        assert cluster.executor is not None
        seen["loads_before_kill"] = cluster.executor.health()["loads"]
        seen["accepted_at_kill"] = executor_stats(cluster.executor_log()[offset:])["total_accepted"]
        seen["done_at_kill"] = count_state(cluster, dags.GPU, run_id, "success")
        cluster.kill_executor()
        t0 = time.monotonic()
        cluster.start_executor()
        seen["executor_down_s"] = round(time.monotonic() - t0, 1)
        seen["loads_after_restart"] = cluster.executor.health()["loads"]

    out = run_dag(cluster, dags.GPU, timeout=1200, prefix="gpu_restart", during=restart_executor)
    local = LocalImages(cluster, out, offset, "generate")
    problems = local.problems(n)
    assert out.run["state"] == "success", out.states
    assert not problems, "\n".join(problems[:20])
    # One model load per executor process, however many tasks: before the kill and after the restart.
    assert seen["loads_before_kill"] == 1 and seen["loads_after_restart"] == 1, seen
    assert set(hosts(out, "generate")) == {"worker-gpu"}, hosts(out, "generate")
    result = row(
        out,
        "D5",
        "Local tasks on the gpu queue; zimage-executor SIGKILLed and restarted mid-run",
        nodes=ALL_NODES + ", zimage-executor (tiny model, CPU)",
        load=f"{n} mapped local tasks, deferrable, queue gpu, pool zimage_gpu",
        faults="SIGKILL of the zimage-executor after a third were accepted; restarted on its port",
        expected=n,
        executor_accepted=local.stats["total_accepted"],
        executor_resumed=sum(local.stats["resumed"].values()),
        **seen,
    )
    result["stored"] = local.stored.images
    result["duplicate_submissions"] = duplicate_submissions(local.stats)
    for key in ("imageInference_requests", "getResponse_polls", "conflicts"):
        result["details"].pop(key, None)  # the Runware server's counters: not used here
    dist_results.record(result)


# -- 6. webhooks through the S3 inbox, API server SIGKILLed ------------------------------------------------


def test_6_webhooks_via_the_s3_inbox_with_the_api_server_restarted(
    cluster: ClusterDeployment, dist_results: Results
) -> None:
    """The API server writes webhooks to the inbox on S3 (moto), either triggerer reads them; 30% are
    never sent and the API server is SIGKILLed after the first deliveries."""
    fresh_server(cluster, webhook_drop_rate=0.3)
    control = cluster.control
    assert control is not None and cluster.moto is not None
    n = settings.WEBHOOK
    seen: dict[str, Any] = {}

    def restart_api_server(run_id: str) -> None:
        wait_until(lambda: control.stats()["webhook_deliveries"] >= 3, timeout=300, what="the first webhooks")
        seen["deliveries_before_restart"] = control.stats()["webhook_deliveries"]
        t0 = time.monotonic()
        cluster.kill_tree("api-server")
        cluster.start_component("api-server")
        cluster.wait_healthy(timeout=120)
        seen["api_server_down_s"] = round(time.monotonic() - t0, 1)

    out = run_dag(cluster, dags.WEBHOOK, timeout=900, prefix="webhook", during=restart_api_server)
    out.assert_all_stored_once(n)
    stats = out.stats
    lost = stats["webhooks_dropped"] + stats["webhook_failures"]
    assert stats["webhook_deliveries"] > seen["deliveries_before_restart"], stats
    assert lost > 0, stats
    woken = webhook_woken_tasks(cluster, dags.WEBHOOK, out.run_id)
    assert woken > 0  # webhooks went API server -> S3 -> a triggerer
    by_triggerer = trigger_hosts(cluster, dags.WEBHOOK, out.run_id)
    inbox_puts = len(re.findall(rf"PUT /{cluster.inbox_bucket}/inbox/", cluster.infra_log("moto")))
    assert inbox_puts > 0
    dist_results.record(
        row(
            out,
            "D6",
            "Webhooks through an S3 inbox shared by the API server and both triggerers; API server SIGKILLed",
            nodes=ALL_NODES + ", moto S3",
            load=f"{n} mapped tasks, delivery=webhook, polling fallback after {dags.WEBHOOK_GRACE_S:.0f} s",
            faults="30% of webhooks never sent; API server SIGKILLed, restarted after the first deliveries",
            expected=n,
            webhook_deliveries=stats["webhook_deliveries"],
            webhooks_lost=lost,
            tasks_woken_by_webhook=woken,
            tasks_completed_by_polling=n - woken,
            inbox_objects_written=inbox_puts,
            inbox_objects_left=len(cluster.moto.list_keys(cluster.inbox_bucket, "inbox/")),
            trigger_runs_by_triggerer=by_triggerer,
            **seen,
        )
    )


def trigger_hosts(cluster: ClusterDeployment, dag_id: str, run_id: str) -> dict[str, int]:
    """Trigger logs (`attempt=N.log.trigger.<triggerer job id>.log`) per triggerer node of one run."""
    names = {
        int(i): str(h) for i, h in cluster.sql("SELECT id, hostname FROM job WHERE job_type = 'TriggererJob'")
    }
    base = cluster.log_folder / f"dag_id={dag_id}" / f"run_id={run_id}"
    counts: dict[str, int] = {}
    for path in base.rglob("attempt=*.log.trigger.*.log"):
        job = int(path.name.rsplit(".log", 2)[-2].rsplit(".", 1)[-1])
        counts[names.get(job, str(job))] = counts.get(names.get(job, str(job)), 0) + 1
    return counts
