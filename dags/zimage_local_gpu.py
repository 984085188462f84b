"""
### zimage_local_gpu: the product shots of `zimage_content_pipeline`, on your own GPU

Same rows (`data/products.csv`), same prompts and seeds, but `backend="local"`: diffusers runs Z-Image on
the worker that picks the task up, and nothing is sent to Runware. Which weights: the `zimage_default`
connection's extra `model_path` (a local diffusers folder or a Hugging Face id); without one, the
catalog's Hugging Face repo (`Tongyi-MAI/Z-Image-Turbo`, ~20 GB, downloaded on first use).

Scaling it out:

* `pool="gpu"`: one slot per GPU in the deployment (`airflow pools set gpu 1 "One per GPU"`), so no
  more images run at once than there are GPUs. Tasks in a missing pool never run: create it first.
* With the CeleryExecutor, route these tasks to GPU machines with `queue="gpu"` (uncomment it below)
  and start one worker per GPU that listens to that queue only:
  `CUDA_VISIBLE_DEVICES=0 airflow celery worker --queues gpu --concurrency 1`. Concurrency 1 because
  each task process loads its own copy of the weights; two on one GPU would run out of memory. With the
  KubernetesExecutor, request the GPU in the task's pod instead (`executor_config` with a
  `nvidia.com/gpu: 1` limit).
* Inside one process the executor keeps the loaded pipeline and holds a lock per device, so two
  generations never share a GPU at once.

`ZIMAGE_IMAGE_SIZE` (parse time) sets the side: 1024 for the real model, `make demo` uses 256.
"""

from __future__ import annotations

import csv
import os
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

PRODUCTS_CSV = Path(__file__).parent / "data" / "products.csv"
IMAGE_SIZE = int(os.environ.get("ZIMAGE_IMAGE_SIZE", "1024"))
PROMPT = (
    "Studio product photograph of a {color} {material} {name} {setting}, soft diffused light, "
    "sharp focus, catalogue style"
)
NEGATIVE_PROMPT = "text, watermark, logo, blurry, distorted"


def _products() -> list[dict[str, str]]:
    """Read when a task runs (build_requests, and the SKU label of each mapped instance)."""
    with PRODUCTS_CSV.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


with DAG(
    dag_id="zimage_local_gpu",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["zimage", "example", "gpu"],
    doc_md=__doc__,
    user_defined_macros={"sku_of": lambda index: _products()[index]["sku"]},
):

    @task
    def build_requests() -> list[dict[str, Any]]:
        """The same requests as zimage_content_pipeline: same prompt and SKU-derived seed per product."""
        products = _products()
        return [
            {
                "prompt": PROMPT.format(**product),
                "seed": zlib.crc32(product["sku"].encode()),
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
            }
            for product in products
        ]

    images = ZImageGenerateOperator.partial(
        task_id="generate",
        backend="local",  # explicit: this DAG never calls Runware, whatever the connection says
        model="runware:z-image@turbo",  # Z-Image and Z-Image-Turbo run locally; TwinFlow is Runware-only
        negative_prompt=NEGATIVE_PROMPT,
        output_format="PNG",
        pool="gpu",
        # queue="gpu",  # CeleryExecutor: only workers started with `--queues gpu` pick these up
        # A GPU that hangs (driver reset, thermal throttling) fails the task instead of holding the slot.
        execution_timeout=timedelta(minutes=30),
        retries=1,
        map_index_template="{{ sku_of(ti.map_index) }}",  # labelled by SKU in the UI
    ).expand_kwargs(build_requests())

    @task
    def summarise(images: list[list[dict[str, Any]]]) -> dict[str, Any]:
        entries = [entry for per_task in images[:] for entry in per_task]  # [:]: one call for all
        for entry in entries:
            print(f"{entry['width']}x{entry['height']} seed {entry['seed']}: {entry['uri']}")
        return {"images": len(entries), "uris": [entry["uri"] for entry in entries]}

    summarise(images.output)
