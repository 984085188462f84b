"""`ZImageBatchGenerateOperator`: thousands of image requests in one task instance.

Mapping one task instance per image makes Airflow the bottleneck (a worker process, a deferral and a
scheduler round per image). This operator validates every request first, submits them in chunks (many
tasks per POST) with a bound on tasks in flight, waits for all of them with batched `getResponse`
(in-process, or in ONE `ZImageBatchTrigger`), stores the images concurrently and writes one manifest.

With `delivery="webhook"` every task of the batch carries its own webhook URL (the per-task token of
`webhooks.tokens`); the wait, in-process or in the trigger, looks at the webhook inbox for the whole
batch in one listing and polls `getResponse` only for tasks past the grace period, so a lost webhook
costs latency, never an image. After a deferral the worker reads the results from the inbox too.

Orchestration only: requests are built by `operators.generate.build_image_request`, answers read by
`outcomes`, the per-request ledger is `batch_state`, bytes go through `ArtifactStore`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import BaseOperator

from airflow_provider_zimage import content_index, protocol
from airflow_provider_zimage.batch_state import BatchEntry, BatchLedger, BatchLedgerStore
from airflow_provider_zimage.compat import AirflowException, AirflowFailException, conf
from airflow_provider_zimage.config import deferral_settle_seconds
from airflow_provider_zimage.exceptions import (
    ZImageAuthError,
    ZImageError,
    ZImagePermanentError,
    ZImageTaskFailed,
    ZImageValidationError,
)
from airflow_provider_zimage.generation import (
    MANIFEST_VERSION,
    NsfwPolicy,
    TaskInstanceRef,
    apply_nsfw_policy,
    arguments_digest,
    manifest_entry,
    old_job_fingerprints,
    parameter_digests,
    request_differences,
    warn_rendered_differently,
)
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.inbox import BatchInboxWatch, default_inbox_path
from airflow_provider_zimage.models import ImageInferenceRequest, estimate_cost
from airflow_provider_zimage.operators.generate import (
    REQUEST_ARGUMENTS,
    Delivery,
    build_image_request,
    check_delivery,
    known_secrets,
    webhook_delivery_settings,
)
from airflow_provider_zimage.outcomes import MAX_CONSECUTIVE_ERRORS, Action, Outcome, TaskWait, for_error
from airflow_provider_zimage.protocol import RunwareResponse
from airflow_provider_zimage.redaction import redact_urls
from airflow_provider_zimage.state import job_fingerprint
from airflow_provider_zimage.storage import ArtifactStore, as_path, default_output_path, read_json, verify
from airflow_provider_zimage.triggers.batch import POLL_BATCH, ZImageBatchTrigger, split_by_task
from airflow_provider_zimage.webhooks.tokens import token_expiry, webhook_url

if TYPE_CHECKING:
    from airflow.sdk import Context

# Runware takes many tasks per POST; 100 keeps one POST well under its request-size limits.
DEFAULT_CHUNK_SIZE = 100


@dataclass
class _Prepared:
    index: int
    request: ImageInferenceRequest
    fingerprint: str
    # What earlier releases called the same picture: adopted by the ledger; only the sure ones are
    # looked up in the content index (see `OldFingerprint`).
    legacy: tuple[str, ...] = ()
    content_legacy: tuple[str, ...] = ()
    # The row as the DAG wrote it, before rendering (None when unknown).
    arguments: str | None = None

    @property
    def expected(self) -> int:
        return self.request.number_results or 1


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
    :param defer_after: with deferrable=True, seconds of in-process polling before deferring.
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
        defer_after: float = 5.0,
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
        if defer_after < 0:
            raise ValueError(f"defer_after must be >= 0 seconds (got {defer_after})")
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

    def build_requests(self) -> list[_Prepared]:
        """Every request validated before anything is sent; an error names its index and parameter."""
        requests = self.requests
        if not isinstance(requests, Sequence) or isinstance(requests, (str, bytes)) or not requests:
            raise AirflowFailException(
                f"requests must be a non-empty list of dicts (got {type(requests).__name__})"
            )
        prepared = []
        secrets = known_secrets(self.zimage_conn_id)
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
            fp = job_fingerprint(request.fingerprint(), backend="runware", origin=self.zimage_conn_id)
            old = old_job_fingerprints(request, backend="runware", origin=self.zimage_conn_id)
            legacy = tuple(f for f, trust in old.items() if trust != "recorded")
            content_legacy = tuple(f for f, trust in old.items() if trust == "same")
            prepared.append(_Prepared(index, request, fp, legacy, content_legacy, self._row_arguments(index)))
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
        webhook = self._webhook() if self.delivery == "webhook" else None
        run = _BatchRun(self, prepared, ledger, ledgers, store, directory, fresh=fresh, webhook=webhook)
        run.rendering_warned = rendering_warned
        return run.go()

    def _webhook(self) -> tuple[str, str]:
        """The base URL and secret, checked before any POST; the secret is masked in task logs."""
        from airflow.sdk.log import mask_secret

        try:
            settings = ZImageHook(self.zimage_conn_id).settings
        except Exception as exc:  # AirflowNotFoundException and friends, without importing them
            raise AirflowFailException(f"connection {self.zimage_conn_id!r} is not usable: {exc}") from None
        base_url, secret = webhook_delivery_settings(settings, self.zimage_conn_id)
        mask_secret(secret)
        return base_url, secret

    def _send_chunk(self, hook: ZImageHook, requests: list[ImageInferenceRequest]) -> object:
        """One POST with many tasks (a seam for tests that kill the worker between chunks)."""
        return hook.submit(requests)


class _BatchRun:
    """One try (or one resumed deferral) of a batch: reattach, submit, wait, store, report."""

    def __init__(
        self,
        op: ZImageBatchGenerateOperator,
        prepared: list[_Prepared],
        ledger: BatchLedger,
        ledgers: BatchLedgerStore,
        store: ArtifactStore,
        directory: Any,
        *,
        fresh: bool,
        webhook: tuple[str, str] | None = None,
    ) -> None:
        self.op = op
        self.log = op.log
        self.prepared = {p.index: p for p in prepared}
        self.ledger = ledger
        self.ledgers = ledgers
        self.store = store
        self.directory = directory
        self.fresh = fresh
        self.started = time.monotonic()
        self.done_here = 0
        self.store_errors: dict[int, str] = {}
        self.reused = 0
        self._local = threading.local()
        self._hooks: list[ZImageHook] = []
        # delivery="webhook": (public base URL, secret) and the inbox the API server writes to.
        self.webhook = webhook
        self.inbox = BatchInboxWatch(None, op.log, conn_id=op.zimage_conn_id) if webhook is not None else None
        # Set once this try said which rows render differently from what was paid for.
        self.rendering_warned = False

    # -- what each request needs ---------------------------------------------------------------------

    def _plan(self) -> tuple[list[BatchEntry], dict[str, BatchEntry]]:
        unsent: list[BatchEntry] = []
        waiting: dict[str, BatchEntry] = {}
        # Requests removed from the list (a shorter re-run) are forgotten, not stored.
        for index in list(self.ledger.entries):
            if index not in self.prepared:
                del self.ledger.entries[index]
        rendered_differently: dict[int, list[str]] = {}
        for p in self.prepared.values():
            entry = self.ledger.entry_for(
                p.index,
                p.fingerprint,
                p.expected,
                fresh=self.fresh,
                legacy=p.legacy,
                arguments=p.arguments,
                keep_stored=not self.op.force,
            )
            if entry.fingerprint != p.fingerprint:
                # The ledger is the truth: this entry's request is what was paid for (or sent).
                rendered_differently[p.index] = (
                    request_differences(parameter_digests(p.request), entry.params) if entry.params else []
                )
            if self.fresh:
                entry.ended_try = False
            if entry.status == "stored":
                # force=True regenerates once per try, not again when a deferral resumes.
                forced = self.op.force and self.fresh
                if not forced and entry.images and all(verify(i) for i in entry.images):
                    self.reused += self.fresh
                    continue
                self.log.info("requests[%d]: stored images missing or force=True: generating again", p.index)
                entry = self.ledger.regenerate(entry)
            if entry.status == "intent" and self._content_reuse(p, entry):
                continue
            self.ledger.entries[p.index] = entry
            if entry.status == "failed" or entry.ended_try or entry.status == "stored":
                continue
            if entry.status == "submitted":
                waiting[entry.task_uuid] = entry
            else:
                unsent.append(entry)
        if rendered_differently and not self.rendering_warned:
            self.rendering_warned = True
            rows = [f"requests[{i}]" for i in sorted(rendered_differently)]
            names = sorted({n for found in rendered_differently.values() for n in found})
            more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
            warn_rendered_differently(", ".join(rows[:10]) + more, names)
        return unsent, waiting

    def _content_reuse(self, p: _Prepared, entry: BatchEntry) -> bool:
        """A seeded picture stored before under this output_path: copied here, nothing sent or paid."""
        if self.op.reuse != "content" or p.request.seed is None or (self.op.force and self.fresh):
            return False
        copies = content_index.reuse(self.store, p.fingerprint, self.directory, p.content_legacy)
        if copies is None:
            return False
        entry.images = [{**image, "index": p.index} for image in copies]
        self.ledger.record(entry, "stored")
        self.reused += 1
        return True

    def go(self) -> Any:
        unsent, waiting = self._plan()
        self.ledgers.save(self.ledger)
        if waiting:
            self.log.info("Reattaching to %d submitted task(s) without paying again", len(waiting))
        hook = ZImageHook(self.op.zimage_conn_id)
        poll_interval = protocol.first_poll_interval(self.op.poll_interval, hook.settings.backend)
        defer_at = time.time() + self.op.defer_after
        delays = protocol.poll_delays(poll_interval, self.op.max_poll_interval)
        next_poll = 0.0
        errors_in_a_row = 0
        with hook, ThreadPoolExecutor(self.op.download_concurrency) as pool:
            while unsent or waiting:
                while unsent and len(waiting) < self.op.max_in_flight:
                    room = min(self.op.chunk_size, self.op.max_in_flight - len(waiting))
                    chunk, unsent = unsent[:room], unsent[room:]
                    self._submit(hook, chunk)
                    waiting.update((e.task_uuid, e) for e in chunk)
                if self.inbox is not None and self._settle(self.inbox.check(list(waiting)), waiting, pool):
                    self._progress()
                due = self._due(waiting) if time.time() >= next_poll else []
                if due:
                    try:
                        answer = self._poll(hook, due)
                    except Exception as exc:
                        errors_in_a_row += 1
                        outcome = for_error(exc)
                        if isinstance(exc, ZImageAuthError) and errors_in_a_row == 1:
                            hook.reload()
                            continue
                        if outcome.action is Action.FAIL:
                            raise AirflowFailException(outcome.message) from None
                        if errors_in_a_row >= MAX_CONSECUTIVE_ERRORS:
                            raise AirflowException(outcome.message) from None
                        self.log.warning("batched getResponse failed (%d in a row): %s", errors_in_a_row, exc)
                    else:
                        errors_in_a_row = 0
                        self._settle(answer, waiting, pool)
                        self._progress()
                    next_poll = time.time() + next(delays)
                if not waiting and not unsent:
                    break
                self._timeouts(waiting)
                if not waiting and not unsent:
                    break
                if self.op.deferrable and time.time() >= defer_at and waiting:
                    self._defer(waiting, poll_interval)
                pause = next_poll - time.time()
                if self.inbox is not None:
                    pause = min(pause, self.op.webhook_check_interval)
                time.sleep(max(0.0, pause))
            for download_hook in self._hooks:
                download_hook.close()
        return self._finish()

    def _due(self, waiting: dict[str, BatchEntry]) -> list[str]:
        """The tasks to ask getResponse about: all of them, or with webhooks those past the grace period."""
        if self.webhook is None:
            return list(waiting)
        cutoff = time.time() - self.op.webhook_grace_period
        return [u for u, e in waiting.items() if (e.submitted_at or 0.0) <= cutoff]

    # -- steps ---------------------------------------------------------------------------------------

    def _submit(self, hook: ZImageHook, chunk: list[BatchEntry]) -> None:
        """Intent recorded before the POST and submitted after: a crash in between re-sends the same
        taskUUIDs, which Runware answers with `conflictTaskUUID` (no second charge)."""
        for entry in chunk:
            if entry.arguments is None and not entry.params:
                p = self.prepared[entry.index]
                entry.model, entry.params, entry.arguments = (
                    p.request.model,
                    parameter_digests(p.request),
                    p.arguments,
                )
            self.ledger.record(entry, "intent")
        self.ledgers.save(self.ledger)
        requests = [
            self.prepared[e.index].request.model_copy(update=self._delivery_fields(e.task_uuid))
            for e in chunk
        ]
        if self.webhook is not None:
            self.log.info(
                "Runware will POST the results to %s/zimage/webhooks/<taskUUID>", self.webhook[0].rstrip("/")
            )
        try:
            self.op._send_chunk(hook, requests)
        except ZImagePermanentError as exc:
            # Webhook URLs carry per-task tokens in their query: an echoed request must not show them.
            raise AirflowFailException(
                f"Runware refused a chunk of requests {chunk[0].index}..{chunk[-1].index}: "
                f"{redact_urls(str(exc))}"
            ) from None
        except ZImageError as exc:
            raise AirflowException(
                f"submitting to Runware failed, a retry reattaches: {redact_urls(str(exc))}"
            ) from None
        for entry in chunk:
            self.ledger.record(entry, "submitted")
        self.ledgers.save(self.ledger)
        self.log.info("Submitted %d task(s) (requests %d..%d)", len(chunk), chunk[0].index, chunk[-1].index)

    def _delivery_fields(self, task_uuid: str) -> dict[str, Any]:
        """Added inside the send, from the taskUUID the ledger chose: a re-sent chunk carries the same
        webhook URLs, and the URLs (credentials) are never part of the fingerprint or the ledger."""
        update: dict[str, Any] = {"task_uuid": task_uuid}
        if self.webhook is not None:
            base_url, secret = self.webhook
            expires = token_expiry(self.op.timeout)
            update["webhook_url"] = webhook_url(
                base_url, task_uuid, secret, self.op.zimage_conn_id, expires=expires
            )
        return update

    def _poll(self, hook: ZImageHook, uuids: list[str]) -> RunwareResponse:
        merged = RunwareResponse()
        for start in range(0, len(uuids), POLL_BATCH):
            chunk = uuids[start : start + POLL_BATCH]
            try:
                answer = hook.get_responses(chunk)
            except ZImagePermanentError as exc:
                if len(chunk) == 1 or isinstance(exc, ZImageAuthError):
                    raise
                # One bad task can make Runware refuse the whole poll: ask for each on its own.
                answer = RunwareResponse()
                for uuid in chunk:
                    one = hook.get_responses([uuid])
                    answer.results += one.results
                    answer.errors += one.errors
            merged.results += answer.results
            merged.errors += answer.errors
        return merged

    def _settle(
        self, answer: RunwareResponse, waiting: dict[str, BatchEntry], pool: ThreadPoolExecutor
    ) -> int:
        """Store or end every waiting entry whose answer is final; returns how many were."""
        if not answer.results and not answer.errors:
            return 0
        settled = 0
        parts = split_by_task(answer, list(waiting))
        to_store: list[tuple[BatchEntry, TaskWait]] = []
        for uuid, entry in list(waiting.items()):
            wait = TaskWait(uuid, entry.expected_results)
            outcome = wait.answer(parts[uuid])
            if outcome.action is Action.WAIT:
                continue
            del waiting[uuid]
            settled += 1
            if outcome.action is Action.STORE:
                to_store.append((entry, wait))
            else:
                self._end(entry, outcome)
        futures = [(entry, pool.submit(self._store, entry, wait)) for entry, wait in to_store]
        for entry, future in futures:
            try:
                entry.images = future.result()
                self.ledger.record(entry, "stored")
                self.done_here += 1
            except ZImageTaskFailed as exc:  # NSFW with on_nsfw="fail": Runware made it, we refuse it
                self.ledger.record(entry, "failed", str(exc))
            except Exception as exc:
                # Paid and still at Runware: the ledger keeps it submitted, a retry stores it for free.
                self.store_errors[entry.index] = f"{type(exc).__name__}: {exc}"
        self.ledgers.save(self.ledger)
        return settled

    def _end(self, entry: BatchEntry, outcome: Outcome) -> None:
        """Only REGENERATE moves the ledger (see `outcomes`); anything else ends this try for the entry."""
        if outcome.new_generation:
            self.ledger.record(entry, "failed", outcome.message)
        else:
            entry.ended_try = True
            entry.reason = outcome.message
        # A delivered error must not end the next try too (as `ZImageGenerateOperator` clears it).
        self._discard_inbox(entry)

    def _discard_inbox(self, entry: BatchEntry) -> None:
        if self.inbox is None:
            return
        try:
            self.inbox.inbox.discard(entry.task_uuid)
        except Exception as exc:  # leftovers are a few small files, not a reason to fail a paid image
            self.log.warning("Could not clear the webhook inbox of requests[%d]: %s", entry.index, exc)

    def _store(self, entry: BatchEntry, wait: TaskWait) -> list[dict[str, Any]]:
        request = self.prepared[entry.index].request
        model = entry.model or request.model  # the model paid for, whatever the row renders now
        images = []
        hook = getattr(self._local, "hook", None)
        if hook is None:  # one client per download thread, reused for every image it fetches
            hook = self._local.hook = ZImageHook(self.op.zimage_conn_id)
            self._hooks.append(hook)
        for result in apply_nsfw_policy(wait.status.results, self.op.on_nsfw):
            artifact = self.store.write_image(self.directory, str(result.image_uuid), hook.download(result))
            images.append({**manifest_entry(artifact.to_dict(), result, model=model), "index": entry.index})
        if self.op.reuse == "content" and request.seed is not None:
            # In the download thread, after the images were verified and written: thousands of index
            # files are written in parallel, not one by one between two polls.
            try:
                content_index.record(
                    self.store,
                    entry.fingerprint,
                    [{k: v for k, v in i.items() if k != "index"} for i in images],
                )
            except ZImageError as exc:  # a lost hint costs a future payment, not this image
                self.log.warning("Could not index requests[%d] for reuse: %s", entry.index, exc)
        self._discard_inbox(entry)
        return images

    def _timeouts(self, waiting: dict[str, BatchEntry]) -> None:
        now = time.time()
        late = [
            uuid
            for uuid, entry in waiting.items()
            if entry.submitted_at is not None and now > entry.submitted_at + self.op.timeout
        ]
        for uuid in late:
            entry = waiting.pop(uuid)
            entry.ended_try = True
            entry.reason = f"unfinished after {self.op.timeout:g}s; a retry reattaches to the same task"
        if late:
            self.ledgers.save(self.ledger)

    def _progress(self) -> None:
        entries = self.ledger.entries.values()
        done = sum(1 for e in entries if e.status == "stored")
        failed = sum(1 for e in entries if e.status == "failed" or e.ended_try)
        elapsed = max(1e-6, time.monotonic() - self.started)
        cost = sum(i.get("cost") or 0.0 for e in entries for i in e.images)
        self.log.info(
            "Batch progress: %d/%d stored, %d failed, %.1f images/min, cost so far $%.4f",
            done,
            len(self.prepared),
            failed,
            self.done_here * 60 / elapsed,
            cost,
        )

    def _defer(self, waiting: dict[str, BatchEntry], poll_interval: float) -> None:
        now = time.time()
        deadline = min((e.submitted_at or now) for e in waiting.values()) + self.op.timeout
        latest = max((e.submitted_at or now) for e in waiting.values())
        self.log.info("%d task(s) not finished: deferring to one ZImageBatchTrigger", len(waiting))
        webhook = self.webhook is not None
        self.op.defer(
            trigger=ZImageBatchTrigger(
                task_uuids={u: e.expected_results for u, e in waiting.items()},
                zimage_conn_id=self.op.zimage_conn_id,
                deadline=deadline,
                poll_interval=poll_interval,
                max_poll_interval=self.op.max_poll_interval,
                webhook_inbox=str(default_inbox_path()) if webhook else None,
                # One grace period for the batch, from its last submission: a few chunks' spread of
                # latency for the earliest tasks, never a poll before any task's own grace is over.
                poll_after=latest + self.op.webhook_grace_period if webhook else 0.0,
                inbox_interval=self.op.webhook_check_interval,
                not_before=now + deferral_settle_seconds(),
            ),
            method_name="execute_complete",
            kwargs={"rendering_warned": True} if self.rendering_warned else None,
            timeout=timedelta(seconds=max(0.0, deadline - time.time()) + 60),
        )

    def _finish(self) -> dict[str, Any]:
        entries = [self.ledger.entries[i] for i in sorted(self.prepared)]
        images = [image for e in entries if e.status == "stored" for image in e.images]
        failed = [
            {"index": e.index, "task_uuid": e.task_uuid, "reason": e.reason or "failed"}
            for e in entries
            if e.status == "failed" or e.ended_try
        ]
        failed += [
            {"index": i, "task_uuid": self.ledger.entries[i].task_uuid, "reason": self.store_errors[i]}
            for i in sorted(self.store_errors)
        ]
        total = round(sum(i.get("cost") or 0.0 for i in images), 6)
        manifest = {
            "version": MANIFEST_VERSION,
            "kind": "batch",
            "dag_id": self.ledger.dag_id,
            "task_id": self.ledger.task_id,
            "run_id": self.ledger.run_id,
            "map_index": self.ledger.map_index,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "requests": len(entries),
            "images": images,
            "failed": failed,
            "total_cost": total,
        }
        path = self.store.write_manifest(self.directory, manifest)
        self.log.info(
            "Batch done: %d image(s) from %d request(s), %d failed, %d reused; total cost $%.4f",
            len(images),
            len(entries),
            len(failed),
            self.reused,
            total,
        )
        if self.store_errors:
            raise AirflowException(
                f"storing the images of requests {sorted(self.store_errors)} failed; they are paid for and "
                "still at Runware: a retry reattaches and stores them without paying again"
            )
        if failed and self.op.fail_on_partial_error:
            listing = "; ".join(f"requests[{f['index']}]: {f['reason']}" for f in failed[:20])
            more = f" (and {len(failed) - 20} more)" if len(failed) > 20 else ""
            raise AirflowException(
                f"{len(failed)} of {len(entries)} request(s) failed (every other image is stored in "
                f"{path}); a retry resubmits only these: {listing}{more}"
            )
        return {
            "manifest_uri": str(path),
            "images": len(images),
            "failed": len(failed),
            "reused": self.reused,
            "total_cost": total,
        }
