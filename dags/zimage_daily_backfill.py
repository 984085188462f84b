"""
### zimage_daily_backfill: a picture a day, backfilled, reproducible, never paid twice

A daily schedule with `catchup=True`: unpausing it creates one run per day since `start_date`, and
`airflow backfill create --dag-id zimage_daily_backfill --from-date ... --to-date ...` fills any range.
Every run pays for `len(SUBJECTS)` images, so the DAG is created paused and at most two days run at once.

What makes a backfill safe to re-run:

* **Seeds from the logical date.** `daily_requests` derives each seed from the run's day (2026-03-01 ->
  202603010, 202603011, ...). Re-running a day sends the very same request, so the images that come back
  are the same pictures, even when they have to be generated again (`force=True`, results expired).
* **A finished day is not paid again.** The operator writes `manifest.json` last; a cleared or re-run
  task instance finds it, checks every file's sha256 and returns the stored images without calling
  Runware. Clearing a whole month of finished runs costs nothing.
* **A retry reattaches instead of resubmitting.** The taskUUID is derived from (dag, task, run, map
  index, request), and the submission is recorded in `_zimage_state.json` next to the images before and
  after the POST. A retry after a worker crash, a timeout or a triggerer restart finds the record and
  polls the same Runware task; a re-sent POST is answered `conflictTaskUUID`, not billed.
* **`pool="zimage_api"`** caps concurrent Runware requests across all DAGs: create it once with
  `airflow pools set zimage_api 8 "Concurrent Z-Image requests"` (tasks in a missing pool never run).
* **`deferrable=True`**: while Runware works, the wait happens in the triggerer, so a 30-day backfill
  does not hold 60 worker slots. The local backend ignores it (the GPU is the worker).

The backend comes from the `zimage_default` connection. `ZIMAGE_BACKFILL_START` (YYYY-MM-DD) moves the
start date and `ZIMAGE_IMAGE_SIZE` the size, both read when the file is parsed.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

IMAGE_SIZE = int(os.environ.get("ZIMAGE_IMAGE_SIZE", "1024"))
START_DATE = pendulum.parse(os.environ.get("ZIMAGE_BACKFILL_START", "2026-11-01"), tz="UTC")
SUBJECTS = [
    "the harbour of a small fishing town",
    "a quiet alpine lake with a wooden jetty",
]
PROMPT = "{subject} on {day:%A %d %B}, light and weather typical of {day:%B}, editorial photograph"


def seed_for(day: pendulum.Date, index: int) -> int:
    """The seed of the `index`-th image of `day`: readable (YYYYMMDD then the index) and reproducible."""
    return int(day.strftime("%Y%m%d")) * 10 + index


with DAG(
    dag_id="zimage_daily_backfill",
    schedule="@daily",
    start_date=START_DATE,
    catchup=True,
    max_active_runs=2,
    is_paused_upon_creation=True,
    tags=["zimage", "example"],
    doc_md=__doc__,
    default_args={
        # Transient failures (429, 5xx, timeouts) are retried inside the hook first; an Airflow retry
        # is the next line of defence and reattaches to the same Runware task (see above).
        "retries": 3,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,  # doubling; Airflow 3.1 takes only a bool here
        "max_retry_delay": timedelta(minutes=15),
    },
):

    @task
    def daily_requests(**context: Any) -> list[dict[str, Any]]:
        """The day's requests, in Python: deriving seeds from the date takes code, not a template."""
        # A manual run without a logical date has none: fall back to when it was triggered.
        moment = context.get("logical_date") or context["dag_run"].run_after
        day = pendulum.instance(moment).date()
        return [
            {
                "prompt": PROMPT.format(subject=subject, day=day),
                "seed": seed_for(day, index),
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
            }
            for index, subject in enumerate(SUBJECTS)
        ]

    images = ZImageGenerateOperator.partial(
        task_id="generate",
        model="runware:z-image@turbo",
        output_format="JPG",
        pool="zimage_api",
        deferrable=True,
        timeout=1800,
        # Refused before anything is sent if the catalog estimate per image is higher (1024x1024 Turbo
        # is about $0.0036): a typo in a size cannot turn into a surprise bill across a backfill.
        max_cost_usd=0.01,
    ).expand_kwargs(daily_requests())

    @task
    def daily_report(images: list[list[dict[str, Any]]], **context: Any) -> dict[str, Any]:
        """One line per day in the logs: what was stored and what it cost.

        A reused image reports what it cost when it was generated; nothing was paid for it again.
        """
        entries = [entry for per_task in images[:] for entry in per_task]  # [:]: one call for all
        total = round(sum(entry.get("cost") or 0.0 for entry in entries), 6)
        print(f"{context['run_id']}: {len(entries)} image(s), ${total:.4f}")
        for entry in entries:
            print(f"  seed {entry['seed']}: {entry['uri']}")
        return {"images": len(entries), "total_cost": total, "uris": [entry["uri"] for entry in entries]}

    daily_report(images.output)
