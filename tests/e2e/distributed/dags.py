"""DAG files of the distributed scenarios, built from the single-machine ones (`tests/e2e/dags.py`).

What differs is only routing: Runware tasks run in pool `zimage_api` on Celery's `default` queue; local
tasks go to the `gpu` queue (worker-gpu) and pool `zimage_gpu`, through the connection `zimage_gpu` of
the zimage-executor, and store under `<output_path>/gpu` so each backend's images are checked against
its own server's accepted submissions.
"""

from __future__ import annotations

import json
import textwrap

from tests.e2e.dags import HEADER, mapped_dag

LOAD = "e2e_dist_load"
KILL_WORKER = "e2e_dist_worker_killed"
TRIGGERER_HA = "e2e_dist_triggerer_killed"
SCHEDULER_HA = "e2e_dist_scheduler_killed"
GPU = "e2e_dist_gpu_executor_restarted"
WEBHOOK = "e2e_dist_webhook_s3_inbox"

WEBHOOK_GRACE_S = 15.0

API = {"pool": "zimage_api"}
GPU_ROUTE = {"pool": "zimage_gpu", "queue": "gpu", "zimage_conn_id": "zimage_gpu"}

_GPU_OUTPUT = """
import os

# Every node has this in its environment: the local images go next to, not among, Runware's.
GPU_OUTPUT = os.environ["AIRFLOW__ZIMAGE__OUTPUT_PATH"] + "/gpu"
"""

_LOAD = """
from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator

with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False, default_args=RETRYING):
    ZImageGenerateOperator.partial(
        task_id="generate", width=256, height=256, deferrable=True, pool="zimage_api", **FAST_POLL
    ).expand(prompt=[f"e2e distributed load #{{i}}" for i in range({mapped})])

    ZImageBatchGenerateOperator(
        task_id="batch",
        requests=[{{"prompt": f"e2e distributed batch #{{i}}"}} for i in range({batch})],
        width=256,
        height=256,
        deferrable=True,
        chunk_size=25,
        pool="zimage_api",
        **FAST_POLL,
    )

    ZImageGenerateOperator.partial(
        task_id="generate_local", width=256, height=256, steps=4, deferrable=True,
        output_path=GPU_OUTPUT, **json.loads({gpu!r}), **FAST_POLL,
    ).expand(prompt=[f"e2e distributed local #{{i}}" for i in range({local})])
"""


def _mapped(dag_id: str, count: int, prompt: str, *, deferrable: bool = True, **op_kwargs: object) -> str:
    """`tests.e2e.dags.mapped_dag` (deferrable there), here in pool `zimage_api` or waiting in the worker."""
    source = mapped_dag(dag_id, count, prompt, **{**API, **op_kwargs})
    return source if deferrable else source.replace("deferrable=True,", "deferrable=False,")


def _gpu_mapped(dag_id: str, count: int, prompt: str) -> str:
    """Mapped local tasks: `gpu` queue, pool `zimage_gpu`, the executor's connection, 4 steps."""
    source = mapped_dag(dag_id, count, prompt, steps=4, **GPU_ROUTE)
    return _GPU_OUTPUT + source.replace("deferrable=True,", "deferrable=True, output_path=GPU_OUTPUT,")


def all_dags(
    *, mapped: int, batch: int, local: int, kill_worker: int, triggerer: int, scheduler: int, gpu: int,
    webhook: int,
) -> dict[str, str]:  # fmt: skip
    sources = {
        LOAD: _GPU_OUTPUT
        + _LOAD.format(dag_id=LOAD, mapped=mapped, batch=batch, local=local, gpu=json.dumps(GPU_ROUTE)),
        # Polling in the worker (deferrable=False) for 25 s: a killed worker leaves tasks mid-submit
        # (the test holds their answers) and tasks waiting, with nobody to report either.
        KILL_WORKER: _mapped(KILL_WORKER, kill_worker, "e2e worker killed __delay:25__", deferrable=False),
        TRIGGERER_HA: _mapped(TRIGGERER_HA, triggerer, "e2e triggerer HA"),
        SCHEDULER_HA: _mapped(SCHEDULER_HA, scheduler, "e2e scheduler HA"),
        GPU: _gpu_mapped(GPU, gpu, "e2e gpu queue"),
        WEBHOOK: _mapped(
            WEBHOOK,
            webhook,
            "e2e webhook via s3 inbox",
            spread=(6.0, 35.0 / max(webhook, 1)),
            delivery="webhook",
            webhook_grace_period=WEBHOOK_GRACE_S,
        ),
    }
    return {name: HEADER + textwrap.dedent(source) for name, source in sources.items()}
