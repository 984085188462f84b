"""The scenario DAG files, written into the deployment's DAGS_FOLDER before it starts.

Sizes are baked into the source (not read from `dag_run.conf`) because `.expand()` over a literal list
is what users write, and it keeps the DAG processor's single parse the only one needed. All tasks:
`retries` > 0 with a 2-second `retry_delay`, so an interrupted try is retried in seconds, not the
default five minutes; poll intervals of 0.5-1 s so a finished Runware task is noticed quickly.
"""

from __future__ import annotations

import json
import textwrap

HEADER = """
import json
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
RETRYING = {"retries": 5, "retry_delay": timedelta(seconds=2)}
FAST_POLL = {"poll_interval": 0.5, "max_poll_interval": 1.0}
"""

# dag_id of each scenario; the tests refer to these names only.
LOAD = "e2e_load"
TRIGGERER = "e2e_triggerer_restart"
KILL_SUBMIT = "e2e_worker_killed_in_submit"
KILL_WAIT = "e2e_worker_killed_while_waiting"
KILL_SUPERVISOR = "e2e_worker_lost_with_its_supervisor"
FAULTS = "e2e_faults"
WEBHOOK = "e2e_webhook"
INVALID = "e2e_invalid"
SECRETS = "e2e_secret_paths"
FAST = "e2e_fast_no_retries"
EXECUTOR_RESUME = "e2e_executor_killed_resumed"
EXECUTOR_FORGET = "e2e_executor_killed_forgot"
BATCH = "e2e_batch"
BATCH_PARTIAL = "e2e_batch_partial"

# Requests per POST in the batch scenarios: 200 images are 10 chunks, so a kill can land between them.
BATCH_CHUNK = 20
# Requests of the partial-failure batch that Runware fails once (`__fail_once__`): the retry's
# resubmission of the same request succeeds.
BATCH_FAIL_ONCE = (3, 11, 17)

WEBHOOK_GRACE_S = 15.0

_MAPPED = """
with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False, default_args={default_args}):
    images = ZImageGenerateOperator.partial(
        task_id="generate",
        model="runware:z-image@turbo",
        width=256,
        height=256,
        deferrable=True,
        **FAST_POLL,
        **json.loads({op_kwargs!r}),
    ).expand(prompt=[f"{prompt} #{{i}}{suffix}" for i in range({count})])

    @task
    def collect(entries):
        # A downstream task reading every mapped XCom: what users build galleries and reports from.
        flat = [e for per_task in entries for e in per_task]
        return {{"count": len(flat), "sha256": sorted(e["sha256"] for e in flat)}}

    collect(images.output)
"""


def mapped_dag(
    dag_id: str,
    count: int,
    prompt: str,
    *,
    spread: tuple[float, float] | None = None,
    default_args: str = "RETRYING",
    **op_kwargs: object,
) -> str:
    """`count` mapped tasks; `spread=(first, step)` gives task i a generation time of first + i*step
    seconds (the test server's `__delay:S__` prompt marker), so results arrive over a period."""
    suffix = "" if spread is None else f" __delay:{{{spread[0]} + i * {spread[1]}}}__"
    return _MAPPED.format(
        dag_id=dag_id,
        count=count,
        prompt=prompt,
        suffix=suffix,
        op_kwargs=json.dumps(op_kwargs),
        default_args=default_args,
    )


_SINGLE = """
with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False,
         default_args={{"retries": 2, "retry_delay": timedelta(seconds=1)}}):
    ZImageGenerateOperator(
        task_id="generate",
        prompt={prompt!r},
        width=256,
        height=256,
        **FAST_POLL,
        **json.loads({op_kwargs!r}),
    )
"""


def single_dag(dag_id: str, prompt: str, **op_kwargs: object) -> str:
    return _SINGLE.format(dag_id=dag_id, prompt=prompt, op_kwargs=json.dumps(op_kwargs))


# Each task breaks one rule of a different kind; `retries=3` so that a fail-fast is visible as one try.
INVALID_CASES: dict[str, tuple[dict[str, object], str]] = {
    # task_id: (operator kwargs, the wire parameter the error must name)
    "size_out_of_range": ({"width": 100000, "height": 256}, "width"),
    "bad_scheduler_enum": ({"scheduler": "NotAScheduler"}, "scheduler"),
    "bad_output_format": ({"output_format": "GIF"}, "outputFormat"),
    "prompt_too_long": ({"prompt": "x" * 3001}, "positivePrompt"),
    "steps_out_of_range": ({"steps": 500}, "steps"),
    "wrong_model_parameter": ({"acceleration": "high"}, "acceleration"),
    "twinflow_no_strength": ({"model": "runware:twinflow-z-image-turbo@0", "strength": 0.5}, "strength"),
}

_INVALID = """
CASES = json.loads({cases!r})
with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False,
         default_args={{"retries": 3, "retry_delay": timedelta(seconds=1)}}):
    for task_id, kwargs in CASES.items():
        kwargs = {{"prompt": "a valid prompt", "width": 256, "height": 256, "deferrable": True, **kwargs}}
        ZImageGenerateOperator(task_id=task_id, **kwargs)
"""

# Error paths whose messages could carry credentials: Runware refusing the key, Runware failing the
# task, and a success. Run after the scenarios above, then every trace of the deployment is searched.
_SECRETS = """
with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False,
         default_args={{"retries": 0}}):
    refused = ZImageGenerateOperator(task_id="key_refused", prompt="refused", width=256, height=256,
                                     deferrable=True, **FAST_POLL)
    failed = ZImageGenerateOperator(task_id="runware_failed", prompt="a task Runware fails __fail__",
                                    width=256, height=256, deferrable=True, trigger_rule="all_done",
                                    **FAST_POLL)
    fine = ZImageGenerateOperator(task_id="succeeds", prompt="a cat in a {{{{ dag_run.run_id }}}} hat",
                                  width=256, height=256, deferrable=False, trigger_rule="all_done",
                                  **FAST_POLL)
    refused >> failed >> fine
"""


