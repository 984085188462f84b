"""`ZImageBatchGenerateOperator`: thousands of image requests in one task instance.

Mapping one task instance per image makes Airflow the bottleneck (a worker process, a deferral and a
scheduler round per image). This operator validates every request first, submits them in chunks (many
tasks per POST) with a bound on tasks in flight, waits for all of them with batched `getResponse`
(in-process, or in ONE `ZImageBatchTrigger`), stores the images concurrently and writes one manifest.

With `delivery="webhook"` every task of the batch carries its own webhook URL (the per-task token of
`webhooks.tokens`); the wait, in-process or in the trigger, looks at the webhook inbox for the whole
batch in one listing and polls `getResponse` only for tasks past the grace period, so a lost webhook
costs latency, never an image. After a deferral the worker reads the results from the inbox too.

The operator validates the rows (requests built by `jobs.arguments.build_image_request`, as for
`ZImageGenerateOperator`), reads its arguments into a `jobs.batch.BatchSettings` and runs a
`jobs.batch.BatchJob`, which does the rest; the operator only turns the job's `Defer` into a deferral.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import BaseOperator

from airflow_provider_zimage.compat import AirflowException, AirflowFailException, conf
from airflow_provider_zimage.config import deferral_settle_seconds
from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.hooks.openai_images import OpenAIImagesHook
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.jobs.arguments import REQUEST_ARGUMENTS, build_image_request, row_secrets
from airflow_provider_zimage.jobs.batch import DEFAULT_CHUNK_SIZE, BatchJob, BatchSettings, Defer, Prepared
from airflow_provider_zimage.jobs.batch_ledger import BatchLedgerStore
from airflow_provider_zimage.jobs.delivery import (
    Delivery,
    DeliveryFields,
    check_delivery,
    webhook_delivery_settings,
)
from airflow_provider_zimage.jobs.executor_weights import executor_weights
from airflow_provider_zimage.jobs.generation import (
    NsfwPolicy,
    TaskInstanceRef,
    arguments_digest,
)
from airflow_provider_zimage.jobs.ledger import job_fingerprint
from airflow_provider_zimage.jobs.openai_images import (
    MAX_ENGINE_CONCURRENCY,
    EngineItem,
    EngineJob,
    engine_fingerprint,
)
from airflow_provider_zimage.openai_images.wire import served_models
from airflow_provider_zimage.runware.models import estimate_cost
from airflow_provider_zimage.storage.artifacts import ArtifactStore, as_path, default_output_path, read_json
from airflow_provider_zimage.triggers.batch import ZImageBatchTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

# Seconds a batch always waits on the worker before it may defer: a batch done by then never defers.
BASE_DEFER_AFTER_S = 5.0


def default_defer_after() -> float:
    """A batch's in-process wait when `defer_after` is not given: 5 s plus `[zimage]
    deferral_settle_seconds` (15 s at the defaults).

    A deferred trigger holds answers that come within that window of the deferral (Airflow's deferral
    race; nothing a trigger can read says the race is over), so a batch deferring at 5 s whose answers
    come at 12 s resumes at 15 s at the earliest, plus a task start. Waiting the window out on the
    worker stores them as they come; a batch that defers after it, and whose answers come after the
    window, is held by nothing. The price: one task instance keeps its worker up to 10 s longer.
    """
    return BASE_DEFER_AFTER_S + deferral_settle_seconds()


def read_manifest_entries(manifest_uri: str) -> list[dict[str, Any]]:
    """The image entries of a batch manifest (the XCom carries only counts and this URI)."""
    manifest = read_json(as_path(manifest_uri))
    if not isinstance(manifest, dict):
        raise ValueError(f"no batch manifest at {manifest_uri}")
    return list(manifest.get("images") or [])


class ZImageBatchGenerateOperator(BaseOperator):
    """Generate one image request per dict of `requests`; returns a small summary with the manifest URI.

    :param requests: list of dicts keyed like `ZImageGenerateOperator`'s arguments (`prompt`, `seed`,
        `width`, ...). Templated; an XComArg works (an upstream task that turns rows into requests).
    :param defaults: any request argument given on the operator (`model="z-image"`, `width=512`) is the
        default for every request.
    :param chunk_size: tasks per `imageInference` POST.
    :param max_in_flight: submitted and unfinished tasks at most; more are sent as earlier ones finish.
    :param max_cost_usd: refuse the whole batch, before any POST, when the summed estimate exceeds it.
    :param fail_on_partial_error: after storing everything else, fail (retryably) listing the requests
        Runware failed; a retry resubmits only those, under a new generation.
    :param download_concurrency: images fetched and stored at once.
    :param defer_after: with deferrable=True, the batch defers once this many seconds pass without a
        new stored answer (counted from the start until the first); None (default): 5 s plus `[zimage]
        deferral_settle_seconds` (`default_defer_after`).
    :param poll_interval: first wait between batched getResponse polls (growing by 1.5x up to
        `max_poll_interval`); None: 1 s on Runware, 0.1 s on a zimage-executor (the connection's backend).
    :param reuse: "task" reuses what this task instance stored before; "content" also copies a seeded
        request's image stored before by any run, DAG or task under the same output_path (cost 0,
        `reused_from`); see `content_index`.
    :param delivery: "polling" (batched getResponse) or "webhook": Runware POSTs each task's results to
        the webhook plugin (connection extras `webhook_base_url` and `webhook_secret`, as for
        `ZImageGenerateOperator`).
    :param webhook_grace_period: with webhooks, seconds after a task's submission before getResponse
        polling starts for it as well.
    :param webhook_check_interval: with webhooks, seconds between two looks at the inbox (one listing
        for the whole batch each).
    """

    template_fields: Sequence[str] = ("requests", "output_path", "zimage_conn_id", "model")
    template_fields_renderers = {"requests": "json"}
    ui_color = "#e8d1ff"

    def __init__(
        self,
        *,
        requests: Any,
        model: str = "runware:z-image@turbo",
        zimage_conn_id: str = ZImageHook.default_conn_name,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        output_path: str | None = None,
        max_cost_usd: float | None = None,
        on_nsfw: NsfwPolicy = "fail",
        force: bool = False,
        timeout: float = 3600.0,
        poll_interval: float | None = None,
        max_poll_interval: float = 10.0,
        defer_after: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_in_flight: int = 1000,
        fail_on_partial_error: bool = True,
        download_concurrency: int = 8,
        reuse: Literal["task", "content"] = "task",
        delivery: Delivery = "polling",
        webhook_grace_period: float = 60.0,
        webhook_check_interval: float = 1.0,
        **kwargs: Any,
    ) -> None:
        defaults = {k: kwargs.pop(k) for k in list(kwargs) if k in REQUEST_ARGUMENTS}
        super().__init__(**kwargs)
        self.requests = requests
        self.model = model
        self.defaults = defaults
        self.zimage_conn_id = zimage_conn_id
        self.deferrable = deferrable
        self.output_path = output_path
        self.max_cost_usd = max_cost_usd
        if on_nsfw not in ("fail", "skip", "keep"):
            raise ValueError(f"on_nsfw must be 'fail', 'skip' or 'keep' (got {on_nsfw!r})")
        self.on_nsfw = on_nsfw
        self.force = force
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        if defer_after is not None and not defer_after >= 0:
            raise ValueError(f"defer_after must be >= 0 seconds or None (got {defer_after})")
        self.defer_after = defer_after
        if not 1 <= chunk_size <= 1000:
            raise ValueError(f"chunk_size must be between 1 and 1000 (got {chunk_size})")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 (got {max_in_flight})")
        if download_concurrency < 1:
            raise ValueError(f"download_concurrency must be >= 1 (got {download_concurrency})")
        self.chunk_size = chunk_size
        self.max_in_flight = max_in_flight
        self.fail_on_partial_error = fail_on_partial_error
        self.download_concurrency = download_concurrency
        if reuse not in ("task", "content"):
            raise ValueError(f"reuse must be 'task' or 'content' (got {reuse!r})")
        self.reuse = reuse
        check_delivery(delivery, webhook_grace_period, webhook_check_interval)
        self.delivery = delivery
        self.webhook_grace_period = webhook_grace_period
        self.webhook_check_interval = webhook_check_interval
        # Each row as the DAG wrote it, before Airflow renders templates into it: a retry tells a row
        # whose template renders differently (same digest) from an edited one. An XComArg has one
        # digest for every row (the rows come from upstream).
        common = {"defaults": defaults, "model": model, "conn": zimage_conn_id}
        self._zimage_arguments: list[str] | str = (
            [arguments_digest({**common, "row": row}) for row in requests]
            if isinstance(requests, list)
            else arguments_digest({**common, "requests": requests})
        )

    def _row_arguments(self, index: int) -> str | None:
        digests = getattr(self, "_zimage_arguments", None)
        if isinstance(digests, list):
            return digests[index] if index < len(digests) else None
        return digests

    # -- requests -----------------------------------------------------------------------------------

    def build_requests(self) -> list[Prepared]:
        """Every request validated before anything is sent; an error names its index and parameter."""
        requests = self.requests
        if not isinstance(requests, Sequence) or isinstance(requests, (str, bytes)) or not requests:
            raise AirflowFailException(
                f"requests must be a non-empty list of dicts (got {type(requests).__name__})"
            )
        prepared = []
        secrets = row_secrets(self.zimage_conn_id)
        # On an executor the weights it serves are part of each picture: asked once for the whole batch.
        weights = executor_weights(self.zimage_conn_id) if self._connection_backend() == "executor" else None
        for index, item in enumerate(requests):
            if not isinstance(item, dict):
                raise AirflowFailException(f"requests[{index}]: must be a dict (got {type(item).__name__})")
            unknown = sorted(set(item) - set(REQUEST_ARGUMENTS))
            if unknown:
                raise AirflowFailException(
                    f"requests[{index}]: unknown argument(s) {unknown}; "
                    f"allowed: {', '.join(REQUEST_ARGUMENTS)}"
                )
            if "upload_endpoint" in item or "upload_endpoint" in self.defaults:
                raise AirflowFailException(
                    f"requests[{index}].upload_endpoint: not supported by the batch operator"
                )
            # includeCost on, as ZImageGenerateOperator's default: without it Runware reports no cost and
            # the manifest, the XCom's total_cost and the spend page would say a paid batch cost $0.
            args = {"model": self.model, "include_cost": True, **self.defaults, **item}
            try:
                request = build_image_request(args, secrets)
            except ZImageValidationError as exc:
                params = exc.parameters
                where = f"requests[{index}].{params[0]}" if params else f"requests[{index}]"
                raise AirflowFailException(f"{where}: {exc}") from None
            arguments = self._row_arguments(index)
            if weights is None:
                fp = job_fingerprint(request.fingerprint(), backend="runware", origin=self.zimage_conn_id)
                prepared.append(Prepared(index, request, fp, arguments, self.zimage_conn_id))
                continue
            # As ZImageGenerateOperator's: the row as written counts as the same row only with the same
            # weights, so a retry after a swap does not keep the images the old weights made.
            origin = weights.origin(request, where=f"requests[{index}].")
            fp = job_fingerprint(request.fingerprint(), backend="executor", origin=origin)
            arguments = arguments and job_fingerprint(arguments, backend="executor", origin=origin)
            prepared.append(Prepared(index, request, fp, arguments, origin, backend="executor"))
        return prepared

    # -- execution ----------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        return self._run(context, fresh=True)

    def execute_complete(
        self, context: Context, event: dict[str, Any], rendering_warned: bool = False
    ) -> Any:
        """Resume after the trigger; the event only says what finished: the worker reads those again
        (from the webhook inbox, or with a getResponse, which is free)."""
        if not isinstance(event, dict) or "finished" not in event:
            raise AirflowException(f"malformed event from ZImageBatchTrigger: {event!r}")
        if event.get("error"):
            self.log.warning("The batch trigger stopped polling: %s", event["error"])
        return self._run(context, fresh=False, rendering_warned=rendering_warned)

    def _run(self, context: Context, *, fresh: bool, rendering_warned: bool = False) -> Any:
        prepared = self.build_requests()
        if self._connection_backend() == "openai_images":
            return self._run_openai_images(context, prepared)
        estimate = sum(estimate_cost(p.request) for p in prepared)
        self.log.info("Batch of %d request(s); estimated cost at most $%.4f", len(prepared), estimate)
        if self.max_cost_usd is not None and estimate > self.max_cost_usd:
            raise AirflowFailException(
                f"max_cost_usd: the estimated cost ${estimate:.4f} of {len(prepared)} requests exceeds "
                f"the limit ${self.max_cost_usd:.4f}"
            )
        ref = TaskInstanceRef.from_context(context)
        store = ArtifactStore(self.output_path or default_output_path(), image_log_level=logging.DEBUG)
        directory = store.task_dir(ref.dag_id, ref.run_id, ref.task_id, ref.map_index)
        ledgers = BatchLedgerStore(directory)
        ledger = ledgers.load(
            dag_id=ref.dag_id, task_id=ref.task_id, run_id=ref.run_id, map_index=ref.map_index
        )
        job = BatchJob(
            self._settings(),
            prepared,
            ledger,
            ledgers,
            store,
            directory,
            hook=ZImageHook(self.zimage_conn_id),
            log=self.log,
            fresh=fresh,
            rendering_warned=rendering_warned,
        )
        outcome = job.run()
        if isinstance(outcome, Defer):
            self.defer(
                trigger=ZImageBatchTrigger(**outcome.trigger_kwargs),
                method_name="execute_complete",
                kwargs={"rendering_warned": True} if outcome.rendering_warned else None,
                timeout=timedelta(seconds=outcome.timeout()),
            )
        return outcome

    def _run_openai_images(self, context: Context, prepared: list[Prepared]) -> dict[str, Any]:
        """The batch on an OpenAI images server: every request refused or planned before the first call,
        then `max_in_flight` calls at a time (at most MAX_ENGINE_CONCURRENCY) from this worker; cost 0."""
        settings = ZImageHook(self.zimage_conn_id).settings
        try:
            served = served_models(settings.served_model)
        except ZImageValidationError as exc:
            raise AirflowFailException(str(exc)) from None
        ref = TaskInstanceRef.from_context(context)
        store = ArtifactStore(self.output_path or default_output_path(), image_log_level=logging.DEBUG)
        engine = EngineJob(
            ref=ref,
            store=store,
            directory=store.task_dir(ref.dag_id, ref.run_id, ref.task_id, ref.map_index),
            served=served,
            max_in_flight=min(self.max_in_flight, MAX_ENGINE_CONCURRENCY),
            log=self.log,
            force=self.force,
            reuse_content=self.reuse == "content",
        )
        items = [
            EngineItem(p.index, p.request, engine_fingerprint(p.request, self.zimage_conn_id, served))
            for p in prepared
        ]
        try:
            engine.plan(items, rows=True)
        except ZImageValidationError as exc:
            raise AirflowFailException(str(exc)) from None
        with OpenAIImagesHook(self.zimage_conn_id) as hook:
            return engine.run_batch(items, hook, fail_on_partial_error=self.fail_on_partial_error)

    def _connection_backend(self) -> str:
        try:
            return ZImageHook(self.zimage_conn_id).settings.backend
        except Exception:  # no connection: the Runware path says so with its own words
            return "runware"

    def _settings(self) -> BatchSettings:
        """The job's settings from the operator's arguments; a webhook misconfiguration is refused here,
        before any POST."""
        return BatchSettings(
            conn_id=self.zimage_conn_id,
            timeout=self.timeout,
            chunk_size=self.chunk_size,
            max_in_flight=self.max_in_flight,
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            deferrable=self.deferrable,
            defer_after=default_defer_after() if self.defer_after is None else self.defer_after,
            download_concurrency=self.download_concurrency,
            reuse=self.reuse,
            force=self.force,
            on_nsfw=self.on_nsfw,
            fail_on_partial_error=self.fail_on_partial_error,
            delivery=self._delivery(),
            webhook_grace_period=self.webhook_grace_period,
            webhook_check_interval=self.webhook_check_interval,
        )

    def _delivery(self) -> DeliveryFields:
        """With delivery="webhook", the base URL and secret, checked before any POST; the secret is
        masked in task logs."""
        if self.delivery != "webhook":
            return DeliveryFields(conn_id=self.zimage_conn_id, lifetime=self.timeout)
        from airflow.sdk.log import mask_secret

        try:
            settings = ZImageHook(self.zimage_conn_id).settings
        except Exception as exc:  # AirflowNotFoundException and friends, without importing them
            raise AirflowFailException(f"connection {self.zimage_conn_id!r} is not usable: {exc}") from None
        base_url, secret = webhook_delivery_settings(settings, self.zimage_conn_id)
        mask_secret(secret)
        return DeliveryFields(
            conn_id=self.zimage_conn_id,
            lifetime=self.timeout,
            webhook_base_url=base_url,
            webhook_secret=secret,
        )
