"""Waiting for a Runware task in the triggerer, so a deferred task holds no worker slot.

The trigger is small on purpose: its constructor arguments are exactly what `serialize()` returns, it
awaits the hook (never blocks the loop) and yields one event. The deadline is wall-clock epoch seconds,
so a triggerer that restarts and re-creates the trigger from its serialized form keeps the original
deadline instead of starting a new one; `poll_after` (when webhook delivery starts polling) likewise.

With webhook delivery the trigger watches the task's folder in the webhook inbox (`inbox.py`), a
cheap listing several times a second, and only starts `getResponse` polling once `poll_after` has
passed: a webhook that never arrives then costs latency, never an image. Webhook items and poll
answers merge into one `TaskStatus`, deduplicated by imageUUID, so any mix of the two completes a task.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

from airflow.triggers.base import TriggerEvent
from pydantic import BaseModel, ConfigDict

from airflow_provider_zimage.hooks.runware import ZImageHook, loop_clients
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.models import ApiErrorDetail, ImageResult
from airflow_provider_zimage.runware.outcomes import (
    MAX_CONSECUTIVE_ERRORS,
    Action,
    Outcome,
    TaskWait,
    timed_out,
)
from airflow_provider_zimage.runware.protocol import RunwareResponse
from airflow_provider_zimage.triggers.base import ZImageBaseTrigger
from airflow_provider_zimage.triggers.polling import batch_poller
from airflow_provider_zimage.webhooks.inbox import InboxHealth, WebhookInbox

# A trigger event lands in the metadata DB: it carries ids and URLs, never image bytes, and past this
# size not even the URLs (the worker then asks getResponse again, which is free).
MAX_EVENT_BYTES = 64 * 1024
_INLINE_IMAGE_KEYS = ("imageBase64Data", "imageDataURI")


EventOutcome = Literal["store", "retry", "fail", "regenerate"]


class TaskEvent(BaseModel):
    """The one event a `ZImageTaskTrigger` yields; operators validate it before trusting it.

    `outcome` is a row of the table in `outcomes` (store, retry, fail, regenerate); the worker applies
    it to the ledger, so the triggerer never decides about money on its own. `results` holds the
    results without inline image data; `refetch` says some were left out and must be polled again.
    """

    model_config = ConfigDict(extra="forbid")

    outcome: EventOutcome
    task_uuid: str
    results: list[dict[str, Any]] = []
    refetch: bool = False
    errors: list[dict[str, Any]] = []
    message: str = ""
    retryable: bool = False

    def to_outcome(self) -> Outcome:
        errors = tuple(ApiErrorDetail.model_validate(e) for e in self.errors)
        return Outcome(Action(self.outcome), self.message, self.retryable, errors)

    @classmethod
    def build(cls, task_uuid: str, outcome: Outcome, results: list[ImageResult]) -> TaskEvent:
        wire = [r.model_dump(by_alias=True, exclude_none=True) for r in results]
        slim = [{k: v for k, v in r.items() if k not in _INLINE_IMAGE_KEYS} for r in wire]
        refetch = slim != wire
        if len(json.dumps(slim)) > MAX_EVENT_BYTES:
            slim, refetch = [], True
        return cls(
            outcome=cast(EventOutcome, outcome.action.value),  # pydantic refuses any other value
            task_uuid=task_uuid,
            results=slim if outcome.action is Action.STORE else [],
            refetch=refetch and outcome.action is Action.STORE,
            errors=[e.model_dump(by_alias=True, exclude_none=True) for e in outcome.errors],
            message=outcome.message,
            retryable=outcome.retryable,
        )


class ZImageTaskTrigger(ZImageBaseTrigger):
    """Polls `getResponse` for one taskUUID until its results are all in, it fails, or the deadline passes.

    What each answer means is `outcomes.TaskWait`'s decision, the same one the in-process wait and the
    sensor make; this class only decides when to look.

    :param task_uuid: the Runware task to wait for.
    :param zimage_conn_id: connection holding the API key.
    :param expected_results: numberResults of the task; partial results accumulate until all are in.
    :param deadline: epoch seconds after which the wait ends with a retryable outcome (anchored by the
        operator to the first submission, so a restarted triggerer or a retry never extends it).
    :param poll_interval: first wait between polls; grows by 1.5x up to `max_poll_interval`.
    :param max_consecutive_errors: failed polls in a row (each already retried by the hook) tolerated
        before the try ends; the next try reattaches.
    :param webhook_inbox: URI of the webhook inbox to watch (only `zimage_conn_id`'s part of it); None
        for polling only.
    :param poll_after: epoch seconds before which `getResponse` is not called (the webhook grace
        period); 0 polls at once.
    :param inbox_interval: seconds between two looks at the inbox.
    :param not_before: epoch seconds before which no event is sent (the answer is kept until then).
        Airflow 3.3 fails a deferred task whose trigger fires before the scheduler has processed the
        deferral (apache/airflow#66374, #71580); the operator sets it a few seconds after deferring.
    """

    def __init__(
        self,
        *,
        # Spelled out like ZImageBatchTrigger's on purpose: a trigger's constructor arguments are exactly
        # what serialize() stores (ZImageBaseTrigger reads them from this signature).
        task_uuid: str,
        zimage_conn_id: str = ZImageHook.default_conn_name,
        expected_results: int = 1,
        deadline: float,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
        webhook_inbox: str | None = None,
        poll_after: float = 0.0,
        inbox_interval: float = 0.25,
        not_before: float = 0.0,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # BaseTrigger.__init__ has no annotations
        self.task_uuid = task_uuid
        self.zimage_conn_id = zimage_conn_id
        self.expected_results = expected_results
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.max_consecutive_errors = max_consecutive_errors
        self.webhook_inbox = webhook_inbox
        self.poll_after = poll_after
        self.inbox_interval = inbox_interval
        self.not_before = not_before

    def _event(self, wait: TaskWait, outcome: Outcome) -> TriggerEvent:
        return TriggerEvent(TaskEvent.build(self.task_uuid, outcome, wait.status.results).model_dump())

    async def run(self) -> AsyncIterator[TriggerEvent]:
        poller = batch_poller(self.zimage_conn_id)
        wait = TaskWait(
            self.task_uuid, self.expected_results, max_consecutive_errors=self.max_consecutive_errors
        )
        delays = protocol.poll_delays(self.poll_interval, self.max_poll_interval)
        watch = (
            _InboxWatch(self.webhook_inbox, self.zimage_conn_id, self.task_uuid, self.log)
            if self.webhook_inbox
            else None
        )
        next_poll = self.poll_after
        async with loop_clients():
            while True:
                outcome = wait.results_in([await watch.check()]) if watch is not None else None
                if (outcome is None or not outcome.done) and time.time() >= next_poll:
                    try:
                        # Shared with every trigger of this loop: one POST polls up to 100 tasks.
                        outcome = wait.answer(await poller.poll(self.task_uuid))
                    except Exception as exc:
                        if wait.reload_connection(exc):
                            poller.reload()
                            continue
                        outcome = wait.error(exc)
                    next_poll = time.time() + next(delays)
                if outcome is not None and outcome.done:
                    await asyncio.sleep(max(0.0, self.not_before - time.time()))
                    yield self._event(wait, outcome)
                    return
                remaining = self.deadline - time.time()
                if remaining <= 0:
                    yield self._event(wait, timed_out(wait.status))
                    return
                interval = self.inbox_interval if watch is not None else None
                await asyncio.sleep(
                    protocol.next_pause(
                        next_poll, time.time(), inbox_interval=interval, deadline=self.deadline
                    )
                )


class _InboxWatch:
    """The trigger's view of one task's inbox folder: lists it, reads only items not read before.

    Only the folder in the task's own connection's part of the inbox: what was delivered under another
    connection's secret is never read here, whatever taskUUID it names.

    A failing inbox is reported when it starts and stops failing, not on every look, and never ends
    the wait: polling after the grace period still finds the results.
    """

    def __init__(self, inbox: str, conn_id: str, task_uuid: str, log: Any) -> None:
        self.inbox = inbox
        self.conn_id = conn_id
        self.task_uuid = task_uuid
        self.log = log
        self.seen: set[str] = set()
        self.health = InboxHealth(log)

    def _collect(self) -> tuple[set[str], RunwareResponse]:
        inbox = WebhookInbox(self.inbox, conn_id=self.conn_id)
        new = inbox.names(self.task_uuid) - self.seen
        return new, inbox.read(self.task_uuid, new) if new else RunwareResponse()

    async def check(self) -> RunwareResponse:
        try:
            new, response = await asyncio.to_thread(self._collect)
        except Exception as exc:
            self.health.failed(exc)
            return RunwareResponse()
        self.health.readable()
        if new:
            self.log.info("Webhook inbox: %d new item(s) for task %s", len(new), self.task_uuid)
        self.seen |= new
        return response
