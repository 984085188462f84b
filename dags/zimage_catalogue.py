"""
### zimage_catalogue: a whole product catalogue in one task instance, re-run daily for the changes

1. `catalogue_requests` reads the product table (`data/products.csv`, or the CSV file named by the
   `ZIMAGE_PRODUCTS_CSV` environment variable: thousands of rows are what this DAG is for) and turns
   every row into one request dict: the prompt from the row, the seed from the SKU. Rows an upstream
   task returns reach `requests` as they are: Airflow renders no Jinja inside them, so a cell
   `{{ ... }}` stays text. A list of rows written in the DAG file itself is rendered: wrap such
   values in `airflow.sdk.literal()`.
2. `generate` is one `ZImageBatchGenerateOperator` for the whole table: many `imageInference` tasks
   per POST, one deferral (one trigger) for all of them, downloads in parallel, one `manifest.json`.
   `reuse="content"`: a row whose picture (prompt, seed, size, model, connection) was stored by an
   earlier run under the same output path is copied, not paid for, so the daily run pays only for the
   rows that changed. `max_cost_usd` refuses the whole batch before any POST if its estimate is above
   the budget. A row Runware fails does not stop the others: they are stored, then the task
   fails listing the failed rows, and its retry resubmits only those.
3. `publish` reads the entries back from the manifest and writes `catalogue.csv` (SKU, image URI,
   sha256, cost, where a reused picture came from) into the run's folder, next to the images:
   `{output_path}/zimage_catalogue/{run_id}/`.

The backend comes from the `zimage_default` connection, as in the other examples. The XCom of
`generate` is a small summary (`manifest_uri`, counts, total cost), whatever the catalogue's size.
"""

from __future__ import annotations

import csv
import io
import os
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, ObjectStoragePath, Param, task

from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator, read_manifest_entries

PRODUCTS_CSV = Path(__file__).parent / "data" / "products.csv"
DEFAULT_SIZE = int(os.environ.get("ZIMAGE_IMAGE_SIZE", "1024"))
PROMPT = (
    "Studio product photograph of a {color} {material} {name} {setting}, soft diffused light, "
    "sharp focus, catalogue style"
)

with DAG(
    dag_id="zimage_catalogue",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    is_paused_upon_creation=True,
    tags=["zimage", "example"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "size": Param(DEFAULT_SIZE, type="integer", minimum=128, maximum=2048, multipleOf=16),
    },
):

    @task
    def catalogue_requests(params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One request per product row; every key is a ZImageGenerateOperator request argument."""
        size = int((params or {}).get("size") or DEFAULT_SIZE)
        source = Path(os.environ.get("ZIMAGE_PRODUCTS_CSV") or PRODUCTS_CSV)
        with source.open(newline="", encoding="utf-8") as handle:
            products = list(csv.DictReader(handle))
        # Returned through XCom, the rows are not rendered as templates (no literal() here: it would
        # reach the operator unresolved); the operator refuses a row holding a known secret anyway.
        return [
            {
                "prompt": PROMPT.format(**product),
                # crc32 of the SKU: stable across runs and machines, so an unchanged row is reused.
                "seed": zlib.crc32(product["sku"].encode()),
                "width": size,
                "height": size,
            }
            for product in products
        ]

    requests = catalogue_requests()
    shots = ZImageBatchGenerateOperator(
        task_id="generate",
        requests=requests,
        model="runware:z-image@turbo",
        negative_prompt="text, watermark, logo, blurry, distorted",
        output_format="JPG",
        reuse="content",
        deferrable=True,
        max_cost_usd=25.0,  # the whole batch's upper-bound estimate, checked before the first POST
    )

    @task
    def publish(summary: dict[str, Any]) -> dict[str, Any]:
        """`catalogue.csv` next to the images: what a shop import or a CMS sync reads."""
        source = Path(os.environ.get("ZIMAGE_PRODUCTS_CSV") or PRODUCTS_CSV)
        with source.open(newline="", encoding="utf-8") as handle:
            skus = [row["sku"] for row in csv.DictReader(handle)]
        entries = read_manifest_entries(summary["manifest_uri"])
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["sku", "uri", "sha256", "cost", "reused_from"])
        for entry in sorted(entries, key=lambda e: e["index"]):
            writer.writerow(
                [
                    skus[entry["index"]],
                    entry["uri"],
                    entry["sha256"],
                    entry["cost"],
                    entry.get("reused_from", ""),
                ]
            )
        # {output_path}/{dag_id}/{run_id}/{task_id}/{map_index}/manifest.json: three levels up is the run.
        target = ObjectStoragePath(summary["manifest_uri"]).parent.parent.parent / "catalogue.csv"
        target.write_text(buffer.getvalue())
        print(f"Catalogue: {target} ({len(entries)} images, {summary['reused']} reused)")
        return {"catalogue": str(target), "images": len(entries), "paid": summary["total_cost"]}

    publish(shots.output)
