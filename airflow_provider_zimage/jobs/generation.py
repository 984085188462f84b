"""One task instance's image job: reuse, submit once, store, and write the manifest.

Shared by `ZImageGenerateOperator` and `ZImageTaskSensor` so both store and report images the same
way. It orchestrates the ledger (`state`), the artifacts (`storage`) and whatever fetches the bytes; it
holds no HTTP or torch code itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from airflow_provider_zimage.exceptions import ZImageError, ZImageTaskFailed
from airflow_provider_zimage.jobs.delivery import DeliveryFields, Submitter
from airflow_provider_zimage.jobs.ledger import Ledger, LedgerStore, Submission, job_fingerprint
from airflow_provider_zimage.redaction import (
    mask_credentials,
    redact,
    redact_urls,
    scrub_secrets,
    without_query,
)
from airflow_provider_zimage.runware.models import ImageInferenceRequest, ImageResult, OldFingerprint
from airflow_provider_zimage.runware.outcomes import Outcome
from airflow_provider_zimage.storage.artifacts import ArtifactStore, normalize_format

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


def old_job_fingerprints(
    request: ImageInferenceRequest, *, backend: str, origin: str | None
) -> dict[str, str]:
    """The job fingerprints 0.1.0 and 0.2 gave this request's picture, each with its `OldFingerprint`
    trust ("same", "presumed", "recorded"), today's own fingerprint left out."""
    today = job_fingerprint(request.fingerprint(), backend=backend, origin=origin)
    old = [OldFingerprint(f, "same") for f in request.legacy_fingerprints()]
    found: dict[str, str] = {}
    for digest, trust in [*old, *request.fingerprints_0_2()]:
        fp = job_fingerprint(digest, backend=backend, origin=origin)
        if fp != today:
            found.setdefault(fp, trust)
    return found


