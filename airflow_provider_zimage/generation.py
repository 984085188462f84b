"""One task instance's image job: reuse, submit once, store, and write the manifest.

Shared by `ZImageGenerateOperator` and `ZImageTaskSensor` so both store and report images the same
way. It orchestrates the ledger (`state`), the artifacts (`storage`) and whatever fetches the bytes; it
holds no HTTP or torch code itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from airflow_provider_zimage.exceptions import ZImageTaskFailed
from airflow_provider_zimage.models import ImageInferenceRequest, ImageResult
from airflow_provider_zimage.outcomes import Outcome
from airflow_provider_zimage.redaction import redact_urls, scrub_secrets
from airflow_provider_zimage.state import Ledger, LedgerStore, Submission, job_fingerprint
from airflow_provider_zimage.storage import ArtifactStore, normalize_format

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
NsfwPolicy = Literal["fail", "skip", "keep"]


@dataclass(frozen=True)
class TaskInstanceRef:
    """Where a task instance's artifacts and ledger live; no try number, so retries share them."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int

    @classmethod
    def from_context(cls, context: Any) -> TaskInstanceRef:
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        return cls(ti.dag_id, ti.task_id, ti.run_id, -1 if map_index is None else int(map_index))


class GenerationJob:
    """The request of one task instance, its ledger and its artifact directory.

    :param request: the validated request (its taskUUID is replaced by the ledger's deterministic one).
    :param backend: "runware" or "local"; part of the fingerprint.
    :param origin: the connection id (Runware) or the model source (local); part of the fingerprint.
    """

    def __init__(
        self,
        ref: TaskInstanceRef,
        request: ImageInferenceRequest,
        *,
        backend: str,
        origin: str | None,
        store: ArtifactStore,
        on_nsfw: NsfwPolicy = "fail",
    ) -> None:
        self.ref = ref
        self.request = request
        self.backend = backend
        self.origin = origin
        self.store = store
        self.on_nsfw = on_nsfw
        self.fingerprint = job_fingerprint(request.fingerprint(), backend=backend, origin=origin)
        # What 0.1.0 wrote for the same request: found, never paid for again, after an upgrade.
        legacy = (job_fingerprint(f, backend=backend, origin=origin) for f in request.legacy_fingerprints())
        self.legacy_fingerprints = [fp for fp in legacy if fp != self.fingerprint]
        self.directory = store.task_dir(ref.dag_id, ref.run_id, ref.task_id, ref.map_index)
        self.ledgers = LedgerStore(self.directory)

    @property
    def expected_results(self) -> int:
        return self.request.number_results or 1

    # -- before paying -------------------------------------------------------------------------------

    def reusable_images(self) -> list[dict[str, Any]] | None:
        """The images of an earlier run of this exact request, if every file is still there and intact."""
        manifest = self.store.read_manifest(self.directory)
        if not manifest or manifest.get("fingerprint") not in (self.fingerprint, *self.legacy_fingerprints):
            return None
        images = manifest.get("images") or []
        if not all(self.store.verify(image) for image in images):
            log.warning(
                "manifest in %s lists files that are missing or changed: regenerating", self.directory
            )
            return None
        return images

    def _ledger(self) -> Ledger:
        r = self.ref
        ledger = self.ledgers.load(dag_id=r.dag_id, task_id=r.task_id, run_id=r.run_id, map_index=r.map_index)
        ledger.adopt(self.fingerprint, self.legacy_fingerprints)
        return ledger

    def next_submission(self) -> Submission:
        """The recorded submission to reattach to, or a new generation to submit."""
        return self._ledger().new_submission(self.fingerprint, self.expected_results)

    def submit(self, send: Callable[[ImageInferenceRequest], object]) -> Submission:
        """Record the intent, send, record the submission: a crash anywhere leaves a record to reattach to.

        A recorded `submitted` is not sent again. An `intent` is sent again with the same taskUUID: if the
        first send landed, Runware answers `conflictTaskUUID` and the hook reports it as submitted.
        """
        ledger = self._ledger()
        submission = ledger.new_submission(self.fingerprint, self.expected_results)
        if submission.status == "submitted":
            log.info(
                "Reattaching to Runware task %s (generation %d)", submission.task_uuid, submission.generation
            )
            return submission
        if submission.status == "intent" and submission.fingerprint in ledger.submissions:
            log.info("Re-sending Runware task %s after an interrupted submit", submission.task_uuid)
        ledger.record(submission, "intent")
        self.ledgers.save(ledger)
        send(self.request_for(submission))
        ledger.record(submission, "submitted")
        self.ledgers.save(ledger)
        log.info("Submitted Runware task %s (generation %d)", submission.task_uuid, submission.generation)
        return submission

    def request_for(self, submission: Submission) -> ImageInferenceRequest:
        return self.request.model_copy(update={"task_uuid": submission.task_uuid})

    def settle(self, task_uuid: str, outcome: Outcome) -> None:
        """Apply what an answer means to the ledger: only REGENERATE touches it (see `outcomes`)."""
        if outcome.new_generation:
            self.mark_failed(task_uuid, outcome.message)

    def mark_failed(self, task_uuid: str, reason: str) -> None:
        """A task Runware failed gets a new generation (a new taskUUID) on the next try."""
        ledger = self._ledger()
        submission = ledger.current(self.fingerprint)
        if submission is not None and submission.task_uuid == task_uuid:
            ledger.record(submission, "failed", reason)
            self.ledgers.save(ledger)

    # -- after the results are in --------------------------------------------------------------------

    def store_results(
        self,
        results: Sequence[ImageResult],
        fetch: Callable[[ImageResult], bytes],
        *,
        task_uuid: str | None = None,
    ) -> list[dict[str, Any]]:
        """Fetch, verify and store every image, write the manifest last, and return the XCom entries."""
        kept = apply_nsfw_policy(results, self.on_nsfw)
        images = []
        for result in kept:
            # The bytes say what they are: a paid image is stored under its real format (the name gets
            # its extension from the decoded bytes), whatever the caller expected (a sensor does not
            # know the request); a mismatch with the request is reported, not a reason to lose it.
            artifact = self.store.write_image(self.directory, str(result.image_uuid), fetch(result))
            self._report_mismatch(result, artifact.format, artifact.width, artifact.height)
            images.append(manifest_entry(artifact.to_dict(), result, model=self.request.model))
        self.write_manifest(images, task_uuid=task_uuid, skipped=len(results) - len(kept))
        if task_uuid is not None:
            ledger = self._ledger()
            submission = ledger.current(self.fingerprint)
            if submission is not None:
                ledger.record(submission, "stored")
                self.ledgers.save(ledger)
        return images

    def _report_mismatch(self, result: ImageResult, fmt: str, width: int, height: int) -> None:
        asked = self.request.output_format
        if asked is not None and normalize_format(asked) != fmt:
            log.warning(
                "Image %s is %s although %s was requested; stored as %s", result.image_uuid, fmt, asked, fmt
            )
        size = (self.request.width, self.request.height)
        if all(size) and size != (width, height):
            log.warning(
                "Image %s is %dx%d although %dx%d was requested", result.image_uuid, width, height, *size
            )

    def write_manifest(self, images: list[dict[str, Any]], *, task_uuid: str | None, skipped: int = 0) -> Any:
        total = round(sum(i["cost"] or 0.0 for i in images), 6)
        manifest = {
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "dag_id": self.ref.dag_id,
            "task_id": self.ref.task_id,
            "run_id": self.ref.run_id,
            "map_index": self.ref.map_index,
            "task_uuid": task_uuid,
            "model": self.request.model,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "request": public_request(self.request),
            "images": images,
            "skipped_nsfw": skipped,
            "total_cost": total,
        }
        path = self.store.write_manifest(self.directory, manifest)
        log.info(
            "Stored %d image(s) in %s; cost %s",
            len(images),
            self.directory,
            ", ".join(f"${i['cost']:.4f}" for i in images if i["cost"] is not None) or "not reported",
        )
        log.info("Total cost of this task: $%.4f", total)
        return path


