"""`upload_to_storage`: Runware PUTs the image straight into the S3 bucket through a presigned URL.

The worker then never downloads the image from Runware. It reads the object back from the bucket (one
GET inside the user's own storage) because the manifest promises a sha256, a size and decoded
dimensions, and because an image that does not decode must not be recorded as paid-for and done.

Runware's `uploadEndpoint` is one URL per task: every result of a `numberResults > 1` task would be
PUT to the same key, each overwriting the last. The operator therefore refuses `number_results > 1`
with `upload_to_storage` (one image per task instance; map over prompts or seeds for more).

The object is named after the taskUUID (`{task_dir}/{taskUUID}.{ext}`): the imageUUID, which names
images fetched the usual way, is only known after the upload. The taskUUID is deterministic, so a
retry that reattaches to the task looks for the object where the first try told Runware to put it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_zimage.exceptions import ZImageTaskFailed
from airflow_provider_zimage.jobs.delivery import uploaded_object
from airflow_provider_zimage.jobs.generation import (
    GenerationJob,
    apply_nsfw_policy,
    manifest_entry,
    nsfw_checker,
)
from airflow_provider_zimage.runware.models import ImageInferenceRequest, ImageResult
from airflow_provider_zimage.storage.artifacts import ImageArtifact, check_image

log = logging.getLogger(__name__)

S3_PROTOCOLS = frozenset({"s3", "s3a", "s3n"})


def upload_target(job: GenerationJob, task_uuid: str) -> ObjectStoragePath:
    """Where `job`'s image of `task_uuid` was PUT (the presigned URL of `jobs.delivery` named it)."""
    target: ObjectStoragePath = uploaded_object(job.directory, job.request.output_format, task_uuid)
    return target


def uploaded_artifact(target: ObjectStoragePath, request: ImageInferenceRequest) -> ImageArtifact:
    """Describe the object Runware uploaded, after checking it decodes to the requested format and size."""
    data = target.fs.cat_file(target.path)
    size = (request.width, request.height) if request.width and request.height else None
    fmt, width, height = check_image(data, str(target), request.output_format or "JPG", size)
    artifact = ImageArtifact.describe(target, data, fmt, width, height)
    log.info(
        "Runware uploaded %s (%s %dx%d, %d bytes, sha256 %s)",
        target,
        fmt,
        width,
        height,
        len(data),
        artifact.sha256,
    )
    return artifact


def store_uploaded(
    job: GenerationJob, results: Sequence[ImageResult], task_uuid: str
) -> list[dict[str, Any]]:
    """`GenerationJob.store_results` for an image that is already in the bucket: check, record, manifest.

    An image the NSFW policy does not keep is deleted from the bucket, since it was never meant to be
    stored. The ledger moves to `stored` as `store_results` does, so a vanished object later means a
    new generation rather than a reattach to results Runware may have expired. A missing upload marks
    the task failed for the same reason: reattaching would find the same nothing.
    """
    target = upload_target(job, task_uuid)
    if not target.exists():
        reason = f"Runware reported the image uploaded, but {target} does not exist"
        job.mark_failed(task_uuid, reason)
        raise ZImageTaskFailed(reason)
    if any(r.nsfw_content for r in results) and job.on_nsfw != "keep" and target.exists():
        target.unlink()
        log.warning(
            "Deleted %s: %s flagged it NSFW (on_nsfw=%r)", target, nsfw_checker(job.backend), job.on_nsfw
        )
    kept = apply_nsfw_policy(results, job.on_nsfw, job.backend)
    images = [
        manifest_entry(uploaded_artifact(target, job.request).to_dict(), result, model=job.request.model)
        for result in kept
    ]
    job.write_manifest(images, task_uuid=task_uuid, skipped=len(results) - len(kept))
    ref = job.ref
    ledger = job.ledgers.load(
        dag_id=ref.dag_id, task_id=ref.task_id, run_id=ref.run_id, map_index=ref.map_index
    )
    submission = ledger.current(job.fingerprint)
    if submission is not None:
        ledger.record(submission, "stored")
        job.ledgers.save(ledger)
    return images
