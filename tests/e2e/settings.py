"""Knobs of the e2e run and the figures it records (shared by conftest.py and the scenarios).

Sizes and timings come from the environment so a slow CI machine can be given a smaller load without
editing code; the defaults are the issue's (200 mapped images, 50 deferred during the triggerer kill).

- E2E_LOAD_IMAGES (200), E2E_TRIGGERER_TASKS (50), E2E_FAULT_IMAGES (40), E2E_WEBHOOK_IMAGES (30),
  E2E_FAST_IMAGES (50)
- E2E_EXECUTOR_TASKS (8): mapped tasks of each zimage-executor scenario (8a, 8b)
  E2E_FAST_IMAGES (50), E2E_BATCH_IMAGES (200: one batch task instance), E2E_BATCH_PARTIAL_IMAGES (20)
- E2E_PARALLELISM (16): LocalExecutor worker processes
- E2E_RUNWARE_DELAY (10): seconds the test server takes per image. Not zero on purpose: Airflow 3.3.2
  fails a deferred task whose trigger fires before the scheduler processed the executor event of the
  deferring try (apache/airflow#72716, #67287); a realistic generation time keeps that race out of the
  figures, and the tasks' retries cover it when a loaded machine still hits it.
- E2E_TRIGGERER_DELAY (60): generation time during the triggerer scenario; must exceed the time
  from the first of its tasks being accepted to the last one deferring.
- E2E_RESULTS (tests/e2e/results.json): where the figures go; E2E_KEEP=1 keeps AIRFLOW_HOME.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import psutil

from tests.e2e.report import results_path


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


LOAD_IMAGES = env_int("E2E_LOAD_IMAGES", 200)
TRIGGERER_TASKS = env_int("E2E_TRIGGERER_TASKS", 50)
FAULT_IMAGES = env_int("E2E_FAULT_IMAGES", 40)
WEBHOOK_IMAGES = env_int("E2E_WEBHOOK_IMAGES", 30)
FAST_IMAGES = env_int("E2E_FAST_IMAGES", 50)
EXECUTOR_TASKS = env_int("E2E_EXECUTOR_TASKS", 8)
BATCH_IMAGES = env_int("E2E_BATCH_IMAGES", 200)
BATCH_PARTIAL_IMAGES = env_int("E2E_BATCH_PARTIAL_IMAGES", 20)
PARALLELISM = env_int("E2E_PARALLELISM", 16)
RUNWARE_DELAY = env_float("E2E_RUNWARE_DELAY", 10.0)
TRIGGERER_DELAY = env_float("E2E_TRIGGERER_DELAY", 60.0)


def webhook_support() -> str | None:
    """None when the operator and the webhook plugin exist, else why the webhook scenario is skipped."""
    try:
        from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
        from airflow_provider_zimage.webhooks import plugin  # noqa: F401
    except ImportError as exc:
        return f"webhook plugin not importable: {exc}"
    if "delivery" not in inspect.signature(ZImageGenerateOperator.__init__).parameters:
        return "webhook plugin not built yet (no `delivery` option on the operator)"
    return None


def executor_support() -> str | None:
    """None when the local extra (diffusers) is installed, else why the executor scenarios are skipped."""
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return f"the local extra is not installed: {exc}"
    return None


class Results:
    """Figures of this run, written after every scenario so an interrupted run still leaves some."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "environment": {
                "date": dt.date.today().isoformat(),
                "cpus": os.cpu_count(),
                "memory_gib": round(psutil.virtual_memory().total / 2**30),
                "python": platform.python_version(),
                "airflow": _airflow_version(),
                "parallelism": PARALLELISM,
                "runware_delay_s": RUNWARE_DELAY,
            },
            "scenarios": [],
        }

    def record(self, scenario: dict[str, Any]) -> None:
        scenarios = [s for s in self.data["scenarios"] if str(s["number"]) != str(scenario["number"])]
        self.data["scenarios"] = [*scenarios, scenario]
        self.flush()

    def flush(self) -> None:
        self.data["total_wall_s"] = round(time.monotonic() - self.started)
        path = self.path or results_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")


def _airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow")