class GenerationJob:
    """The request of one task instance, its ledger and its artifact directory.

    :param request: the validated request (its taskUUID is replaced by the ledger's deterministic one).
    :param backend: "runware" or "local"; part of the fingerprint.
    :param origin: the connection id (Runware) or the model source (local); part of the fingerprint.
    :param arguments: `arguments_digest` of the operator's arguments before rendering, recorded with
        each submission so that a later try can tell a template that renders differently (same
        arguments, another fingerprint) from a DAG that was edited (other arguments).
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
        arguments: str | None = None,
    ) -> None:
        self.ref = ref
        self.request = request
        self.backend = backend
        self.origin = origin
        self.store = store
        self.on_nsfw = on_nsfw
        self.fingerprint = job_fingerprint(request.fingerprint(), backend=backend, origin=origin)
        # What 0.1.0 and 0.2 wrote for the same picture: found, never paid for again, after an upgrade.
        # 0.2 gave some fingerprints to two pictures (TwinFlow's acceleration unset or "none"): see
        # `OldFingerprint` for which store may trust which.
        self.old_fingerprints = old_job_fingerprints(request, backend=backend, origin=origin)
        # A ledger has no request to check: it adopts what is read as this picture.
        self.legacy_fingerprints = [fp for fp, t in self.old_fingerprints.items() if t != "recorded"]
        # reuse="content" spans DAGs and tasks: only what surely was this picture.
        self.content_fingerprints = [fp for fp, t in self.old_fingerprints.items() if t == "same"]
        self.directory = store.task_dir(ref.dag_id, ref.run_id, ref.task_id, ref.map_index)
        self.ledgers = LedgerStore(self.directory)
        # Who makes the picture is part of it: another connection never reattaches to this one's tasks.
        self.arguments = arguments and job_fingerprint(arguments, backend=backend, origin=origin)

    @property
    def task_kind(self) -> str:
        """What the log calls a submission: a user looking for it must know which service to ask."""
        return {"executor": "zimage-executor task", "local": "in-process job"}.get(
            self.backend, "Runware task"
        )

    @property
    def expected_results(self) -> int:
        return self.request.number_results or 1

    # -- before paying -------------------------------------------------------------------------------

    def reusable_images(self) -> list[dict[str, Any]] | None:
        """The images of an earlier run of this exact request, if every file is still there and intact."""
        manifest = self.store.read_manifest(self.directory)
        if not manifest or not self._same_picture(manifest):
            return None
        images = manifest.get("images") or []
        if not all(self.store.verify(image) for image in images):
            log.warning(
                "manifest in %s lists files that are missing or changed: regenerating", self.directory
            )
            return None
        return images

    def _same_picture(self, manifest: dict[str, Any]) -> bool:
        fingerprint = manifest.get("fingerprint")
        if fingerprint == self.fingerprint:
            return True
        trust = self.old_fingerprints.get(str(fingerprint))
        if trust is None or trust == "same":
            return trust == "same"
        # An old fingerprint two pictures shared: the request the manifest recorded says which it was.
        recorded = manifest.get("request")
        if isinstance(recorded, dict):
            return self.request.made_as_recorded(recorded)
        return trust == "presumed"

    def _ledger(self) -> Ledger:
        r = self.ref
        ledger = self.ledgers.load(dag_id=r.dag_id, task_id=r.task_id, run_id=r.run_id, map_index=r.map_index)
        ledger.adopt(self.fingerprint, self.legacy_fingerprints)
        return ledger

    @staticmethod
    def find(store: ArtifactStore, ref: TaskInstanceRef, task_uuid: str) -> Submission | None:
        """The submission of task instance `ref` that carries `task_uuid` (a trigger's event names it),
        found without building a request: on resume the templates may render another one."""
        directory = store.task_dir(ref.dag_id, ref.run_id, ref.task_id, ref.map_index)
        ledger = LedgerStore(directory).load(
            dag_id=ref.dag_id, task_id=ref.task_id, run_id=ref.run_id, map_index=ref.map_index
        )
        return ledger.find(task_uuid)

    def previous_try(self) -> Submission | None:
        """What an earlier try made from the same unrendered arguments, when it is not this request.

        Same arguments and another fingerprint: a template renders differently each time, and that
        earlier request (pending, or stored) is this task instance's image; None when nothing was
        recorded, the DAG was edited (other arguments), or the request renders the same.
        """
        if self.arguments is None:
            return None
        previous = self._ledger().latest_from(self.arguments)
        if previous is None or previous.fingerprint == self.fingerprint or previous.request is None:
            return None
        return previous

    def pinned(self, submission: Submission) -> GenerationJob:
        """This job for the request `submission` paid for: its fingerprint, its recorded request."""
        job = GenerationJob(
            self.ref,
            paid_request(submission, self.request),
            backend=self.backend,
            origin=self.origin,
            store=self.store,
            on_nsfw=self.on_nsfw,
        )
        job.fingerprint, job.legacy_fingerprints, job.arguments = submission.fingerprint, [], self.arguments
        return job

    def next_submission(self) -> Submission:
        """The recorded submission to reattach to, or a new generation to submit."""
        return self._ledger().new_submission(self.fingerprint, self.expected_results)

    def submit(self, hook: Submitter, delivery: DeliveryFields | None = None) -> Submission:
        """Record the intent, send, record the submission: a crash anywhere leaves a record to reattach to.

        A recorded `submitted` is not sent again. An `intent` is sent again with the same taskUUID: if the
        first send landed, Runware answers `conflictTaskUUID` and the hook reports it as submitted.
        `delivery`: the webhook URL and upload endpoint to add to the request (none by default).
        """
        ledger = self._ledger()
        submission = ledger.new_submission(self.fingerprint, self.expected_results)
        kind = self.task_kind
        if submission.status == "submitted":
            log.info(
                "Reattaching to %s %s (generation %d)", kind, submission.task_uuid, submission.generation
            )
            return submission
        if submission.status == "intent" and submission.fingerprint in ledger.submissions:
            log.info("Re-sending %s %s after an interrupted submit", kind, submission.task_uuid)
        if submission.request is None:
            submission.request = recorded_request(self.request)
            submission.arguments = self.arguments
        ledger.record(submission, "intent")
        self.ledgers.save(ledger)
        self._send(hook, delivery or DeliveryFields(), self.request_for(submission))
        ledger.record(submission, "submitted")
        self.ledgers.save(ledger)
        log.info("Submitted %s %s (generation %d)", kind, submission.task_uuid, submission.generation)
        return submission

    @staticmethod
    def _send(hook: Submitter, delivery: DeliveryFields, request: ImageInferenceRequest) -> None:
        """Finish the request with its delivery fields and submit it.

        The fields are credentials (webhook token, presigned signature): they are masked in task logs
        and scrubbed from errors before anything can print them, and never logged whole.
        """
        finished = delivery.finish(request)
        mask_credentials(*finished.credentials)
        if finished.request.webhook_url is not None:
            log.info("Runware will POST the results to %s", without_query(str(finished.request.webhook_url)))
        if finished.upload_target is not None:
            log.info("Runware will upload the image to %s (presigned PUT)", finished.upload_target)
        try:
            hook.submit([finished.request])
        except ZImageError as exc:
            exc.args = (redact(str(exc), finished.credentials),)
            raise

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
        kept = apply_nsfw_policy(results, self.on_nsfw, self.backend)
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


# Never recorded: the id the ledger chooses, and the delivery URLs, which are credentials (a webhook
# token, a presigned signature) and are added inside the send anyway.
_NOT_RECORDED = frozenset({"taskUUID", "webhookURL", "uploadEndpoint"})


def recorded_request(request: ImageInferenceRequest) -> dict[str, Any]:
    """The request as the ledger records it: the wire form without the taskUUID and delivery URLs."""
    return {k: v for k, v in request.to_wire().items() if k not in _NOT_RECORDED}


def parameter_digests(request: ImageInferenceRequest) -> dict[str, str]:
    """One short digest per recorded parameter: enough to name what changed, too little to read it."""
    return {
        k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:12]
        for k, v in recorded_request(request).items()
    }


def paid_request(submission: Submission, current: ImageInferenceRequest) -> ImageInferenceRequest:
    """The request `submission` paid for, rebuilt from the ledger; the delivery URLs are `current`'s.

    A ledger written before requests were recorded, or one that no longer validates, gives `current`:
    the taskUUID and the fingerprint still come from the ledger.
    """
    if submission.request is None:
        return current
    delivery = {k: v for k, v in current.to_wire().items() if k in _NOT_RECORDED and k != "taskUUID"}
    try:
        return ImageInferenceRequest.model_validate({**submission.request, **delivery})
    except (ValueError, ZImageError) as exc:
        log.warning("the request recorded for task %s could not be read back: %s", submission.task_uuid, exc)
        return current


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """A digest of an operator's arguments as written in the DAG, before any template is rendered."""
    canonical = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_differences(current: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """The wire names of the parameters whose values differ (names only: values may be long or private)."""
    return sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))


