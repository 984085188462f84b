"""`ZImageGenerateOperator`: one image request per task instance, on the Runware API or a local GPU.

Orchestration only: build and validate the request, reuse or submit through `GenerationJob`, defer to
`ZImageTaskTrigger` (or poll in-process), store, and return the manifest entries as XCom.

Delivery options only change how results reach Airflow, never which image is made: `webhookURL` and
`uploadEndpoint` are left out of the request fingerprint, and they are added to the request inside the
send, derived from the taskUUID the ledger chose, so a re-sent submission carries the same webhook URL
and the same upload key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import parse_qsl, urlsplit

from airflow.sdk import BaseOperator, BaseOperatorLink

from airflow_provider_zimage import protocol
from airflow_provider_zimage.compat import AirflowException, AirflowFailException, conf
from airflow_provider_zimage.exceptions import (
    ZImageError,
    ZImagePermanentError,
    ZImageTimeout,
    ZImageValidationError,
)
from airflow_provider_zimage.generation import GenerationJob, NsfwPolicy, TaskInstanceRef
from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
from airflow_provider_zimage.inbox import WebhookInbox, default_inbox_path
from airflow_provider_zimage.models import ImageInferenceRequest, ImageResult, estimate_cost
from airflow_provider_zimage.storage import ArtifactStore, default_output_path
from airflow_provider_zimage.triggers.task import TaskEvent, ZImageTaskTrigger
from airflow_provider_zimage.uploads import S3_PROTOCOLS, presign_put, store_uploaded, upload_target
from airflow_provider_zimage.webhooks.tokens import configured_secret, webhook_url, without_query

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

Backend = Literal["runware", "local"]
Delivery = Literal["polling", "webhook"]
LINK_XCOM_KEY = "zimage_image_link"
# getResponse codes meaning "the results are gone", not "the request was wrong".
LOST_RESULT_CODES = frozenset({"taskExpired", "taskNotFound"})


def _rendered_number(value: Any, kind: type[int] | type[float]) -> Any:
    """Jinja renders `seed="{{ ds_nodash }}"` as the string "20260101"; the request models are strict
    about types, so a templated number is converted back here. Anything else is left for validation to
    refuse with the parameter named."""
    if not isinstance(value, str):
        return value
    try:
        return kind(value.strip())
    except ValueError:
        return value


class ZImageImageLink(BaseOperatorLink):
    """Opens the first stored image (an S3 console page for s3://, the file URI otherwise)."""

    name = "Z-Image: first image"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=LINK_XCOM_KEY) or ""


def browsable_link(uri: str) -> str:
    if uri.startswith("s3://"):
        bucket_key = uri[len("s3://") :].split("@", 1)[-1]
        bucket, _, key = bucket_key.partition("/")
        return f"https://s3.console.aws.amazon.com/s3/object/{bucket}?prefix={key}"
    return uri


