"""`ZImageGenerateOperator`: one image request per task instance, on the Runware API or a local GPU.

Orchestration only: build and validate the request, reuse or submit through `GenerationJob`, defer to
`ZImageTaskTrigger` (or poll in-process), store, and return the manifest entries as XCom.

Delivery options only change how results reach Airflow, never which image is made: the operator reads
them into a `jobs.delivery.DeliveryFields` value, and the job adds `webhookURL` and `uploadEndpoint`
to the request when it sends it (see `jobs.delivery`). The request building shared with
`ZImageBatchGenerateOperator` is `jobs.arguments`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import BaseOperator, BaseOperatorLink

from airflow_provider_zimage import config
from airflow_provider_zimage.compat import AirflowException, AirflowFailException, conf
from airflow_provider_zimage.config import DEFAULT_DEFERRAL_SETTLE_S, deferral_settle_seconds  # noqa: F401  (DEFAULT_... was importable from here in 0.2)
from airflow_provider_zimage.exceptions import (
    ZImageError,
    ZImagePermanentError,
    ZImageValidationError,
)
from airflow_provider_zimage.hooks.openai_images import OpenAIImagesHook
from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
from airflow_provider_zimage.jobs import content_index
from airflow_provider_zimage.jobs.arguments import (
    REQUEST_ARGUMENTS,
    build_image_request,
    known_secrets,
)
from airflow_provider_zimage.jobs.delivery import (
    Delivery,
    DeliveryFields,
    check_delivery,
    webhook_delivery_settings,
)
from airflow_provider_zimage.jobs.executor_weights import executor_weights
from airflow_provider_zimage.jobs.generation import (
    GenerationJob,
    NsfwPolicy,
    TaskInstanceRef,
    arguments_digest,
    recorded_request,
    request_differences,
    warn_rendered_differently,
)
from airflow_provider_zimage.jobs.openai_images import EngineItem, EngineJob, engine_origin
from airflow_provider_zimage.jobs.uploads import S3_PROTOCOLS, store_uploaded
from airflow_provider_zimage.jobs.waiting import (
    end_try,
    first_event,
    stored_later,
    wait_in_process,
)
from airflow_provider_zimage.local import LocalBackendUnavailable, LocalGenerationError, LocalZImageExecutor
from airflow_provider_zimage.local.weights import request_weights, weight_maps
from airflow_provider_zimage.openai_images.wire import served_models
from airflow_provider_zimage.redaction import mask_credentials, scrub_secrets
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.models import ImageInferenceRequest, ImageResult, estimate_cost
from airflow_provider_zimage.runware.outcomes import Action, TaskWait, timed_out
from airflow_provider_zimage.storage.artifacts import ArtifactStore, default_output_path
from airflow_provider_zimage.triggers.task import TaskEvent, ZImageTaskTrigger
from airflow_provider_zimage.ui.links import images_tab_url
from airflow_provider_zimage.webhooks.inbox import WebhookInbox, default_inbox_path

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

Backend = Literal["runware", "local", "executor", "openai_images"]
_BACKENDS = ("runware", "local", "executor", "openai_images")
# backend=openai_images: calls to the server at once for one task's numberResults images.
ENGINE_CONCURRENCY = 4


class ZImageImageLink(BaseOperatorLink):
    """Opens the task instance's "Z-Image images" tab in the Airflow UI, for every kind of output path.

    Built from the task instance's identity alone, so it reads no XCom (Airflow computes the link when
    a task finishes, deferred or failed ones too, where an XCom lookup would log "XCom not found") and
    it is a same-origin path (the path of `[api] base_url`, no host): the UI draws those, and as Airflow
    stores the link under its own XCom key when the task ends, a host or port that changes later does
    not leave it pointing at the old one.
    """

    name = "Z-Image: images"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        map_index = getattr(ti_key, "map_index", -1)
        index = -1 if map_index is None else int(map_index)
        return images_tab_url(ti_key.dag_id, ti_key.run_id, ti_key.task_id, index, same_origin=True)


class ZImageGenerateOperator(BaseOperator):
    """Generate images with Z-Image and store them; returns one small dict per image (never bytes).

    Every Runware request parameter is an argument (snake_case; see docs/generate-operator.md). The same
    DAG runs on the Runware API or a local GPU by changing `backend` (or the connection's `backend` extra).

    :param prompt: positivePrompt, 2-3000 characters. Templated; `.expand(prompt=[...])` maps over prompts.
    :param model: AIR id or alias (`z-image`, `z-image-turbo`, `twinflow`). Templated.
    :param backend: "runware", "local" (diffusers in the task process) or "executor" (a zimage-executor
        service, the connection's host); None takes the connection's `backend` extra (default runware).
    :param deferrable: wait in the triggerer instead of holding a worker slot.
    :param wait_for_completion: False submits and returns the taskUUID (pair with `ZImageTaskSensor`).
    :param defer_after: with deferrable=True, seconds to poll on the worker before deferring (0 defers
        after one look). Images ready sooner never defer, which keeps sub-second Turbo images out of
        Airflow's deferral race and saves a scheduler round trip.
    :param output_path: ObjectStoragePath URL for images and manifests; `[zimage] output_path` if unset.
    :param force: regenerate even when this task instance already stored images for the same request.
    :param max_cost_usd: refuse, before submitting, a request whose catalog estimate exceeds this.
    :param on_nsfw: what to do with images Runware flags NSFW: fail, skip or keep.
    :param poll_interval: first wait between getResponse polls (growing by 1.5x up to
        `max_poll_interval`); None: 1 s on Runware, 0.1 s on a zimage-executor (the connection's backend).
    :param timeout: seconds to wait for Runware before the task fails (retries reattach, never resubmit).
    :param delivery: "polling" (getResponse) or "webhook": Runware POSTs results to the webhook plugin
        on the API server (connection extras `webhook_base_url` and `webhook_secret`, or
        `[zimage] webhook_secret`), and the wait wakes when one arrives. See docs/webhooks.md.
    :param webhook_grace_period: with delivery="webhook", seconds after submitting before getResponse
        polling starts as well, so a lost webhook costs this much latency and never an image.
    :param webhook_check_interval: with delivery="webhook", seconds between two looks at the task's
        inbox folder (one listing each; on S3 a LIST request, so raise it for many concurrent tasks).
    :param upload_to_storage: Runware PUTs the image straight into the s3:// `output_path` through a
        presigned URL; the worker reads it back from the bucket for the manifest, never from Runware.
        One image per task: `number_results` > 1 is refused (uploadEndpoint is one URL per task).
    :param reuse: "task" (default) reuses what this task instance stored; "content" also copies a seeded
        picture stored before by any run, DAG or task under the same output_path (`content_index`).
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
    # Prompts get no code renderer ("py" would colour them as Python). Airflow 3's Rendered Templates
    # tab ignores renderers anyway (it guesses a language from the value, apache/airflow#39527) and
    # draws every value unwrapped; the provider's "Z-Image images" tab shows the prompts wrapped.
    template_fields_renderers = {"lora": "json"}
    operator_extra_links = (ZImageImageLink(),)
    ui_color = "#f4e1ff"
    DEFAULT_MAP_INDEX_TEMPLATE = "{{ task.prompt_label | replace('\\n', ' ') | truncate(60, leeway=0) }}"
    """Mapped instances are labelled by the start of their prompt unless `map_index_template` is given."""

    @property
    def prompt_label(self) -> str:
        """The prompt as the default map index label shows it: a secret rendered into it (the request
        is refused, but Airflow still labels the failed instance) is "***" there too."""
        return str(scrub_secrets(str(self.prompt), [config.webhook_secret()]))

    @property
    def map_index_template(self) -> str | None:
        explicit = self.__dict__.get("_zimage_map_index_template")
        return self.DEFAULT_MAP_INDEX_TEMPLATE if explicit is None else explicit

    @map_index_template.setter
    def map_index_template(self, value: str | None) -> None:
        self.__dict__["_zimage_map_index_template"] = value

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
        defer_after: float = 5.0,
        poll_interval: float | None = None,
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
        reuse: Literal["task", "content"] = "task",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if reuse not in ("task", "content"):
            raise ValueError(f"reuse must be 'task' or 'content' (got {reuse!r})")
        self.reuse = reuse
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
        if defer_after < 0:
            raise ValueError(f"defer_after must be >= 0 seconds (got {defer_after})")
        self.defer_after = defer_after
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.timeout = timeout
        self.output_path = output_path
        self.force = force
        self.max_cost_usd = max_cost_usd
        if on_nsfw not in ("fail", "skip", "keep"):
            raise ValueError(f"on_nsfw must be 'fail', 'skip' or 'keep' (got {on_nsfw!r})")
        self.on_nsfw = on_nsfw
        check_delivery(delivery, webhook_grace_period, webhook_check_interval)
        if delivery == "webhook" and not wait_for_completion:
            raise ValueError(
                "delivery='webhook' needs wait_for_completion=True: ZImageTaskSensor waits by polling"
            )
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
        # The request arguments as the DAG wrote them, before Airflow renders any template into them:
        # a later try compares this digest to tell a template that renders differently each time from
        # a DAG that was edited (see `GenerationJob.previous_try`).
        self._zimage_arguments = arguments_digest({n: getattr(self, n) for n in REQUEST_ARGUMENTS})

    # -- request ------------------------------------------------------------------------------------

    def build_request(self) -> ImageInferenceRequest:
        """The validated request; raises ZImageValidationError naming the parameter before any call."""
        return build_image_request(
            {name: getattr(self, name) for name in REQUEST_ARGUMENTS}, known_secrets(self.zimage_conn_id)
        )

    def _content_reusable(self, request: ImageInferenceRequest) -> bool:
        return self.reuse == "content" and request.seed is not None and not self.force

    def _index(self, job: GenerationJob, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Remember a stored seeded picture for reuse="content" (a failure costs a future payment only)."""
        if self.reuse == "content" and job.request.seed is not None:
            try:
                content_index.record(job.store, job.fingerprint, images)
            except ZImageError as exc:
                self.log.warning("Could not index the images for reuse: %s", exc)
        return images

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

    def _local_maps(self, settings: ConnectionSettings) -> tuple[dict[str, str], dict[str, str]]:
        """The connection's LoRA and ControlNet maps, refused naming the extra before any load."""
        try:
            return weight_maps(settings.lora_paths, settings.controlnet_paths, config.local_weights_roots())
        except ZImageValidationError as exc:
            raise AirflowFailException(f"connection {self.zimage_conn_id!r}: {exc}") from None

    def _local_origin(self, request: ImageInferenceRequest, settings: ConnectionSettings) -> str | None:
        """The model source, and the weights ids of the LoRAs / ControlNet the request uses: other
        weights behind the same AIR id are another picture, never a reused one."""
        source = self._local_model_source(settings) or request.spec.hf_repo
        extras = request_weights(request, *self._local_maps(settings))
        return "|".join([source or "", *extras]) if extras else source

    def _job(
        self,
        context: Context,
        request: ImageInferenceRequest,
        backend: str,
        settings: ConnectionSettings | None = None,
    ) -> GenerationJob:
        store = ArtifactStore(self.output_path or default_output_path())
        if backend == "local":
            origin = self._local_origin(request, settings or self._settings())
        elif backend == "executor":
            origin = self._executor_origin(request)
        elif backend == "openai_images":
            served = self._served(settings or self._settings())
            origin = engine_origin(self.zimage_conn_id, served.get(request.model, ""))
        else:
            origin = self.zimage_conn_id
        return GenerationJob(
            TaskInstanceRef.from_context(context),
            request,
            backend=backend,
            origin=origin,
            store=store,
            on_nsfw=self.on_nsfw,
            arguments=getattr(self, "_zimage_arguments", None),
        )

    def _paid_by_an_earlier_try(self, job: GenerationJob) -> GenerationJob:
        """The request an earlier try paid for, when the same arguments now render another request.

        A retry never pays twice: a submission still pending at Runware is reattached to, and stored
        images are returned (force=True pays for the new rendering instead). A DAG that was edited has
        other arguments, and its new request is paid for as usual.
        """
        previous = job.previous_try()
        if previous is None or previous.request is None:
            return job
        if previous.status in ("intent", "submitted") or (previous.status == "stored" and not self.force):
            warn_rendered_differently(
                "The request", request_differences(recorded_request(job.request), previous.request)
            )
            self._rendering_warned = True
            return job.pinned(previous)
        return job

    def _executor_origin(self, request: ImageInferenceRequest) -> str:
        """The connection and the weights the executor reports: other weights are another picture."""
        return executor_weights(self.zimage_conn_id).origin(request)

    # -- execution ----------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        try:
            request = self.build_request()
        except ZImageValidationError as exc:
            raise AirflowFailException(str(exc)) from None
        settings = self._settings()
        backend = self.backend or settings.backend
        if backend not in _BACKENDS:
            raise AirflowFailException(f"backend must be one of {', '.join(_BACKENDS)} (got {backend!r})")
        if backend == "openai_images" and not self.wait_for_completion:
            raise AirflowFailException(
                "wait_for_completion=False does not apply to backend openai_images: the OpenAI images API "
                "answers with the image and has no task id to hand to ZImageTaskSensor"
            )
        job = self._job(context, request, backend, settings)
        if backend not in ("local", "openai_images"):
            job = self._paid_by_an_earlier_try(job)
            request = job.request

        if not self.force and (images := job.reusable_images()) is not None:
            self.log.info(
                "This task instance already stored %d image(s) for this exact request: returning them "
                "without generating (force=True regenerates).",
                len(images),
            )
            return self._finish(context, images)

        if self._content_reusable(request) and (
            copies := content_index.reuse(job.store, job.fingerprint, job.directory, job.content_fingerprints)
        ):
            self.log.info("reuse='content': this seeded picture was stored before; copied, nothing paid")
            job.write_manifest(copies, task_uuid=None)
            return self._finish(context, copies)

        if backend == "local":
            return self._finish(context, self._index(job, self._run_local(job, settings)))
        if backend == "openai_images":
            return self._finish(context, self._index(job, self._run_openai_images(job, settings)))

        estimate = estimate_cost(request) if backend == "runware" else 0.0  # an executor costs nothing
        self.log.info("Estimated cost: $%.4f for %d image(s)", estimate, job.expected_results)
        if self.max_cost_usd is not None and estimate > self.max_cost_usd:
            raise AirflowFailException(
                f"max_cost_usd: the estimated cost ${estimate:.4f} exceeds the limit ${self.max_cost_usd:.4f}"
            )

        delivery = self._delivery(job, settings)
        hook = ZImageHook(self.zimage_conn_id)
        try:
            submission = job.submit(hook, delivery)
        except ZImagePermanentError as exc:
            raise AirflowFailException(str(exc)) from None
        except ZImageError as exc:
            raise AirflowException(
                f"submitting the {job.task_kind} failed, Airflow may retry: {exc}"
            ) from None
        if not self.wait_for_completion:
            return submission.task_uuid

        # Measured from the first accepted submission: a retry that reattaches gets what is left.
        deadline = (submission.submitted_at or time.time()) + self.timeout
        wait = TaskWait(submission.task_uuid, job.expected_results)
        poll_interval = protocol.first_poll_interval(self.poll_interval, backend)
        if self.delivery == "webhook":
            # The worker waits the way the triggerer would, on the inbox first (no polling before the
            # grace period); deferrable, only for `defer_after` seconds.
            limit = self.defer_after if self.deferrable else None
            event = asyncio.run(first_event(self._trigger(wait, deadline, poll_interval), limit))
            if event is not None:
                return self.execute_complete(context, event)
            self._defer(wait, deadline, poll_interval)
        # Look before deferring, and keep looking for `defer_after` seconds: a Turbo image is ready in
        # about a second, and a trigger that fires that fast meets Airflow's deferral race.
        until = min(deadline, time.time() + self.defer_after) if self.deferrable else deadline
        with hook:
            outcome = wait_in_process(
                hook,
                wait,
                until=until,
                poll_interval=poll_interval,
                max_poll_interval=self.max_poll_interval,
            )
            if outcome.action is Action.STORE:
                return self._store(context, job, wait.status.results, hook, submission.task_uuid)
        if outcome.action is Action.WAIT and self.deferrable and time.time() < deadline:
            self._defer(wait, deadline, poll_interval)
        if outcome.action is Action.WAIT:
            outcome = timed_out(wait.status)
        end_try(job, submission.task_uuid, outcome)

    def _defer(self, wait: TaskWait, deadline: float, poll_interval: float) -> None:
        self.log.info("Task %s not ready after %gs: deferring", wait.task_uuid, self.defer_after)
        self.defer(
            trigger=self._trigger(wait, deadline, poll_interval, deferred=True),
            method_name="execute_complete",
            # The resumed half of the try says what the first half already said, not twice.
            kwargs={"rendering_warned": True} if getattr(self, "_rendering_warned", False) else None,
            timeout=timedelta(seconds=max(0.0, deadline - time.time()) + 60),
        )

    def execute_complete(
        self, context: Context, event: dict[str, Any], rendering_warned: bool = False
    ) -> Any:
        """Resume after the trigger: validate the event before trusting it, then act on its outcome.

        The event's taskUUID must be one this task instance recorded in its ledger; the request stored
        and written to the manifest is the one recorded with it (what was paid for), whatever the
        templates render now.
        """
        try:
            parsed = TaskEvent.model_validate(event)
        except Exception as exc:
            raise AirflowException(f"malformed event from ZImageTaskTrigger: {exc}") from None
        backend = "executor" if (self.backend or self._settings().backend) == "executor" else "runware"
        job = self._resumed_job(context, backend, parsed.task_uuid, warn=not rendering_warned)
        self._discard_inbox(parsed.task_uuid)
        outcome = parsed.to_outcome()
        with ZImageHook(self.zimage_conn_id) as hook:
            results = [ImageResult.from_wire(r) for r in parsed.results]
            if outcome.action is Action.STORE and parsed.refetch:
                # The event left the image bytes out (they do not belong in the metadata DB): ask
                # again, which is free, and read the answer the same way as any other.
                wait = TaskWait(parsed.task_uuid, job.expected_results)
                outcome = wait_in_process(hook, wait, until=time.time())
                results = wait.status.results
            if outcome.action is Action.STORE:
                return self._store(context, job, results, hook, parsed.task_uuid)
        if outcome.action is Action.WAIT:
            outcome = timed_out(TaskWait(parsed.task_uuid, job.expected_results).status)
        end_try(job, parsed.task_uuid, outcome)

    def _resumed_job(self, context: Context, backend: str, task_uuid: str, *, warn: bool) -> GenerationJob:
        """The job of the submission `task_uuid` names, or a refusal when this task instance never made it."""
        invalid: list[str] = []
        try:
            rendered: ImageInferenceRequest | None = self.build_request()
        except ZImageValidationError as exc:
            rendered, invalid = None, list(exc.parameters)
        store = ArtifactStore(self.output_path or default_output_path())
        recorded = GenerationJob.find(store, TaskInstanceRef.from_context(context), task_uuid)
        if recorded is None or recorded.request is None:
            # A ledger written before requests were recorded (or lost): the re-rendered request must
            # derive the same taskUUID.
            job = self._job(context, rendered or self.build_request(), backend)
            expected = job.next_submission().task_uuid if recorded is None else recorded.task_uuid
            if task_uuid != expected:
                raise AirflowException(f"event for task {task_uuid} does not match this task's {expected}")
            return job if recorded is None else job.pinned(recorded)
        try:
            paid = ImageInferenceRequest.model_validate(recorded.request)
        except (ValueError, ZImageError) as exc:
            if rendered is None:
                raise AirflowFailException(
                    f"the request of task {task_uuid} cannot be read back: {exc}"
                ) from None
            paid = rendered
        job = self._job(context, paid, backend).pinned(recorded)
        if warn and (rendered is None or rendered.fingerprint() != job.request.fingerprint()):
            if rendered is None:
                names = invalid
            else:
                names = request_differences(recorded_request(rendered), recorded.request)
            warn_rendered_differently("The request", names)
        return job

    # -- delivery -----------------------------------------------------------------------------------

    def _delivery(self, job: GenerationJob, settings: ConnectionSettings) -> DeliveryFields:
        """What the job adds to the request when it sends it; a misconfiguration is refused first.

        The webhook secret is masked in task logs here; the job masks the per-task credentials (webhook
        token, presigned signature) it derives from it.
        """
        base_url = secret = None
        if self.delivery == "webhook":
            base_url, secret = self._webhook_settings(settings)
            mask_credentials(secret)
        if self.upload_to_storage and job.directory.protocol not in S3_PROTOCOLS:
            raise AirflowFailException(
                f"upload_to_storage=True needs an s3:// output_path (got {job.directory}); Runware can "
                "only PUT to a presigned S3 URL"
            )
        return DeliveryFields(
            conn_id=self.zimage_conn_id,
            lifetime=self.timeout,
            webhook_base_url=base_url,
            webhook_secret=secret,
            upload_directory=job.directory if self.upload_to_storage else None,
        )

    def _webhook_settings(self, settings: ConnectionSettings) -> tuple[str, str]:
        return webhook_delivery_settings(settings, self.zimage_conn_id)

    def _trigger(
        self, wait: TaskWait, deadline: float, poll_interval: float, *, deferred: bool = False
    ) -> ZImageTaskTrigger:
        webhook = self.delivery == "webhook"
        now = time.time()
        return ZImageTaskTrigger(
            task_uuid=wait.task_uuid,
            zimage_conn_id=self.zimage_conn_id,
            expected_results=wait.status.expected_results,
            deadline=deadline,
            poll_interval=poll_interval,
            max_poll_interval=self.max_poll_interval,
            webhook_inbox=str(default_inbox_path()) if webhook else None,
            poll_after=now + self.webhook_grace_period if webhook else 0.0,
            inbox_interval=self.webhook_check_interval,
            # Deferred, an answer is held a few seconds: a trigger that fires before the scheduler
            # has seen the deferral fails the task (Airflow 3.3's race). On a worker, no such race.
            not_before=now + deferral_settle_seconds() if deferred else 0.0,
        )

    def _discard_inbox(self, task_uuid: str) -> None:
        if self.delivery != "webhook":
            return
        try:
            WebhookInbox(conn_id=self.zimage_conn_id).discard(task_uuid)
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
        except ZImageError as exc:
            raise AirflowException(stored_later(task_uuid, exc)) from None
        return self._finish(context, self._index(job, images))

    def _run_local(self, job: GenerationJob, settings: ConnectionSettings) -> list[dict[str, Any]]:
        lora_paths, controlnet_paths = self._local_maps(settings)
        executor = LocalZImageExecutor(
            model_path=self._local_model_source(settings),
            device=self.device or settings.device,
            dtype=self.dtype or settings.dtype,
            cpu_offload=self.cpu_offload if self.cpu_offload is not None else settings.cpu_offload,
            lora_paths=lora_paths,
            controlnet_paths=controlnet_paths,
            lora_roots=config.local_weights_roots(),
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

    @staticmethod
    def _served(settings: ConnectionSettings) -> dict[str, str]:
        try:
            return served_models(settings.served_model)
        except ZImageValidationError as exc:
            raise AirflowFailException(str(exc)) from None

    def _run_openai_images(self, job: GenerationJob, settings: ConnectionSettings) -> list[dict[str, Any]]:
        """Every image of the request from the OpenAI images server, recorded one by one (see
        `jobs.openai_images`); refused as a whole before the first call."""
        engine = EngineJob(
            ref=job.ref,
            store=job.store,
            directory=job.directory,
            served=self._served(settings),
            max_in_flight=min(ENGINE_CONCURRENCY, job.expected_results),
            log=self.log,
            force=self.force,
        )
        items = [EngineItem(0, job.request, job.fingerprint)]
        try:
            engine.plan(items)
        except ZImageValidationError as exc:
            raise AirflowFailException(str(exc)) from None
        with OpenAIImagesHook(self.zimage_conn_id) as hook:
            result = engine.run(items, hook)
        if result.failed:
            stored = len(result.images[0])
            message = (
                f"{result.failed[0]}; {stored} of {job.expected_results} image(s) are stored and a retry "
                "makes only the others"
            )
            raise (AirflowFailException if result.permanent else AirflowException)(message)
        images = [{k: v for k, v in image.items() if k != "index"} for image in result.images[0]]
        job.write_manifest(images, task_uuid=None)
        return images

    def _finish(self, context: Context, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._emit_asset_events(context, images)
        ref = TaskInstanceRef.from_context(context)  # ids and `[api] base_url` only: nothing secret
        self.log.info("Images tab: %s", images_tab_url(ref.dag_id, ref.run_id, ref.task_id, ref.map_index))
        return images

    def _emit_asset_events(self, context: Context, images: list[dict[str, Any]]) -> None:
        from airflow.sdk import Asset

        outlets = [o for o in (self.outlets or []) if isinstance(o, Asset)]
        if not outlets:
            return
        total = round(sum(i.get("cost") or 0.0 for i in images), 6)
        for outlet in outlets:
            extra: dict[str, Any] = {"images": images, "total_cost": total}
            context["outlet_events"][outlet].extra = extra