_BATCH = """
from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator

with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False, default_args={default_args}):
    @task
    def rows():
        # What users write: an upstream task turns table rows into requests (an XComArg).
        fail_once = set(json.loads({fail_once!r}))
        return [
            {{"prompt": f"{prompt} #{{i}}" + (" __fail_once__" if i in fail_once else ""), "seed": 1000 + i}}
            for i in range({count})
        ]

    ZImageBatchGenerateOperator(
        task_id="generate",
        requests=rows(),
        model="runware:z-image@turbo",
        width=256,
        height=256,
        deferrable=True,
        chunk_size={chunk},
        **FAST_POLL,
        **json.loads({op_kwargs!r}),
    )
"""


def batch_dag(
    dag_id: str,
    count: int,
    prompt: str,
    *,
    fail_once: tuple[int, ...] = (),
    default_args: str = "RETRYING",
    **op_kwargs: object,
) -> str:
    """One `ZImageBatchGenerateOperator` over `count` requests made by an upstream task."""
    return _BATCH.format(
        dag_id=dag_id,
        count=count,
        prompt=prompt,
        fail_once=json.dumps([i for i in fail_once if i < count]),
        chunk=BATCH_CHUNK,
        op_kwargs=json.dumps(op_kwargs),
        default_args=default_args,
    )


def all_dags(
    *,
    load: int,
    triggerer: int,
    faults: int,
    webhook: int,
    fast: int = 50,
    batch: int = 200,
    batch_partial: int = 20,
    executor: int = 8,
) -> dict[str, str]:
    """file name -> source of every scenario DAG, sized as requested."""
    sources = {
        LOAD: mapped_dag(LOAD, load, "e2e load, product photo"),
        TRIGGERER: mapped_dag(TRIGGERER, triggerer, "e2e triggerer restart"),
        FAULTS: mapped_dag(FAULTS, faults, "e2e flaky network"),
        # Results arrive over ~35 s (6 s + 1 s per task), so webhooks are sent before, during and
        # after the API server's restart; polling starts 15 s after each submission.
        WEBHOOK: mapped_dag(
            WEBHOOK,
            webhook,
            "e2e webhook delivery",
            spread=(6.0, 35.0 / max(webhook, 1)),
            delivery="webhook",
            webhook_grace_period=WEBHOOK_GRACE_S,
        ),
        # Submit answered late (server holds the answer): killed with only an `intent` in the ledger.
        # The image takes 20 s, so the retry defers well before it is ready (see E2E_RUNWARE_DELAY).
        KILL_SUBMIT: single_dag(KILL_SUBMIT, "e2e killed during submit __delay:20__", deferrable=True),
        # Polling in the worker: killed with a `submitted` ledger entry, while the image renders.
        KILL_WAIT: single_dag(KILL_WAIT, "e2e killed while waiting __delay:12__", deferrable=False),
        # The whole worker (LocalExecutor process and task runner) gone: only the scheduler's
        # heartbeat timeout notices, so the image takes longer than that timeout.
        KILL_SUPERVISOR: single_dag(KILL_SUPERVISOR, "e2e worker lost __delay:30__", deferrable=False),
        INVALID: _INVALID.format(
            dag_id=INVALID, cases=json.dumps({k: v for k, (v, _) in INVALID_CASES.items()})
        ),
        SECRETS: _SECRETS.format(dag_id=SECRETS),
        # Turbo-fast images (0.3 s to ~8 s), `retries=0`: the ones ready within `defer_after` never
        # defer, the others defer and their triggers fire soon after. No retry may hide a lost try.
        FAST: mapped_dag(
            FAST, fast, "e2e fast turbo", spread=(0.3, 7.5 / max(fast, 1)), default_args='{"retries": 0}'
        ),
        # A catalogue in one task instance: deferred, 30% of responses failing, the worker killed
        # between two chunks while a landed chunk's answer is held. `defer_after=0`: the retry defers
        # after its first look (the scenario's point); by default (15 s without a new answer) it
        # would store its 10 s images on the worker, and so would 5 s, with answers arriving as the
        # faulty chunks get through.
        BATCH: batch_dag(BATCH, batch, "e2e batch catalogue row", defer_after=0),
        # Three requests Runware fails once, results delivered by webhook: the retry resubmits only
        # those three (a new generation each), everything else stays stored and paid once.
        BATCH_PARTIAL: batch_dag(
            BATCH_PARTIAL,
            batch_partial,
            "e2e batch partial row",
            fail_once=BATCH_FAIL_ONCE,
            default_args='{"retries": 2, "retry_delay": timedelta(seconds=2)}',
            delivery="webhook",
            webhook_grace_period=WEBHOOK_GRACE_S,
        ),
    }
    # On the zimage-executor (connection `zimage_executor`, tiny model on the CPU), killed mid-batch:
    # restarted with its --output-dir (it resumes) or without one (it forgot, the tasks regenerate).
    # 4 steps at 256 px make a pipeline call last seconds, so the kill lands inside one.
    for dag_id in (EXECUTOR_RESUME, EXECUTOR_FORGET):
        sources[dag_id] = mapped_dag(
            dag_id, executor, f"e2e {dag_id}", zimage_conn_id="zimage_executor", steps=4, output_format="PNG"
        )
    return {name: HEADER + textwrap.dedent(source) for name, source in sources.items()}