def warn_rendered_differently(what: str, parameters: Sequence[str]) -> None:
    """Said once per try: the images are safe, but the DAG asks for another picture on every render."""
    log.warning(
        "%s renders differently than when it was paid for (%s): the image that was paid for is stored "
        "and no other is paid for. A template that renders anew every time (such as "
        'seed="{{ (macros.random() * 2147483647) | int }}") asks for another picture on every resume '
        'and retry: derive it from the run (seed="{{ ds_nodash }}") or leave seed unset.',
        what,
        f"{', '.join(parameters)} differ" if parameters else "its parameters differ",
    )


def nsfw_checker(backend: str) -> str:
    """Who flagged an image, for the log: Runware, or the safety checker of an executor or of this
    worker; someone wondering why an image is missing looks there."""
    return {
        "runware": "Runware",
        "executor": "the zimage-executor's safety checker (backend 'executor')",
        "local": "the local safety checker (backend 'local')",
    }.get(backend, f"backend {backend!r}")


def apply_nsfw_policy(
    results: Sequence[ImageResult], policy: NsfwPolicy, backend: str = "runware"
) -> list[ImageResult]:
    """`backend`: the connection's backend, whose check set the flags."""
    flagged = [r for r in results if r.nsfw_content]
    if not flagged or policy == "keep":
        return list(results)
    if policy == "skip":
        log.warning(
            "Skipping %d image(s) flagged NSFW by %s (on_nsfw='skip')", len(flagged), nsfw_checker(backend)
        )
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