def apply_nsfw_policy(results: Sequence[ImageResult], policy: NsfwPolicy) -> list[ImageResult]:
    flagged = [r for r in results if r.nsfw_content]
    if not flagged or policy == "keep":
        return list(results)
    if policy == "skip":
        log.warning("Skipping %d image(s) flagged NSFW by Runware (on_nsfw='skip')", len(flagged))
        return [r for r in results if not r.nsfw_content]
    raise ZImageTaskFailed(
        f"{len(flagged)} of {len(results)} image(s) were flagged NSFW (on_nsfw='fail'; "
        "use on_nsfw='skip' to drop them or 'keep' to store them)"
    )


def manifest_entry(artifact: dict[str, Any], result: ImageResult, *, model: str | None) -> dict[str, Any]:
    """The small dict a downstream task gets per image: where it is and what it is, never its bytes."""
    return {
        "uri": artifact["uri"],
        "image_uuid": result.image_uuid,
        "task_uuid": result.task_uuid,
        "seed": result.seed,
        "model": model,
        "width": artifact["width"],
        "height": artifact["height"],
        "format": artifact["format"],
        "bytes": artifact["bytes"],
        "sha256": artifact["sha256"],
        "cost": result.cost,
        "nsfw": bool(result.nsfw_content),
    }


def public_request(request: ImageInferenceRequest) -> dict[str, Any]:
    """The request as recorded in the manifest: webhook tokens and presigned URLs are credentials, and
    a known secret is "***" even where a request holding one was not refused before sending."""
    wire: dict[str, Any] = scrub_secrets(request.to_wire())
    for key in ("webhookURL", "uploadEndpoint"):
        if key in wire:
            wire[key] = redact_urls(str(wire[key]))
    inputs = wire.get("inputs")
    if isinstance(inputs, dict):
        for key, value in list(inputs.items()):
            if isinstance(value, str) and len(value) > 256:
                inputs[key] = f"<{len(value)} characters>"
    return wire
