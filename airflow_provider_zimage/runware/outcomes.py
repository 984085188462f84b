"""What an answer from Runware means: one table, read the same way by every path that waits.

The operator's in-process wait, the trigger and the sensor (poke, reschedule and deferrable) all meet
the same answers: images, "still processing", a task-level error, a poll that failed. What each of them
means for money is a decision, written once here and tested row by row (tests/runware/test_outcomes.py):

| answer                                                   | outcome          | ledger              |
|----------------------------------------------------------|------------------|---------------------|
| every expected image is in                               | STORE            | stored (after)      |
| some or none of them, no error                           | WAIT             | untouched           |
| a task-level transient code (rateLimitExceeded, ...)     | RETRY            | untouched           |
| our own request failed transiently (429/5xx/drop/timeout) | RETRY           | untouched           |
| our own request refused (401/402/403, a 400 for the poll, | FAIL             | untouched           |
|   no API key, a bad connection)                          |                  |                     |
| Runware lost the results (taskExpired, taskNotFound)     | REGENERATE       | failed, retryable   |
| Runware failed this taskUUID (any other task-level code) | REGENERATE       | failed, final       |

The rule that protects money: only an error Runware reports *for this taskUUID* may move the ledger to a
new generation (a new taskUUID, paid again). Our request failing never does; the next try reattaches to
the same taskUUID and pays nothing.

Sans-IO: nothing here sleeps, polls or touches storage; `TaskWait` only counts (and logs).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from airflow_provider_zimage.exceptions import (
    ZImageAuthError,
    ZImageError,
    ZImagePermanentError,
    ZImageTimeout,
    ZImageTransientError,
)
from airflow_provider_zimage.runware.models import ApiErrorDetail
from airflow_provider_zimage.runware.protocol import (
    CONFLICT_TASK_UUID,
    TASK_NOT_FOUND,
    TRANSIENT_CODES,
    RunwareResponse,
    TaskStatus,
    describe,
)

log = logging.getLogger(__name__)

# getResponse codes meaning "the results are gone", not "the request was wrong".
LOST_RESULT_CODES = frozenset({TASK_NOT_FOUND, "taskExpired"})
# How many failed polls in a row a wait tolerates (each already retried with backoff by the hook)
# before it ends the try; the next try reattaches, so giving up costs time, never money.
MAX_CONSECUTIVE_ERRORS = 5


class Action(str, enum.Enum):
    STORE = "store"
    WAIT = "wait"
    RETRY = "retry"  # end this try; Airflow's retry reattaches to the same taskUUID
    FAIL = "fail"  # end the task; the ledger keeps the taskUUID, a clear reattaches
    REGENERATE = "regenerate"  # Runware failed or lost this taskUUID: the ledger moves on


@dataclass(frozen=True)
class Outcome:
    """One row of the table: what to do, whether Airflow may retry, and why (for the task log)."""

    action: Action
    message: str = ""
    retryable: bool = False
    errors: tuple[ApiErrorDetail, ...] = field(default=())

    @property
    def new_generation(self) -> bool:
        return self.action is Action.REGENERATE

    @property
    def done(self) -> bool:
        return self.action is not Action.WAIT


def for_status(status: TaskStatus) -> Outcome:
    """The meaning of everything known about one taskUUID after a poll (or webhook items)."""
    own = [e for e in status.errors if e.code != CONFLICT_TASK_UUID]
    if own:
        first = own[0]
        message = describe(first)
        if all(e.code in TRANSIENT_CODES for e in own):
            return Outcome(Action.RETRY, f"{message}; a retry reattaches to the same task", True, tuple(own))
        if any(e.code in LOST_RESULT_CODES for e in own):
            return Outcome(
                Action.REGENERATE,
                f"Runware no longer has the results of task {status.task_uuid} ({message}); "
                "a retry generates them again under a new taskUUID",
                True,
                tuple(own),
            )
        return Outcome(
            Action.REGENERATE, f"Runware task {status.task_uuid} failed: {message}", False, tuple(own)
        )
    if status.complete:
        return Outcome(Action.STORE)
    return Outcome(Action.WAIT, f"{len(status.results)}/{status.expected_results} result(s) in")


def for_error(error: BaseException) -> Outcome:
    """The meaning of our own request failing: never a new generation, whatever the status code."""
    text = str(error)
    if isinstance(error, (ZImageTransientError, ZImageTimeout)):
        return Outcome(Action.RETRY, f"{text}; a retry reattaches to the same task", True)
    if isinstance(error, (ZImagePermanentError, ZImageError)):
        return Outcome(
            Action.FAIL,
            f"{text}. The task is still recorded: once this is fixed, clearing the task reattaches "
            "to it without paying again",
        )
    return Outcome(Action.RETRY, f"unexpected error while waiting: {type(error).__name__}: {text}", True)


def timed_out(status: TaskStatus) -> Outcome:
    """The deadline passed with the task unfinished: it may still finish at Runware, so reattach."""
    return Outcome(
        Action.RETRY,
        f"task {status.task_uuid} unfinished at its deadline ({len(status.results)}/"
        f"{status.expected_results} results); a retry reattaches to the same task",
        True,
    )


class TaskWait:
    """One wait for one taskUUID: merges answers and says what each one means.

    A failed poll is tolerated `max_consecutive_errors` times in a row (WAIT), then ends the try
    (RETRY); a permanent one ends it at once (FAIL). Every waiting path uses this, so the operator,
    the trigger and the sensor give up, retry and regenerate on exactly the same answers.
    """

    def __init__(
        self,
        task_uuid: str,
        expected_results: int = 1,
        *,
        max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS,
    ) -> None:
        self.status = TaskStatus(task_uuid, expected_results)
        self.max_consecutive_errors = max_consecutive_errors
        self.errors_in_a_row = 0
        self._reloaded = False

    @property
    def task_uuid(self) -> str:
        return self.status.task_uuid

    def answer(self, response: RunwareResponse | TaskStatus) -> Outcome:
        self.errors_in_a_row = 0
        self._reloaded = False
        self.status.merge(response)
        return for_status(self.status)

    def results_in(self, items: Iterable[RunwareResponse]) -> Outcome:
        """Merge webhook items (no poll happened, so the error count stays as it is)."""
        for response in items:
            self.status.merge(response)
        return for_status(self.status)

    def reload_connection(self, error: BaseException) -> bool:
        """True the first time the poll is refused for auth: read the connection again and retry.

        A key rotated in Airflow while tasks wait must not fail every one of them (or need a triggerer
        restart); a second refusal is the answer.
        """
        if not isinstance(error, ZImageAuthError) or self._reloaded:
            return False
        log.warning("getResponse for %s refused (%s): reading the connection again", self.task_uuid, error)
        self._reloaded = True
        return True

    def error(self, error: BaseException) -> Outcome:
        outcome = for_error(error)
        if outcome.action is not Action.RETRY:
            return outcome
        self.errors_in_a_row += 1
        if self.errors_in_a_row < self.max_consecutive_errors:
            log.warning(
                "getResponse for %s failed (%d in a row): %s", self.task_uuid, self.errors_in_a_row, error
            )
            return Outcome(Action.WAIT, f"{error} ({self.errors_in_a_row} in a row)")
        return Outcome(
            Action.RETRY,
            f"getResponse failed {self.errors_in_a_row} times in a row: {error}; "
            "a retry reattaches to the same task",
            True,
        )
