"""Steps every e2e scenario shares: trigger a DAG run, act on it while it runs, gather what it left.

Used by the single-machine scenarios (`test_reliability.py`) and the distributed ones
(`distributed/test_distributed.py`); the checks themselves are `checks.py`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tests.e2e.checks import (
    StoredImages,
    check_batch_summary,
    check_paid_once,
    check_xcoms_match,
    duplicate_submissions,
    tries_histogram,
    verify_stored,
)
from tests.e2e.harness import Deployment
from tests.e2e.settings import RUNWARE_DELAY


class Outcome:
    """Everything one finished DAG run left behind, gathered through the REST API and the files."""

    def __init__(
        self,
        deployment: Deployment,
        dag_id: str,
        run_id: str,
        started: float,
        *,
        image_tasks: tuple[str, ...] = ("generate",),
    ) -> None:
        api = deployment.api
        assert api is not None and deployment.control is not None
        self.finished = time.monotonic()
        self.dag_id, self.run_id, self.wall_s = dag_id, run_id, round(self.finished - started, 1)
        self.run = api.dag_run(dag_id, run_id)
        self.tis = api.task_instances(dag_id, run_id)
        self.stats = deployment.control.stats()
        self.stored: StoredImages = verify_stored(deployment.artifacts, dag_id, run_id)
        self.xcoms = {
            (ti["task_id"], int(ti["map_index"])): api.xcom(
                dag_id, run_id, ti["task_id"], "return_value", int(ti["map_index"])
            )
            for ti in self.tis
            if ti["task_id"] in image_tasks and ti["state"] == "success"
        }

    @property
    def states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ti in self.tis:
            counts[f"{ti['task_id']}:{ti['state']}"] = counts.get(f"{ti['task_id']}:{ti['state']}", 0) + 1
        return counts

    def assert_all_stored_once(self, expected: int) -> None:
        problems = check_paid_once(self.stats, self.stored, expected)
        # Tasks that return a list of images (a batch returns a summary and the manifest's URI).
        listed = {k: v for k, v in self.stored.entries.items() if k[0] in {t for t, _ in self.xcoms}}
        problems += check_xcoms_match(replace(self.stored, entries=listed), self.xcoms)
        assert self.run["state"] == "success", f"run {self.run['state']}: {self.states}"
        assert not problems, "\n".join(problems[:20])

    def collect_xcom(self, deployment: Deployment) -> Any:
        assert deployment.api is not None
        return deployment.api.xcom(self.dag_id, self.run_id, "collect", "return_value")

    def row(self, number: str, title: str, load: str, faults: str, expected: int, **details: Any) -> dict:
        """One line of the results table, plus the secondary figures that explain it."""
        return {
            "number": number,
            "title": title,
            "load": load,
            "faults": faults,
            "expected": expected,
            "stored": self.stored.images,
            "duplicate_submissions": duplicate_submissions(self.stats),
            "wall_s": self.wall_s,
            "details": {
                "tries": tries_histogram(self.tis),
                "imageInference_requests": self.stats["requests_by_type"].get("imageInference", 0),
                "getResponse_polls": self.stats["get_response_polls"],
                "conflicts": self.stats["conflicts"],
                **details,
            },
        }

    def assert_batch_stored_once(self, requests: int) -> None:
        """The batch scenarios' proof: one manifest with every request's image, each verified, each
        taskUUID accepted once, and a summary XCom that agrees."""
        key = ("generate", -1)
        problems = check_paid_once(self.stats, self.stored, requests)
        problems += check_batch_summary(self.stored, key, self.xcoms.get(key), requests)
        assert self.run["state"] == "success", f"run {self.run['state']}: {self.states}"
        assert not problems, "\n".join(problems[:20])


def new_run_id(prefix: str) -> str:
    # Only characters `safe_segment` keeps, so the artifact folder is named exactly like the run.
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def fresh_server(deployment: Deployment, **config: Any) -> None:
    """Counters to zero and no faults, then this scenario's generation time."""
    assert deployment.control is not None
    deployment.control.reset()
    deployment.control.configure(**{"delay": RUNWARE_DELAY, **config})


def run_dag(
    deployment: Deployment,
    dag_id: str,
    *,
    timeout: float,
    prefix: str,
    during: Callable[[str], None] | None = None,
    image_tasks: tuple[str, ...] = ("generate",),
) -> Outcome:
    """Trigger a run, optionally act on it while it runs (`during(run_id)`), wait, and gather."""
    assert deployment.api is not None
    run_id = new_run_id(prefix)
    start = time.monotonic()
    deployment.api.trigger(dag_id, run_id)
    if during is not None:
        during(run_id)
    deployment.api.wait_dag_run(dag_id, run_id, timeout=timeout)
    return Outcome(deployment, dag_id, run_id, start, image_tasks=image_tasks)


def count_state(deployment: Deployment, dag_id: str, run_id: str, state: str) -> int:
    assert deployment.api is not None
    return sum(
        1
        for ti in deployment.api.task_instances(dag_id, run_id)
        if ti["task_id"] == "generate" and ti["state"] == state
    )


def webhook_woken_tasks(deployment: Deployment, dag_id: str, run_id: str) -> int:
    """Tasks whose final trigger completed on a webhook (its log says so) rather than on a poll."""
    base = deployment.log_folder / f"dag_id={dag_id}" / f"run_id={run_id}" / "task_id=generate"
    woken = 0
    for task_dir in base.glob("map_index=*"):
        trigger_logs = sorted(task_dir.glob("attempt=*.log.trigger.*.log"), key=lambda p: p.stat().st_mtime)
        if trigger_logs and "Webhook inbox:" in trigger_logs[-1].read_text(errors="replace"):
            woken += 1
    return woken
