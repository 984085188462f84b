"""Waiting on a worker, and ending a try by what the answer meant.

The in-process wait is the worker-side twin of `ZImageTaskTrigger`: the same `outcomes.TaskWait`
decides what every answer means, only the sleeping differs (when to poll is `protocol.poll_delays`,
`protocol.first_poll_interval` and `protocol.next_pause` for every path that waits). With webhooks the
worker runs the trigger itself (`first_event`). `end_try` turns an outcome into the
Airflow exception that matches it, after applying it to the ledger, for the operator and the sensor
alike, so a 401 means the same thing whichever path received it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, cast

from airflow_provider_zimage.compat import AirflowException, AirflowFailException
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.outcomes import Action, Outcome, TaskWait

if TYPE_CHECKING:
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_zimage.hooks.runware import ZImageHook
    from airflow_provider_zimage.jobs.generation import GenerationJob

log = logging.getLogger(__name__)


async def first_event(trigger: BaseTrigger, limit: float | None = None) -> dict[str, Any] | None:
    """Run `trigger` on the worker: its first event, or None when `limit` seconds pass first."""

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return cast(dict[str, Any], event.payload)
        raise AirflowException(f"{type(trigger).__name__} ended without an event")

    if limit is None:
        return await first()
    try:
        return await asyncio.wait_for(first(), limit)
    except asyncio.TimeoutError:
        return None


def wait_in_process(
    hook: ZImageHook,
    wait: TaskWait,
    *,
    until: float,
    poll_interval: float = 1.0,
    max_poll_interval: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Outcome:
    """Poll until the answer is final or epoch second `until` passes (then the outcome is WAIT).

    The first poll is immediate: a task that finished while nobody looked (a retry, a fast Turbo
    image) is stored without waiting, and the caller decides what a WAIT at its deadline means.
    """
    delays = protocol.poll_delays(poll_interval, max_poll_interval)
    while True:
        try:
            outcome = wait.answer(hook.get_response(wait.task_uuid))
        except Exception as exc:
            if wait.reload_connection(exc):
                hook.reload()
                continue
            outcome = wait.error(exc)
        if outcome.done:
            return outcome
        if outcome.message and wait.status.results:
            log.info("Task %s: %s", wait.task_uuid, outcome.message)
        delay = next(delays)
        if time.time() + delay > until:
            remaining = until - time.time()
            if remaining <= 0:
                return outcome
            delay = remaining
        sleep(delay)


def stored_later(task_uuid: str, error: Exception) -> str:
    """Why storing a paid image failed, and that a retry fixes it without paying (the ledger still holds
    the taskUUID, so the next try reattaches and downloads again)."""
    return (
        f"storing the images of task {task_uuid} failed: {error}. They are paid for and still at "
        "Runware: a retry reattaches and stores them without paying again"
    )


def end_try(job: GenerationJob | None, task_uuid: str, outcome: Outcome) -> NoReturn:
    """Apply `outcome` to the ledger, then end the try the way it says (never for STORE or WAIT)."""
    if outcome.action in (Action.STORE, Action.WAIT):
        raise ValueError(f"{outcome.action.value} does not end a try")
    if job is not None:
        job.settle(task_uuid, outcome)
    if outcome.retryable:
        raise AirflowException(outcome.message)
    raise AirflowFailException(outcome.message)
