"""One real Airflow deployment per e2e test module (see harness.py), and the results file.

Knobs (sizes, timings, where the figures go) are environment variables documented in settings.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.e2e import dags
from tests.e2e.harness import Deployment, DeploymentConfig
from tests.e2e.settings import (
    BATCH_IMAGES,
    BATCH_PARTIAL_IMAGES,
    EXECUTOR_TASKS,
    FAST_IMAGES,
    FAULT_IMAGES,
    LOAD_IMAGES,
    PARALLELISM,
    RUNWARE_DELAY,
    TRIGGERER_TASKS,
    WEBHOOK_IMAGES,
    Results,
    webhook_support,
)


@pytest.fixture(scope="session")
def results() -> Iterator[Results]:
    res = Results()
    yield res
    res.flush()


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest, results: Results) -> Iterator[Deployment]:
    """The deployment for this module: all scenario DAGs parsed, every component healthy."""
    sources = dags.all_dags(
        load=LOAD_IMAGES,
        triggerer=TRIGGERER_TASKS,
        faults=FAULT_IMAGES,
        webhook=WEBHOOK_IMAGES,
        fast=FAST_IMAGES,
        executor=EXECUTOR_TASKS,
        batch=BATCH_IMAGES,
        batch_partial=BATCH_PARTIAL_IMAGES,
    )
    if (why := webhook_support()) is not None:
        sources.pop(dags.WEBHOOK)  # its DAG file would not even import
        # Keeps the results table honest: the row says the scenario did not run, and why.
        results.record(
            {
                "number": "5",
                "title": "Webhook delivery, API server SIGKILLed mid-run",
                "load": f"{WEBHOOK_IMAGES} mapped tasks",
                "faults": "30% of webhooks dropped, API server restart",
                "skipped": why,
            }
        )
    config = DeploymentConfig(parallelism=PARALLELISM, runware_delay=RUNWARE_DELAY)
    failed_before = request.session.testsfailed
    deployment = Deployment(sources, config)
    with deployment:
        deployment.wait_for_dags(sources)
        results.data["environment"]["startup_s"] = round(deployment.startup_seconds)
        yield deployment
        results.data["environment"]["cpu_s_by_component"] = deployment.cpu_seconds()
    leftovers = deployment.leftover_processes()
    assert not leftovers, f"processes survived the deployment's stop: {leftovers}"
    if request.session.testsfailed == failed_before and not os.environ.get("E2E_KEEP"):
        shutil.rmtree(deployment.home, ignore_errors=True)
    else:
        print(f"\ne2e AIRFLOW_HOME kept for inspection: {deployment.home}")
