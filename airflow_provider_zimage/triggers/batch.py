"""One trigger waits for a whole batch: batched `getResponse` for every pending taskUUID.

The event is small on purpose (the finished taskUUIDs and their outcome, never results): a 5,000-image
batch must not put megabytes into the metadata DB. The worker reads the finished ones again to get
their URLs (from the webhook inbox, or a getResponse, which is free). What an answer means is
`outcomes.TaskWait`'s decision, as everywhere.

With webhook delivery the trigger looks at the inbox (`inbox.BatchInboxWatch`: one listing for the
whole batch) every `inbox_interval` seconds and polls only from `poll_after` on, so a lost webhook
costs latency, never an image; webhook items and poll answers merge per task, as in `ZImageTaskTrigger`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import TriggerEvent

from airflow_provider_zimage.exceptions import ZImageAuthError, ZImagePermanentError
from airflow_provider_zimage.hooks.runware import ZImageHook, loop_clients
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.models import ApiErrorDetail
from airflow_provider_zimage.runware.outcomes import (
    MAX_CONSECUTIVE_ERRORS,
    Action,
    Outcome,
    TaskWait,
    for_error,
)
from airflow_provider_zimage.runware.protocol import POLL_BATCH, RunwareResponse, split_by_task
from airflow_provider_zimage.triggers.base import ZImageBaseTrigger
from airflow_provider_zimage.webhooks.inbox import BatchInboxWatch


async def apoll_many(hook: ZImageHook, uuids: list[str]) -> RunwareResponse:
    """One answer for many tasks; a whole-batch 400 is asked again task by task (as `BatchPoller`)."""
    merged = RunwareResponse()
    for start in range(0, len(uuids), POLL_BATCH):
        chunk = uuids[start : start + POLL_BATCH]
        try:
            answer = await hook.aget_responses(chunk)
        except ZImagePermanentError as exc:
            if len(chunk) == 1 or isinstance(exc, ZImageAuthError):
                raise
            answers = await asyncio.gather(*(hook.aget_responses([u]) for u in chunk), return_exceptions=True)
            answer = RunwareResponse()
            for uuid, one in zip(chunk, answers, strict=True):
                if isinstance(one, BaseException):
                    answer.errors.append(_task_error(uuid, one))
                else:
                    _extend(answer, one)
        _extend(merged, answer)
    return merged


def _extend(into: RunwareResponse, more: RunwareResponse) -> None:
    into.results += more.results
    into.processing += more.processing
    into.errors += more.errors


def _task_error(uuid: str, exc: BaseException) -> Any:
    return ApiErrorDetail.model_validate({"code": "taskRefused", "message": str(exc), "taskUUID": uuid})


class ZImageBatchTrigger(ZImageBaseTrigger):
    """Polls every pending taskUUID of a batch until all are finished, or the deadline passes.

    :param task_uuids: taskUUID -> expected results.
    :param deadline: epoch seconds; the event then lists what finished and the worker decides.
    :param webhook_inbox: URI of the webhook inbox to watch (only `zimage_conn_id`'s part of it); None
        polls only.
    :param poll_after: epoch seconds before which `getResponse` is not called (the webhook grace
        period); 0 polls at once.
    :param inbox_interval: seconds between two looks at the inbox.
    :param not_before: epoch seconds before which no event is sent (Airflow 3.3's deferral race, see
        `ZImageTaskTrigger`).
    """

    def __init__(
        self,
        *,
        # Spelled out like ZImageTaskTrigger's on purpose: a trigger's constructor arguments are exactly
        # what serialize() stores (ZImageBaseTrigger reads them from this signature).
        task_uuids: dict[str, int],
        zimage_conn_id: str = ZImageHook.default_conn_name,
        deadline: float,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
        webhook_inbox: str | None = None,
        poll_after: float = 0.0,
        inbox_interval: float = 1.0,
        not_before: float = 0.0,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # BaseTrigger.__init__ has no annotations
        self.task_uuids = dict(task_uuids)
        self.zimage_conn_id = zimage_conn_id
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.max_consecutive_errors = max_consecutive_errors
        self.webhook_inbox = webhook_inbox
        self.poll_after = poll_after
        self.inbox_interval = inbox_interval
        self.not_before = not_before

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = ZImageHook(self.zimage_conn_id)
        waits = {u: TaskWait(u, n) for u, n in self.task_uuids.items()}
        finished: dict[str, str] = {}
        delays = protocol.poll_delays(self.poll_interval, self.max_poll_interval)
        watch = (
            BatchInboxWatch(self.webhook_inbox, self.log, conn_id=self.zimage_conn_id)
            if self.webhook_inbox
            else None
        )
        next_poll = self.poll_after
        errors_in_a_row = 0
        reported = -1
        async with loop_clients():
            while True:
                pending = [u for u in waits if u not in finished]
                if watch is not None:
                    delivered = await asyncio.to_thread(watch.check, pending)
                    parts = split_by_task(delivered, pending)
                    for uuid in pending:
                        if parts[uuid].results or parts[uuid].errors:
                            self._settle(finished, uuid, waits[uuid].results_in([parts[uuid]]))
                    pending = [u for u in pending if u not in finished]
                if pending and time.time() >= next_poll:
                    try:
                        answer = await apoll_many(hook, pending)
                        errors_in_a_row = 0
                        parts = split_by_task(answer, pending)
                        for uuid in pending:
                            self._settle(finished, uuid, waits[uuid].answer(parts[uuid]))
                    except Exception as exc:
                        outcome = for_error(exc)
                        errors_in_a_row += 1
                        if isinstance(exc, ZImageAuthError) and errors_in_a_row == 1:
                            hook.reload()
                        elif outcome.action is Action.FAIL or errors_in_a_row >= self.max_consecutive_errors:
                            yield self._event(finished, error=outcome.message)
                            return
                        self.log.warning("batched getResponse failed (%d in a row): %s", errors_in_a_row, exc)
                    next_poll = time.time() + next(delays)
                if len(finished) == len(waits) or time.time() >= self.deadline:
                    await asyncio.sleep(max(0.0, self.not_before - time.time()))
                    yield self._event(finished)
                    return
                if len(finished) != reported:  # a line per change, not per look at the inbox
                    reported = len(finished)
                    self.log.info("Batch: %d/%d task(s) finished", reported, len(waits))
                interval = self.inbox_interval if watch is not None else None
                await asyncio.sleep(
                    protocol.next_pause(
                        next_poll, time.time(), inbox_interval=interval, deadline=self.deadline
                    )
                )

    @staticmethod
    def _settle(finished: dict[str, str], uuid: str, outcome: Outcome) -> None:
        if outcome.done:
            finished[uuid] = outcome.action.value

    def _event(self, finished: dict[str, str], error: str | None = None) -> TriggerEvent:
        return TriggerEvent(
            {"finished": finished, "pending": len(self.task_uuids) - len(finished), "error": error}
        )
