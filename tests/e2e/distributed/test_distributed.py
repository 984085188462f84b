"""The never-lose, never-pay-twice promises on CeleryExecutor + PostgreSQL, two of every node, nodes killed.

One deployment (cluster.py) runs the scenarios in order; each restores what it killed. Every scenario
ends like the single-machine ones: the test server's accepted submissions against the manifests
(`checks.check_paid_once`), every stored file re-hashed, the XComs against the manifests. Local images
are judged the same way against the zimage-executor's accepted tasks (`checks.executor_stats`).
Figures go to results-distributed.json; `python -m tests.e2e.report --distributed` prints the table.
"""

from __future__ import annotations

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
from tests.e2e.runs import Outcome, fresh_server, run_dag
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
