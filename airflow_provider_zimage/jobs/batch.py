"""The batch job: thousands of image requests in one task instance, submitted, waited for and stored.

`ZImageBatchGenerateOperator` validates the rows, builds a `BatchSettings` from its arguments and hands
both to `BatchJob`; the job submits in chunks (many tasks per POST) with a bound on tasks in flight,
waits with batched `getResponse` (and the webhook inbox with delivery="webhook"), stores the images
concurrently and writes one manifest. It never calls the operator: a deferral is a `Defer` value the
operator turns into `self.defer(...)`.

Orchestration only: answers are read by `outcomes`, the per-request ledger is `batch_state`, bytes go
through `ArtifactStore`, requests are finished by `jobs.delivery` and sent by the hook.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Literal

from airflow_provider_zimage.compat import AirflowException, AirflowFailException
from airflow_provider_zimage.config import deferral_settle_seconds
from airflow_provider_zimage.exceptions import (
    ZImageAuthError,
    ZImageError,
    ZImagePermanentError,
    ZImageTaskFailed,
)
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.jobs import content_index
from airflow_provider_zimage.jobs.batch_ledger import BatchEntry, BatchLedger, BatchLedgerStore
from airflow_provider_zimage.jobs.delivery import DeliveryFields
from airflow_provider_zimage.jobs.generation import (
    MANIFEST_VERSION,
    NsfwPolicy,
    apply_nsfw_policy,
    manifest_entry,
    old_job_fingerprints,
    parameter_digests,
    request_differences,
    warn_rendered_differently,
)
from airflow_provider_zimage.redaction import redact_urls
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.runware.outcomes import (
    MAX_CONSECUTIVE_ERRORS,
    Action,
    Outcome,
    TaskWait,
    for_error,
)
from airflow_provider_zimage.runware.protocol import POLL_BATCH, RunwareResponse, split_by_task
from airflow_provider_zimage.storage.artifacts import ArtifactStore, verify
from airflow_provider_zimage.webhooks.inbox import BatchInboxWatch, default_inbox_path

# Runware takes many tasks per POST; 100 keeps one POST well under its request-size limits.
DEFAULT_CHUNK_SIZE = 100
# Rows one worker copies per task under reuse="content" (still `download_concurrency` tasks at once).
REUSE_RUN = 32


@dataclass(frozen=True)
class BatchSettings:
    """What the batch job needs from the operator's arguments, read once (see the operator's docs)."""

    conn_id: str
    timeout: float = 3600.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_in_flight: int = 1000
    poll_interval: float | None = None
    max_poll_interval: float = 10.0
    deferrable: bool = False
    defer_after: float = 5.0
    download_concurrency: int = 8
    reuse: Literal["task", "content"] = "task"
    force: bool = False
    on_nsfw: NsfwPolicy = "fail"
    fail_on_partial_error: bool = True
    # delivery="webhook": the base URL and secret each task's webhook URL is made from; else empty.
    delivery: DeliveryFields = field(default_factory=DeliveryFields)
    webhook_grace_period: float = 60.0
    webhook_check_interval: float = 1.0

    @property
    def webhook(self) -> bool:
        return self.delivery.webhook_base_url is not None


@dataclass(frozen=True)
class Defer:
    """The job's decision to wait in the triggerer: `ZImageBatchTrigger(**trigger_kwargs)`, resumed by
    `execute_complete` (with `rendering_warned=True` when this try already warned)."""

    trigger_kwargs: dict[str, Any]
    deadline: float
    rendering_warned: bool = False

    def timeout(self) -> float:
        """Seconds Airflow lets the deferral last: the batch's deadline, and a minute for the event."""
        return max(0.0, self.deadline - time.time()) + 60