class ZImageGenerateOperator(BaseOperator):
    """Generate images with Z-Image and store them; returns one small dict per image (never bytes).

    Every Runware request parameter is an argument (snake_case; see the README table). The same DAG runs
    on the Runware API or a local GPU by changing `backend` (or the connection's `backend` extra).

    :param prompt: positivePrompt, 2-3000 characters. Templated; `.expand(prompt=[...])` maps over prompts.
    :param model: AIR id or alias (`z-image`, `z-image-turbo`, `twinflow`). Templated.
    :param backend: "runware" or "local"; None takes the connection's `backend` extra (default runware).
    :param deferrable: wait in the triggerer instead of holding a worker slot.
    :param wait_for_completion: False submits and returns the taskUUID (pair with `ZImageTaskSensor`).
    :param output_path: ObjectStoragePath URL for images and manifests; `[zimage] output_path` if unset.
    :param force: regenerate even when this task instance already stored images for the same request.
    :param max_cost_usd: refuse, before submitting, a request whose catalog estimate exceeds this.
    :param on_nsfw: what to do with images Runware flags NSFW: fail, skip or keep.
    :param timeout: seconds to wait for Runware before the task fails (retries reattach, never resubmit).
    :param delivery: "polling" (getResponse) or "webhook": Runware POSTs results to the webhook plugin
        on the API server (connection extras `webhook_base_url` and `webhook_secret`, or
        `[zimage] webhook_secret`), and the wait wakes when one arrives. See the README, "Webhooks and
        direct uploads".
    :param webhook_grace_period: with delivery="webhook", seconds after submitting before getResponse
        polling starts as well, so a lost webhook costs this much latency and never an image.
    :param webhook_check_interval: with delivery="webhook", seconds between two looks at the task's
        inbox folder (one listing each; on S3 a LIST request, so raise it for many concurrent tasks).
    :param upload_to_storage: Runware PUTs the image straight into the s3:// `output_path` through a
        presigned URL; the worker reads it back from the bucket for the manifest, never from Runware.
        One image per task: `number_results` > 1 is refused (uploadEndpoint is one URL per task).
    """

    template_fields: Sequence[str] = (
        "prompt",
        "negative_prompt",
        "seed",
        "model",
        "width",
        "height",
        "steps",
        "cfg_scale",
        "output_path",
        "seed_image",
        "mask_image",
        "lora",
        "zimage_conn_id",
    )
    template_fields_renderers = {"prompt": "py", "negative_prompt": "py", "lora": "json"}
    operator_extra_links = (ZImageImageLink(),)
    ui_color = "#f4e1ff"

    def __init__(
        self,
        *,
        prompt: str,
        model: str = "runware:z-image@turbo",
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        scheduler: str | None = None,
        cfg_scale: float | None = None,
        strength: float | None = None,
        mask_margin: int | None = None,
        seed_image: str | None = None,
        mask_image: str | None = None,
        outpaint: dict[str, int] | None = None,
        lora: list[dict[str, Any]] | None = None,
        control_net: list[dict[str, Any]] | None = None,
        ultralytics: dict[str, Any] | None = None,
        number_results: int | None = None,
        output_type: str | None = None,
        output_format: str | None = None,
        output_quality: int | None = None,
        safety: dict[str, Any] | None = None,
        ttl: int | None = None,
        include_cost: bool = True,
        acceleration: str | None = None,
        accelerator_options: dict[str, Any] | None = None,
        upload_endpoint: str | None = None,
        zimage_conn_id: str = ZImageHook.default_conn_name,
        backend: Backend | None = None,
        local_model_path: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        cpu_offload: bool | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        wait_for_completion: bool = True,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        timeout: float = 3600.0,
        output_path: str | None = None,
        force: bool = False,
        max_cost_usd: float | None = None,
        on_nsfw: NsfwPolicy = "fail",
        delivery: Delivery = "polling",
        webhook_grace_period: float = 60.0,
        webhook_check_interval: float = 0.25,
        upload_to_storage: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prompt = prompt
        self.model = model
        self.negative_prompt = negative_prompt
        self.width = width
        self.height = height
        self.seed = seed
        self.steps = steps
        self.scheduler = scheduler
        self.cfg_scale = cfg_scale
        self.strength = strength
        self.mask_margin = mask_margin
        self.seed_image = seed_image
        self.mask_image = mask_image
        self.outpaint = outpaint
        self.lora = lora
        self.control_net = control_net
        self.ultralytics = ultralytics
        self.number_results = number_results
        self.output_type = output_type
        self.output_format = output_format
        self.output_quality = output_quality
        self.safety = safety
        self.ttl = ttl
        self.include_cost = include_cost
        self.acceleration = acceleration
        self.accelerator_options = accelerator_options
        self.upload_endpoint = upload_endpoint
        self.zimage_conn_id = zimage_conn_id
        self.backend = backend
        self.local_model_path = local_model_path
        self.device = device
        self.dtype = dtype
        self.cpu_offload = cpu_offload
        self.deferrable = deferrable
        self.wait_for_completion = wait_for_completion
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.timeout = timeout
        self.output_path = output_path
        self.force = force
        self.max_cost_usd = max_cost_usd
        if on_nsfw not in ("fail", "skip", "keep"):
            raise ValueError(f"on_nsfw must be 'fail', 'skip' or 'keep' (got {on_nsfw!r})")
        self.on_nsfw = on_nsfw
        if delivery not in ("polling", "webhook"):
            raise ValueError(f"delivery must be 'polling' or 'webhook' (got {delivery!r})")
        if delivery == "webhook" and not wait_for_completion:
            raise ValueError(
                "delivery='webhook' needs wait_for_completion=True: ZImageTaskSensor waits by polling"
            )
        if webhook_grace_period < 0:
            raise ValueError(f"webhook_grace_period must be >= 0 seconds (got {webhook_grace_period})")
        if webhook_check_interval <= 0:
            raise ValueError(f"webhook_check_interval must be > 0 seconds (got {webhook_check_interval})")
        self.delivery = delivery
        self.webhook_grace_period = webhook_grace_period
        self.webhook_check_interval = webhook_check_interval
        if upload_to_storage and upload_endpoint:
            raise ValueError("pass either upload_endpoint or upload_to_storage=True, not both")
        if upload_to_storage and (number_results or 1) > 1:
            raise ValueError(
                f"number_results={number_results} cannot be used with upload_to_storage=True: Runware "
                "uploads every result of a task to its one uploadEndpoint; map over prompts or seeds "
                "to get several images"
            )
        self.upload_to_storage = upload_to_storage

    # -- request ------------------------------------------------------------------------------------

    def build_request(self) -> ImageInferenceRequest:
        """The validated request; raises ZImageValidationError naming the parameter before any call."""
        inputs = {k: v for k, v in (("seed_image", self.seed_image), ("mask_image", self.mask_image)) if v}
        fields: dict[str, Any] = {
            "model": self.model,
            "positive_prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": _rendered_number(self.width, int),
            "height": _rendered_number(self.height, int),
            "seed": _rendered_number(self.seed, int),
            "steps": _rendered_number(self.steps, int),
            "scheduler": self.scheduler,
            "cfg_scale": _rendered_number(self.cfg_scale, float),
            "strength": self.strength,
            "mask_margin": self.mask_margin,
            "inputs": inputs or None,
            "outpaint": self.outpaint,
            "lora": self.lora,
            "control_net": self.control_net,
            "ultralytics": self.ultralytics,
            "number_results": self.number_results,
            "output_type": self.output_type,
            "output_format": self.output_format,
            "output_quality": self.output_quality,
            "safety": self.safety,
            "ttl": self.ttl,
            "include_cost": self.include_cost,
            "acceleration": self.acceleration,
            "accelerator_options": self.accelerator_options,
            "upload_endpoint": self.upload_endpoint,
        }
        return ImageInferenceRequest.build(**{k: v for k, v in fields.items() if v is not None})

    def _settings(self) -> ConnectionSettings:
        """The connection's settings; a local run needs no connection at all."""
        try:
            return ZImageHook(self.zimage_conn_id).settings
        except Exception as exc:  # AirflowNotFoundException and friends, without importing them
            if self.backend == "local":
                return ConnectionSettings(backend="local")
            raise AirflowFailException(
                f"connection {self.zimage_conn_id!r} is not usable: {exc}. Create it (conn type 'zimage', "
                "password = Runware API key) or pass backend='local'."
            ) from None

    def _local_model_source(self, settings: ConnectionSettings) -> str | None:
        return self.local_model_path or settings.model_path

    def _job(
        self,
        context: Context,
        request: ImageInferenceRequest,
        backend: str,
        settings: ConnectionSettings | None = None,
    ) -> GenerationJob:
        store = ArtifactStore(self.output_path or default_output_path())
        if backend == "local":
            origin = self._local_model_source(settings or self._settings()) or request.spec.hf_repo
        else:
            origin = self.zimage_conn_id
        return GenerationJob(
            TaskInstanceRef.from_context(context),
            request,
            backend=backend,
            origin=origin,
            store=store,
            on_nsfw=self.on_nsfw,
        )

    # -- execution ----------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        try:
            request = self.build_request()
        except ZImageValidationError as exc:
            raise AirflowFailException(f"invalid Z-Image request: {exc}") from None
        settings = self._settings()
        backend = self.backend or settings.backend
        if backend not in ("runware", "local"):
            raise AirflowFailException(f"backend must be 'runware' or 'local' (got {backend!r})")
        job = self._job(context, request, backend, settings)

        if not self.force and (images := job.reusable_images()) is not None:
            self.log.info(
                "This task instance already stored %d image(s) for this exact request: returning them "
                "without generating (force=True regenerates).",
                len(images),
            )
            return self._finish(context, images)

        if backend == "local":
            return self._finish(context, self._run_local(job, settings))

        estimate = estimate_cost(request)
        self.log.info("Estimated cost: $%.4f for %d image(s)", estimate, job.expected_results)
        if self.max_cost_usd is not None and estimate > self.max_cost_usd:
            raise AirflowFailException(
                f"max_cost_usd: the estimated cost ${estimate:.4f} exceeds the limit ${self.max_cost_usd:.4f}"
            )

        hook = ZImageHook(self.zimage_conn_id)
        send = self._sender(job, settings, hook)
        try:
            submission = job.submit(send)
        except ZImagePermanentError as exc:
            raise AirflowFailException(str(exc)) from None
        except ZImageError as exc:
            raise AirflowException(f"submitting to Runware failed, Airflow may retry: {exc}") from None
        if not self.wait_for_completion:
            return submission.task_uuid

        trigger = self._trigger(submission.task_uuid, job.expected_results)
        if self.deferrable:
            self.defer(
                trigger=trigger,
                method_name="execute_complete",
                timeout=timedelta(seconds=self.timeout + 60),
            )
        if self.delivery == "webhook":
            # Not deferred: the worker waits the way the triggerer would, on the inbox first.
            return self.execute_complete(context, asyncio.run(_first_event(trigger)))

        try:
            status = hook.wait_for_task(
                submission.task_uuid,
                job.expected_results,
                timeout=self.timeout,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
            )
        except ZImageTimeout as exc:
            raise AirflowException(f"{exc}; a retry reattaches to the same Runware task") from None
        except ZImagePermanentError as exc:
            raise AirflowFailException(str(exc)) from None
        except ZImageError as exc:
            raise AirflowException(str(exc)) from None
        if status.failed:
            errors = [e.model_dump(by_alias=True) for e in status.errors]
            self._fail_task(job, submission.task_uuid, errors, str(status.errors[0].message))
        return self._store(context, job, status.results, hook, submission.task_uuid)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger: validate the event before trusting it, then store."""
        try:
            parsed = TaskEvent.model_validate(event)
        except Exception as exc:
            raise AirflowException(f"malformed event from ZImageTaskTrigger: {exc}") from None
        request = self.build_request()
        job = self._job(context, request, "runware")
        expected = job.next_submission().task_uuid
        if parsed.task_uuid != expected:
            raise AirflowException(f"event for task {parsed.task_uuid} does not match this task's {expected}")
        if parsed.status == "error":
            if parsed.retryable:
                raise AirflowException(f"{parsed.message}; a retry reattaches to the same Runware task")
            self._fail_task(job, parsed.task_uuid, parsed.errors, parsed.message)
        if parsed.status == "timeout":
            raise AirflowException(f"{parsed.message}; a retry reattaches to the same Runware task")
        results = [ImageResult.from_wire(r) for r in parsed.results]
        images = self._store(context, job, results, ZImageHook(self.zimage_conn_id), parsed.task_uuid)
        self._discard_inbox(parsed.task_uuid)
        return images

    def _fail_task(
        self, job: GenerationJob, task_uuid: str, errors: list[dict[str, Any]], message: str
    ) -> NoReturn:
        """A task Runware failed moves the ledger to a new generation, so the next try pays for a new one.

        Results that expired (or a task Runware forgot) are retryable: nothing is wrong with the request,
        and Airflow's retry regenerates them. Any other task failure is final until someone clears it.
        """
        job.mark_failed(task_uuid, message)
        self._discard_inbox(task_uuid)
        if any(e.get("code") in LOST_RESULT_CODES for e in errors):
            raise AirflowException(
                f"Runware no longer has the results of task {task_uuid} ({message}); "
                "a retry generates them again under a new taskUUID"
            )
        raise AirflowFailException(f"Runware task {task_uuid} failed: {message}")

    # -- delivery -----------------------------------------------------------------------------------

    def _sender(
        self, job: GenerationJob, settings: ConnectionSettings, hook: ZImageHook
    ) -> Callable[[ImageInferenceRequest], object]:
        """Submit a request with the delivery fields of its taskUUID; refuse a misconfiguration first.

        The fields are credentials (webhook token, presigned signature): they are masked in task logs
        and scrubbed from errors before anything can print them, and never logged whole.
        """
        from airflow.sdk.log import mask_secret

        base_url = secret = None
        if self.delivery == "webhook":
            base_url, secret = self._webhook_settings(settings)
            mask_secret(secret)
        if self.upload_to_storage and job.directory.protocol not in S3_PROTOCOLS:
            raise AirflowFailException(
                f"upload_to_storage=True needs an s3:// output_path (got {job.directory}); Runware can "
                "only PUT to a presigned S3 URL"
            )

        def send(request: ImageInferenceRequest) -> object:
            update: dict[str, Any] = {}
            credentials: list[str] = []
            if base_url is not None and secret is not None:
                url = webhook_url(base_url, request.task_uuid, secret, self.zimage_conn_id)
                credentials += _query_values(url)
                update["webhook_url"] = url
                self.log.info("Runware will POST the results to %s", without_query(url))
            if self.upload_to_storage:
                target = upload_target(job, request.task_uuid)
                url = presign_put(target, self.timeout + 900)
                credentials += _query_values(url)
                update["upload_endpoint"] = url
                self.log.info("Runware will upload the image to %s (presigned PUT)", target)
            for credential in credentials:
                mask_secret(credential)
            try:
                return hook.submit([request.model_copy(update=update)])
            except ZImageError as exc:
                exc.args = (protocol.redact(str(exc), credentials),)
                raise

        return send

    def _webhook_settings(self, settings: ConnectionSettings) -> tuple[str, str]:
        """The public base URL and the secret, or a failure naming what to set, before anything is paid."""
        if not settings.webhook_base_url:
            raise AirflowFailException(
                f"delivery='webhook' needs the webhook_base_url extra of connection {self.zimage_conn_id!r}: "
                "the public URL of the Airflow API server, e.g. https://airflow.example.com"
            )
        parts = urlsplit(settings.webhook_base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise AirflowFailException(
                f"the webhook_base_url extra of connection {self.zimage_conn_id!r} must be an http(s) URL "
                f"without a query string (got {settings.webhook_base_url!r})"
            )
        secret = settings.webhook_secret or configured_secret()
        if not secret:
            raise AirflowFailException(
                f"delivery='webhook' needs a webhook secret: set the webhook_secret extra of connection "
                f"{self.zimage_conn_id!r} or [zimage] webhook_secret"
            )
        return settings.webhook_base_url, secret

    def _trigger(self, task_uuid: str, expected_results: int) -> ZImageTaskTrigger:
        webhook = self.delivery == "webhook"
        now = time.time()
        return ZImageTaskTrigger(
            task_uuid=task_uuid,
            zimage_conn_id=self.zimage_conn_id,
            expected_results=expected_results,
            deadline=now + self.timeout,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            webhook_inbox=str(default_inbox_path()) if webhook else None,
            poll_after=now + self.webhook_grace_period if webhook else 0.0,
            inbox_interval=self.webhook_check_interval,
        )

    def _discard_inbox(self, task_uuid: str) -> None:
        if self.delivery != "webhook":
            return
        try:
            WebhookInbox().discard(task_uuid)
        except Exception as exc:  # leftovers are a few small files, not a reason to fail a paid task
            self.log.warning("Could not clear the webhook inbox of task %s: %s", task_uuid, exc)

    def _store(
        self,
        context: Context,
        job: GenerationJob,
        results: list[ImageResult],
        hook: ZImageHook,
        task_uuid: str,
    ) -> Any:
        try:
            if self.upload_to_storage:
                images = store_uploaded(job, results, task_uuid)
            else:
                images = job.store_results(results, hook.download, task_uuid=task_uuid)
        except ZImagePermanentError as exc:
            raise AirflowFailException(str(exc)) from None
        return self._finish(context, images)

    def _run_local(self, job: GenerationJob, settings: ConnectionSettings) -> list[dict[str, Any]]:
        from airflow_provider_zimage.hooks.local import (
            LocalBackendUnavailable,
            LocalGenerationError,
            LocalZImageExecutor,
        )

        executor = LocalZImageExecutor(
            model_path=self._local_model_source(settings),
            device=self.device or settings.device,
            dtype=self.dtype or settings.dtype,
            cpu_offload=self.cpu_offload if self.cpu_offload is not None else settings.cpu_offload,
        )
        try:
            generated = executor.generate(job.request)
        except ZImageValidationError as exc:
            raise AirflowFailException(f"invalid request for the local backend: {exc}") from None
        except (LocalBackendUnavailable, LocalGenerationError, ValueError) as exc:
            # A missing extra, NaN images or an impossible dtype: a retry would reload the weights and
            # fail the same way.
            raise AirflowFailException(str(exc)) from None
        by_uuid = {g.result["imageUUID"]: g for g in generated}
        results = [ImageResult.from_wire(g.result) for g in generated]
        try:
            return job.store_results(results, lambda r: by_uuid[r.image_uuid].data)
        except ZImagePermanentError as exc:
            raise AirflowFailException(str(exc)) from None

    def _finish(self, context: Context, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if images:
            context["ti"].xcom_push(key=LINK_XCOM_KEY, value=browsable_link(images[0]["uri"]))
        self._emit_asset_events(context, images)
        return images

    def _emit_asset_events(self, context: Context, images: list[dict[str, Any]]) -> None:
        from airflow.sdk import Asset

        outlets = [o for o in (self.outlets or []) if isinstance(o, Asset)]
        if not outlets:
            return
        total = round(sum(i.get("cost") or 0.0 for i in images), 6)
        for outlet in outlets:
            context["outlet_events"][outlet].extra = {"images": images, "total_cost": total}


def _query_values(url: str) -> list[str]:
    """The values a token or a presigned signature hides in; each is masked on its own wherever it shows."""
    return [value for _, value in parse_qsl(urlsplit(url).query) if len(value) >= 8]


async def _first_event(trigger: ZImageTaskTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise AirflowException(f"{type(trigger).__name__} ended without an event")
