"""One distributed deployment (cluster.py) for the whole module, and its results file."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.distributed import dags, settings
from tests.e2e.distributed.cluster import ClusterConfig, ClusterDeployment, missing_packages
from tests.e2e.settings import RUNWARE_DELAY, Results


@pytest.fixture(scope="session")
def dist_results() -> Iterator[Results]:
    res = Results(settings.results_path())
    res.data["environment"].update({"deployment": "PostgreSQL + Redis + CeleryExecutor"})
    yield res
    res.flush()


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, dist_results: Results, tiny_model: Path
) -> Iterator[ClusterDeployment]:
    if (why := missing_packages()) is not None:
        pytest.skip(f"distributed deployment needs {why}")
    sources = dags.all_dags(
        mapped=settings.MAPPED,
        batch=settings.BATCH,
        local=settings.LOCAL,
        kill_worker=settings.KILL_WORKER,
        triggerer=settings.TRIGGERER,
        scheduler=settings.SCHEDULER,
        gpu=settings.GPU,
        webhook=settings.WEBHOOK,
    )
    config = ClusterConfig(runware_delay=RUNWARE_DELAY, tiny_model=tiny_model)
    failed_before = request.session.testsfailed
    deployment = ClusterDeployment(sources, config)
    env = dist_results.data["environment"]
    with deployment:
        deployment.wait_for_dags(sources)
        env["startup_s"] = round(deployment.startup_seconds)
        env["startup_breakdown_s"] = dict(deployment.timings)
        env["settings"] = {
            "parallelism_per_scheduler": config.parallelism,
            "worker_default_concurrency": config.default_concurrency,
            "worker_gpu_concurrency": config.gpu_concurrency,
            "triggerer_capacity": config.triggerer_capacity,
            "pool_zimage_api": config.api_pool_slots,
            "pool_zimage_gpu": config.gpu_pool_slots,
            "executor_max_batch": config.executor_max_batch,
        }
        env["parallelism"] = config.parallelism
        yield deployment
        env["cpu_s_by_component"] = deployment.cpu_seconds()
        dist_results.flush()
    leftovers = deployment.leftover_processes()
    assert not leftovers, f"processes survived the deployment's stop: {leftovers}"
    if request.session.testsfailed == failed_before and not os.environ.get("E2E_KEEP"):
        shutil.rmtree(deployment.home, ignore_errors=True)
    else:
        print(f"\ndistributed e2e AIRFLOW_HOME kept for inspection: {deployment.home}")