@dataclass
class Prepared:
    """One validated request of the batch, with what identifies its picture."""

    index: int
    request: ImageInferenceRequest
    fingerprint: str
    # The row as the DAG wrote it, before rendering (None when unknown).
    arguments: str | None = None
    # The connection (on an executor, with the weights it serves), part of the fingerprint.
    origin: str | None = None
    backend: str = "runware"
    # Kept when `request` is let go (see `release`).
    seed: int | None = field(init=False)
    model: str = field(init=False)
    expected: int = field(init=False)

    def __post_init__(self) -> None:
        self.seed, self.model = self.request.seed, self.request.model
        self.expected = self.request.number_results or 1

    def release(self) -> None:
        """Let go of the request once it is sent or its image is stored: a batch then holds requests
        for what is still to send, not for 100,000 rows (a validated request is ~2.4 KB)."""
        self.__dict__.pop("_old", None)
        self.request = None  # type: ignore[assignment]

    @cached_property
    def _old(self) -> dict[str, str]:
        # Computed only when asked (a ledger entry under another fingerprint, an old index file): half
        # the cost of preparing a row, paid 100,000 times for nothing otherwise.
        return old_job_fingerprints(self.request, backend=self.backend, origin=self.origin)

    @property
    def legacy(self) -> tuple[str, ...]:
        """What earlier releases called the same picture: adopted by the ledger (see `OldFingerprint`)."""
        return tuple(f for f, trust in self._old.items() if trust != "recorded")

    @property
    def content_legacy(self) -> tuple[str, ...]:
        """The sure ones of `legacy`, the only ones looked up in the content index."""
        return tuple(f for f, trust in self._old.items() if trust == "same")


