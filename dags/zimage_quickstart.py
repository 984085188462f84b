"""
### zimage_quickstart: one prompt, one image, one manifest

The smallest useful Z-Image DAG. `generate` asks for one image and stores it under
`{output_path}/zimage_quickstart/{run_id}/generate/unmapped/` next to a `manifest.json`; its XCom is
one small dict per image (URI, sha256, seed, cost...), never the image bytes. `show_manifest` reads that
manifest back through `ObjectStoragePath` and prints it, which is how any downstream task should consume
images: by URI, from wherever `[zimage] output_path` points (a local folder, S3, GCS...).

The backend comes from the `zimage_default` connection: its password is the Runware API key, or its
extra `{"backend": "local", "model_path": ...}` runs diffusers on this worker instead. Nothing in this
file changes between the two.

`ZIMAGE_IMAGE_SIZE` (read when the file is parsed) sets the side in pixels: Z-Image is made for
1024x1024, `make demo` uses 256 because its tiny random-weight model runs on a CPU.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pendulum
from airflow.sdk import DAG, ObjectStoragePath, task

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

# Read when the file is parsed. A value that changes per run belongs in a @task (see
# zimage_content_pipeline) or a template such as width="{{ params.size }}".
IMAGE_SIZE = int(os.environ.get("ZIMAGE_IMAGE_SIZE", "1024"))

with DAG(
    dag_id="zimage_quickstart",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["zimage", "example"],
    doc_md=__doc__,
):
    generate = ZImageGenerateOperator(
        task_id="generate",
        prompt="A lighthouse on a rocky cliff at dusk, warm light in its windows, long exposure photograph",
        model="runware:z-image@turbo",
        width=IMAGE_SIZE,
        height=IMAGE_SIZE,
        # A fixed seed makes the request reproducible: the same prompt, size and seed give the same
        # picture, so a re-generation (force=True, expired results) does not change the artwork.
        seed=42,
        output_format="JPG",
    )

    @task
    def show_manifest(images: list[dict[str, Any]]) -> dict[str, Any]:
        """Print the manifest that the operator wrote last, after every image it lists was stored."""
        manifest_path = ObjectStoragePath(images[0]["uri"]).parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        print(f"Manifest {manifest_path}:")
        print(json.dumps(manifest, indent=2))
        return {"manifest": str(manifest_path), "images": [image["uri"] for image in images]}

    show_manifest(generate.output)
