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
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from airflow.triggers.base import BaseTrigger, TriggerEvent
from pydantic import BaseModel, ConfigDict

from airflow_provider_zimage import protocol
from airflow_provider_zimage.exceptions import ZImageError, ZImageTransientError
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.inbox import WebhookInbox
from airflow_provider_zimage.protocol import RunwareResponse, TaskStatus
from airflow_provider_zimage.triggers.polling import batch_poller

EventStatus = Literal["success", "error", "timeout"]


class TaskEvent(BaseModel):
    """The one event a `ZImageTaskTrigger` yields; operators validate it before trusting it.

    `retryable` tells the operator whether Airflow's retries may help (transient errors exhausted,
    deadline passed) or the task must fail for good (Runware refused or failed the task).
    """

    model_config = ConfigDict(extra="forbid")

    status: EventStatus
    task_uuid: str
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    message: str = ""
    retryable: bool = False


class ZImageTaskTrigger(BaseTrigger):
    """Polls `getResponse` for one taskUUID until its results are all in, it fails, or the deadline passes.

    :param task_uuid: the Runware task to wait for.
    :param zimage_conn_id: connection holding the API key.
    :param expected_results: numberResults of the task; partial results accumulate until all are in.
    :param deadline: epoch seconds after which a `timeout` event is sent.
    :param poll_interval: first wait between polls; grows by 1.5x up to `max_poll_interval`.
    :param max_consecutive_errors: transient failures in a row (each already retried by the hook)
        tolerated before giving up with a retryable `error` event.
    :param webhook_inbox: URI of the webhook inbox to watch; None for polling only.
    :param poll_after: epoch seconds before which `getResponse` is not called (the webhook grace
        period); 0 polls at once.
    :param inbox_interval: seconds between two looks at the inbox.
    """

    def __init__(
        self,
        *,
        task_uuid: str,
        zimage_conn_id: str = ZImageHook.default_conn_name,
        expected_results: int = 1,
        deadline: float,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        max_consecutive_errors: int = 5,
        webhook_inbox: str | None = None,
        poll_after: float = 0.0,
        inbox_interval: float = 0.25,
    ) -> None:
        super().__init__()
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

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "task_uuid": self.task_uuid,
                "zimage_conn_id": self.zimage_conn_id,
                "expected_results": self.expected_results,
                "deadline": self.deadline,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
                "webhook_inbox": self.webhook_inbox,
                "poll_after": self.poll_after,
                "inbox_interval": self.inbox_interval,
            },
        )

    def _event(self, status: EventStatus, state: TaskStatus, **kwargs: Any) -> TriggerEvent:
        event = TaskEvent(
            status=status,
            task_uuid=self.task_uuid,
            results=[r.model_dump(by_alias=True, exclude_none=True) for r in state.results],
            errors=[e.model_dump(by_alias=True, exclude_none=True) for e in state.errors],
            **kwargs,
        )
        return TriggerEvent(event.model_dump())

    async def run(self) -> AsyncIterator[TriggerEvent]:
        poller = batch_poller(self.zimage_conn_id)
        state = TaskStatus(self.task_uuid, self.expected_results)
        delays = protocol.poll_delays(self.poll_interval, self.max_poll_interval)
        watch = _InboxWatch(self.webhook_inbox, self.task_uuid, self.log) if self.webhook_inbox else None
        next_poll = self.poll_after
        errors_in_a_row = 0
        while True:
            if watch is not None:
                state.merge(await watch.check())
            if not state.finished and time.time() >= next_poll:
                try:
                    # Shared with every trigger of this loop: one POST polls up to 100 tasks.
                    state.merge(await poller.poll(self.task_uuid))
                    errors_in_a_row = 0
                except ZImageTransientError as exc:
                    errors_in_a_row += 1
                    self.log.warning(
                        "getResponse for %s failed (%d in a row): %s", self.task_uuid, errors_in_a_row, exc
                    )
                    if errors_in_a_row >= self.max_consecutive_errors:
                        yield self._event("error", state, message=str(exc), retryable=True)
                        return
                except ZImageError as exc:
                    yield self._event("error", state, message=str(exc), retryable=False)
                    return
                next_poll = time.time() + next(delays)
            if state.failed:
                yield self._event("error", state, message=protocol.describe(state.errors[0]))
                return
            if state.complete:
                yield self._event("success", state)
                return
            remaining = self.deadline - time.time()
            if remaining <= 0:
                yield self._event(
                    "timeout",
                    state,
                    message=f"task {self.task_uuid} unfinished at the deadline "
                    f"({len(state.results)}/{self.expected_results} results)",
                    retryable=True,
                )
                return
            wait = next_poll - time.time()
            if watch is not None:
                wait = min(wait, self.inbox_interval)
            await asyncio.sleep(max(0.0, min(wait, remaining)))


class _InboxWatch:
    """The trigger's view of one task's inbox folder: lists it, reads only items not read before.

    A failing inbox is reported when it starts and stops failing, not on every look, and never ends
    the wait: polling after the grace period still finds the results.
    """

    def __init__(self, inbox: str, task_uuid: str, log: Any) -> None:
        self.inbox = inbox
        self.task_uuid = task_uuid
        self.log = log
        self.seen: set[str] = set()
        self.failing = False

    def _collect(self) -> tuple[set[str], RunwareResponse]:
        inbox = WebhookInbox(self.inbox)
        new = inbox.names(self.task_uuid) - self.seen
        return new, inbox.read(self.task_uuid, new) if new else RunwareResponse()

    async def check(self) -> RunwareResponse:
        try:
            new, response = await asyncio.to_thread(self._collect)
        except Exception as exc:
            if not self.failing:
                self.log.warning("Cannot read the webhook inbox, relying on polling until it works: %s", exc)
            self.failing = True
            return RunwareResponse()
        if self.failing:
            self.log.info("The webhook inbox is readable again")
            self.failing = False
        if new:
            self.log.info("Webhook inbox: %d new item(s) for task %s", len(new), self.task_uuid)
        self.seen |= new
        return response