class BatchJob:
    """One try (or one resumed deferral) of a batch: reattach, submit, wait, store, report.

    Given everything as values (the operator's `BatchSettings`, the validated requests, the ledger, the
    hook and the task's logger), it never reaches back into the operator: where the operator must act
    (defer to the triggerer), `run` returns a `Defer` that says how.
    """

    def __init__(
        self,
        settings: BatchSettings,
        prepared: list[Prepared],
        ledger: BatchLedger,
        ledgers: BatchLedgerStore,
        store: ArtifactStore,
        directory: Any,
        *,
        hook: ZImageHook,
        log: Any,  # the task's logger (the operator's `self.log`), so progress lines land in its log
        fresh: bool,
        rendering_warned: bool = False,
    ) -> None:
        self.settings = settings
        self.hook = hook
        self.log = log
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
        # Counted as they change, not by walking every entry per progress line (100,000 of them).
        self.stored_count = 0
        self.failed_count = 0
        self.cost = 0.0
        self._local = threading.local()
        self._hooks: list[ZImageHook] = []
        # delivery="webhook": the inbox the API server writes to.
        self.inbox = BatchInboxWatch(None, log, conn_id=settings.conn_id) if settings.webhook else None
        # Set once this try said which rows render differently from what was paid for.
        self.rendering_warned = rendering_warned

    # -- what each request needs ---------------------------------------------------------------------

    def _plan(self) -> tuple[list[BatchEntry], dict[str, BatchEntry]]:
        unsent: list[BatchEntry] = []
        waiting: dict[str, BatchEntry] = {}
        # Requests removed from the list (a shorter re-run) are forgotten, not stored.
        for index in list(self.ledger.entries):
            if index not in self.prepared:
                self.ledger.forget(index)
        candidates: list[tuple[Prepared, BatchEntry]] = []
        rendered_differently: dict[int, list[str]] = {}
        for p in self.prepared.values():
            previous = self.ledger.entries.get(p.index)
            entry = self.ledger.entry_for(
                p.index,
                p.fingerprint,
                p.expected,
                fresh=self.fresh,
                legacy=p.legacy if previous is not None and previous.fingerprint != p.fingerprint else (),
                arguments=p.arguments,
                keep_stored=not self.settings.force,
            )
            if entry.fingerprint != p.fingerprint:
                # The ledger is the truth: this entry's request is what was paid for (or sent).
                rendered_differently[p.index] = (
                    request_differences(parameter_digests(p.request), entry.params) if entry.params else []
                )
            if self.fresh and entry.ended_try:
                entry.ended_try = False
                self.ledger.touch(entry)
            if entry.status == "stored":
                # force=True regenerates once per try, not again when a deferral resumes.
                forced = self.settings.force and self.fresh
                if not forced and entry.images and all(verify(i) for i in entry.images):
                    self.reused += self.fresh
                    continue
                self.log.info("requests[%d]: stored images missing or force=True: generating again", p.index)
                entry = self.ledger.regenerate(entry)
            self.ledger.entries[p.index] = entry
            if entry.status == "intent" and self._content_reusable(p):
                candidates.append((p, entry))
                continue
            if entry.status == "failed" or entry.ended_try or entry.status == "stored":
                continue
            if entry.status == "submitted":
                waiting[entry.task_uuid] = entry
            else:
                unsent.append(entry)
        unsent += self._content_reuse(candidates)
        unsent.sort(key=lambda e: e.index)
        to_send = {e.index for e in unsent}
        for p in self.prepared.values():
            if p.index not in to_send:
                p.release()
        self._count()
        if rendered_differently and not self.rendering_warned:
            self.rendering_warned = True
            rows = [f"requests[{i}]" for i in sorted(rendered_differently)]
            names = sorted({n for found in rendered_differently.values() for n in found})
            more = f" and {len(rows) - 10} more" if len(rows) > 10 else ""
            warn_rendered_differently(", ".join(rows[:10]) + more, names)
        return unsent, waiting

    def _content_reusable(self, p: Prepared) -> bool:
        return (
            self.settings.reuse == "content"
            and p.seed is not None
            and not (self.settings.force and self.fresh)
        )

    def _content_reuse(self, candidates: list[tuple[Prepared, BatchEntry]]) -> list[BatchEntry]:
        """Seeded pictures stored before under this output_path: copied here, nothing sent or paid.

        The index is read once for the whole batch, and the copies (each reads its source to check the
        sha256) run in a pool as downloads do. Returns the entries to generate.
        """
        if not candidates:
            return []
        index = content_index.ContentIndex(self.store)

        def copy(item: tuple[Prepared, BatchEntry]) -> list[dict[str, Any]] | None:
            p, _ = item
            try:
                # Earlier releases' fingerprints can only be in their per-fingerprint files.
                legacy = p.content_legacy if index.files else ()
                return index.reuse(p.fingerprint, self.directory, legacy, durable=False)
            except ZImageError as exc:  # a copy that fails costs a payment, never the batch
                self.log.warning("requests[%d]: could not reuse the indexed image: %s", p.index, exc)
                return None

        def copy_run(run: list[tuple[Prepared, BatchEntry]]) -> list[list[dict[str, Any]] | None]:
            return [copy(item) for item in run]

        # Runs of rows per pool task: a local copy takes ~0.1 ms, about what a future costs.
        runs = [candidates[i : i + REUSE_RUN] for i in range(0, len(candidates), REUSE_RUN)]
        to_generate = []
        with ThreadPoolExecutor(self.settings.download_concurrency) as pool:
            results = (copies for run in pool.map(copy_run, runs) for copies in run)
            for (p, entry), copies in zip(candidates, results, strict=True):
                if copies is None:
                    to_generate.append(entry)
                    continue
                entry.images = [{**image, "index": p.index} for image in copies]
                self.ledger.record(entry, "stored")
                self.reused += 1
        if len(to_generate) < len(candidates):
            # The copies were written without one flush each; made durable here, all at once.
            self.store.flush()
        return to_generate

    def _count(self) -> None:
        """The progress counters, from the ledger once per try (then kept as entries change)."""
        entries = [self.ledger.entries[i] for i in self.prepared if i in self.ledger.entries]
        self.stored_count = sum(1 for e in entries if e.status == "stored")
        self.failed_count = sum(1 for e in entries if e.status == "failed" or e.ended_try)
        self.cost = sum(i.get("cost") or 0.0 for e in entries if e.status == "stored" for i in e.images)

    def run(self) -> dict[str, Any] | Defer:
        """The batch's summary (the XCom), or the decision to defer what is still waiting."""
        unsent, waiting = self._plan()
        self.ledgers.save(self.ledger)
        if waiting:
            self.log.info("Reattaching to %d submitted task(s) without paying again", len(waiting))
        hook = self.hook
        poll_interval = protocol.first_poll_interval(self.settings.poll_interval, hook.settings.backend)
        defer_at = time.time() + self.settings.defer_after
        stored_at_last_look = self.done_here
        delays = protocol.poll_delays(poll_interval, self.settings.max_poll_interval)
        next_poll = 0.0
        errors_in_a_row = 0
        with hook, ThreadPoolExecutor(self.settings.download_concurrency) as pool:
            while unsent or waiting:
                sent = 0
                while sent < len(unsent) and len(waiting) < self.settings.max_in_flight:
                    room = min(self.settings.chunk_size, self.settings.max_in_flight - len(waiting))
                    chunk = unsent[sent : sent + room]
                    sent += len(chunk)
                    self._submit(hook, chunk)
                    waiting.update((e.task_uuid, e) for e in chunk)
                if sent:
                    # Sliced once per window, not once per chunk: 100,000 rows would be copied per POST.
                    unsent = unsent[sent:]
                    # New tasks are polled from the first interval again, not at a timer that grew
                    # while earlier windows were answered.
                    delays = protocol.poll_delays(poll_interval, self.settings.max_poll_interval)
                    next_poll = min(next_poll, time.time() + next(delays)) if next_poll else 0.0
                freed = 0
                if self.inbox is not None:
                    freed = self._settle(self.inbox.check(list(waiting)), waiting, pool)
                    if freed:
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
                        freed += self._settle(answer, waiting, pool)
                        self._progress()
                    next_poll = time.time() + next(delays)
                if not waiting and not unsent:
                    break
                self._timeouts(waiting)
                if not waiting and not unsent:
                    break
                # `defer_after` counts from the last stored answer: a batch still receiving answers is
                # storing, not waiting, and a deferral would hold the next ones in a trigger's window.
                if self.done_here != stored_at_last_look:
                    stored_at_last_look, defer_at = self.done_here, time.time() + self.settings.defer_after
                if self.settings.deferrable and time.time() >= defer_at and waiting:
                    return self._defer(waiting, poll_interval)
                if freed and unsent and len(waiting) < self.settings.max_in_flight:
                    continue  # room was freed: the next window goes out now, not after the poll timer
                interval = self.settings.webhook_check_interval if self.inbox is not None else None
                time.sleep(protocol.next_pause(next_poll, time.time(), inbox_interval=interval))
            for download_hook in self._hooks:
                download_hook.close()
        return self._finish()

    def _due(self, waiting: dict[str, BatchEntry]) -> list[str]:
        """The tasks to ask getResponse about: all of them, or with webhooks those past the grace period."""
        if not self.settings.webhook:
            return list(waiting)
        cutoff = time.time() - self.settings.webhook_grace_period
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
        # The delivery fields are added here, from the taskUUID the ledger chose: a re-sent chunk
        # carries the same webhook URLs, and the URLs (credentials) are never in the ledger.
        delivery = self.settings.delivery
        requests = [
            delivery.finish(
                self.prepared[e.index].request.model_copy(update={"task_uuid": e.task_uuid})
            ).request
            for e in chunk
        ]
        for e in chunk:
            self.prepared[e.index].release()
        if delivery.webhook_base_url is not None:
            self.log.info(
                "Runware will POST the results to %s/zimage/webhooks/<taskUUID>",
                delivery.webhook_base_url.rstrip("/"),
            )
        try:
            self._send_chunk(hook, requests)
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

    def _send_chunk(self, hook: ZImageHook, requests: list[ImageInferenceRequest]) -> object:
        """One POST with many tasks (a seam for tests that kill the worker between chunks)."""
        return hook.submit(requests)

    def _poll(self, hook: ZImageHook, uuids: list[str]) -> RunwareResponse:
        """Batched getResponse for `uuids`.

        A copy kept on purpose of `triggers.batch.apoll_many` (which gathers the one-by-one asks
        concurrently on the event loop): the same splitting, one sync and one async transport.
        """
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
                self.stored_count += 1
                self.cost += sum(i.get("cost") or 0.0 for i in entry.images)
            except ZImageTaskFailed as exc:  # NSFW with on_nsfw="fail": Runware made it, we refuse it
                self.ledger.record(entry, "failed", str(exc))
                self.failed_count += 1
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
            self.ledger.touch(entry)
        self.failed_count += 1
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
        # The model paid for, whatever the row renders now.
        model = entry.model or self.prepared[entry.index].model
        images = []
        hook = getattr(self._local, "hook", None)
        if hook is None:  # one client per download thread, reused for every image it fetches
            hook = self._local.hook = ZImageHook(self.settings.conn_id)
            self._hooks.append(hook)
        for result in apply_nsfw_policy(wait.status.results, self.settings.on_nsfw, hook.settings.backend):
            artifact = self.store.write_image(self.directory, str(result.image_uuid), hook.download(result))
            images.append({**manifest_entry(artifact.to_dict(), result, model=model), "index": entry.index})
        self._discard_inbox(entry)
        return images

    def _timeouts(self, waiting: dict[str, BatchEntry]) -> None:
        now = time.time()
        late = [
            uuid
            for uuid, entry in waiting.items()
            if entry.submitted_at is not None and now > entry.submitted_at + self.settings.timeout
        ]
        for uuid in late:
            entry = waiting.pop(uuid)
            entry.ended_try = True
            entry.reason = f"unfinished after {self.settings.timeout:g}s; a retry reattaches to the same task"
            self.ledger.touch(entry)
            self.failed_count += 1
        if late:
            self.ledgers.save(self.ledger)

    def _progress(self) -> None:
        elapsed = max(1e-6, time.monotonic() - self.started)
        self.log.info(
            "Batch progress: %d/%d stored, %d failed, %.1f images/min, cost so far $%.4f",
            self.stored_count,
            len(self.prepared),
            self.failed_count,
            self.done_here * 60 / elapsed,
            self.cost,
        )

    def _defer(self, waiting: dict[str, BatchEntry], poll_interval: float) -> Defer:
        now = time.time()
        s = self.settings
        deadline = min((e.submitted_at or now) for e in waiting.values()) + s.timeout
        latest = max((e.submitted_at or now) for e in waiting.values())
        self.log.info("%d task(s) not finished: deferring to one ZImageBatchTrigger", len(waiting))
        return Defer(
            trigger_kwargs={
                "task_uuids": {u: e.expected_results for u, e in waiting.items()},
                "zimage_conn_id": s.conn_id,
                "deadline": deadline,
                "poll_interval": poll_interval,
                "max_poll_interval": s.max_poll_interval,
                "webhook_inbox": str(default_inbox_path()) if s.webhook else None,
                # One grace period for the batch, from its last submission: a few chunks' spread of
                # latency for the earliest tasks, never a poll before any task's own grace is over.
                "poll_after": latest + s.webhook_grace_period if s.webhook else 0.0,
                "inbox_interval": s.webhook_check_interval,
                "not_before": now + deferral_settle_seconds(),
            },
            deadline=deadline,
            rendering_warned=self.rendering_warned,
        )

    def _index_content(self, entries: list[BatchEntry]) -> None:
        """reuse="content": this batch's generated seeded pictures, one index for the task instance."""
        if self.settings.reuse != "content":
            return
        pictures = (
            (e.fingerprint, e.images)
            for e in entries
            if e.status == "stored"
            and e.images
            and self.prepared[e.index].seed is not None
            and not any("reused_from" in i for i in e.images)
        )
        ledger = self.ledger
        name = content_index.batch_id(ledger.dag_id, ledger.run_id, ledger.task_id, ledger.map_index)
        try:
            content_index.record_batch(self.store, name, pictures)
        except ZImageError as exc:  # a lost hint costs a future payment, not these images
            self.log.warning("Could not index the batch's images for reuse: %s", exc)

    def _finish(self) -> dict[str, Any]:
        # The journal folded into one snapshot: a re-run (or a reader) finds one small document.
        self.ledgers.compact(self.ledger)
        entries = [self.ledger.entries[i] for i in sorted(self.prepared)]
        self._index_content(entries)
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
        path = self.store.write_manifest(self.directory, manifest, image_per_line=True)
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
        if failed and self.settings.fail_on_partial_error:
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
