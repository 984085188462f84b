"""Knobs of the distributed e2e run (environment variables, defaults are the issue's figures).

- E2E_DIST_MAPPED (150), E2E_DIST_BATCH (100), E2E_DIST_LOCAL (50): scenario 1's 300 images: mapped
  Runware tasks, one batch task's requests, mapped local tasks on the `gpu` queue
- E2E_DIST_KILL_WORKER (8): mapped tasks polling in the worker when it is SIGKILLed
- E2E_DIST_TRIGGERER (100), E2E_DIST_TRIGGERER_DELAY (330): tasks deferred when a triggerer is
  SIGKILLed, and their generation time (must exceed the time it takes to defer them all: ~2.2 s
  per task with worker-default's 4 processes on 2 cores)
- E2E_DIST_SCHEDULER (60): mapped tasks of the run whose scheduler is SIGKILLed
- E2E_DIST_GPU (40): mapped local tasks while the zimage-executor is SIGKILLed and restarted
- E2E_DIST_WEBHOOK (30): mapped webhook tasks while the API server is SIGKILLed and restarted
- E2E_DIST_RESULTS (tests/e2e/results-distributed.json): where the figures go
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.settings import env_float, env_int

MAPPED = env_int("E2E_DIST_MAPPED", 150)
BATCH = env_int("E2E_DIST_BATCH", 100)
LOCAL = env_int("E2E_DIST_LOCAL", 50)
KILL_WORKER = env_int("E2E_DIST_KILL_WORKER", 8)
TRIGGERER = env_int("E2E_DIST_TRIGGERER", 100)
TRIGGERER_DELAY = env_float("E2E_DIST_TRIGGERER_DELAY", 330.0)
SCHEDULER = env_int("E2E_DIST_SCHEDULER", 60)
GPU = env_int("E2E_DIST_GPU", 40)
WEBHOOK = env_int("E2E_DIST_WEBHOOK", 30)


def results_path() -> Path:
    default = Path(__file__).resolve().parents[1] / "results-distributed.json"
    return Path(os.environ.get("E2E_DIST_RESULTS") or default)
