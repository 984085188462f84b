"""The outcome table, row by row: what each answer from Runware means for the ledger and the task."""

from __future__ import annotations

import pytest

from airflow_provider_zimage.exceptions import (
    ZImageAuthError,
    ZImageError,
    ZImageInsufficientCreditsError,
    ZImagePermanentError,
    ZImageTimeout,
    ZImageTransientError,
)
from airflow_provider_zimage.runware.models import ApiErrorDetail, ImageResult
from airflow_provider_zimage.runware.outcomes import Action, TaskWait, for_error, for_status
from airflow_provider_zimage.runware.protocol import RunwareResponse, TaskStatus

TASK = "0c1b4c8e-7d25-4a8e-9a53-0d6f7e1e9b10"


def image(n: int) -> ImageResult:
    return ImageResult.from_wire(
        {"taskUUID": TASK, "imageUUID": f"img-{n}", "imageURL": f"https://im.runware.ai/{n}.jpg"}
    )


def status(results: int = 0, expected: int = 1, codes: tuple[str, ...] = ()) -> TaskStatus:
    errors = [ApiErrorDetail.model_validate({"code": c, "message": c, "taskUUID": TASK}) for c in codes]
    return TaskStatus(TASK, expected).merge(
        RunwareResponse(results=[image(i) for i in range(results)], errors=errors)
    )


# (answer, action, retryable, new generation)
STATUS_ROWS = [
    ("all images in", status(1), Action.STORE, False, False),
    ("2 of 2 images", status(2, expected=2), Action.STORE, False, False),
    ("1 of 2 images", status(1, expected=2), Action.WAIT, False, False),
    ("nothing yet", status(0), Action.WAIT, False, False),
    ("rateLimitExceeded for the task", status(codes=("rateLimitExceeded",)), Action.RETRY, True, False),
    ("timeoutProvider for the task", status(codes=("timeoutProvider",)), Action.RETRY, True, False),
    ("taskExpired", status(codes=("taskExpired",)), Action.REGENERATE, True, True),
    ("taskNotFound", status(codes=("taskNotFound",)), Action.REGENERATE, True, True),
    ("nsfwContentDetected", status(codes=("nsfwContentDetected",)), Action.REGENERATE, False, True),
    ("taskFailed", status(codes=("taskFailed",)), Action.REGENERATE, False, True),
    ("conflictTaskUUID alone", status(1, codes=("conflictTaskUUID",)), Action.STORE, False, False),
]


@pytest.mark.parametrize(
    ("answer", "state", "action", "retryable", "new_generation"), STATUS_ROWS, ids=[r[0] for r in STATUS_ROWS]
)
def test_answers_about_the_task(answer, state, action, retryable, new_generation):
    outcome = for_status(state)
    assert (outcome.action, outcome.retryable, outcome.new_generation) == (action, retryable, new_generation)


ERROR_ROWS = [
    ("429/5xx/drop", ZImageTransientError("503"), Action.RETRY, True),
    ("our wait timed out", ZImageTimeout("late"), Action.RETRY, True),
    ("401 on the poll", ZImageAuthError("401", status_code=401), Action.FAIL, False),
    ("402 on the poll", ZImageInsufficientCreditsError("402", status_code=402), Action.FAIL, False),
    ("400 for the whole poll", ZImagePermanentError("400", status_code=400), Action.FAIL, False),
    ("no API key / bad connection", ZImageError("no key"), Action.FAIL, False),
    ("a bug of ours", KeyError("x"), Action.RETRY, True),
]


@pytest.mark.parametrize(
    ("answer", "error", "action", "retryable"), ERROR_ROWS, ids=[r[0] for r in ERROR_ROWS]
)
def test_our_own_request_failing_never_moves_the_ledger(answer, error, action, retryable):
    outcome = for_error(error)
    assert (outcome.action, outcome.retryable) == (action, retryable)
    assert not outcome.new_generation


def test_a_wait_tolerates_a_bounded_run_of_failed_polls_then_ends_the_try():
    wait = TaskWait(TASK, max_consecutive_errors=3)
    assert [wait.error(ZImageTransientError("503")).action for _ in range(3)] == [
        Action.WAIT,
        Action.WAIT,
        Action.RETRY,
    ]


def test_an_answer_resets_the_run_of_failed_polls():
    wait = TaskWait(TASK, max_consecutive_errors=2)
    assert wait.error(ZImageTransientError("503")).action is Action.WAIT
    assert wait.answer(RunwareResponse(processing=[TASK])).action is Action.WAIT
    assert wait.error(ZImageTransientError("503")).action is Action.WAIT


def test_a_permanent_poll_error_ends_the_wait_at_once():
    assert TaskWait(TASK).error(ZImageAuthError("401")).action is Action.FAIL


def test_partial_results_accumulate_across_answers_deduplicated():
    wait = TaskWait(TASK, expected_results=2)
    assert wait.answer(RunwareResponse(results=[image(0)])).action is Action.WAIT
    assert wait.answer(RunwareResponse(results=[image(0)])).action is Action.WAIT
    assert wait.answer(RunwareResponse(results=[image(0), image(1)])).action is Action.STORE
    assert [r.image_uuid for r in wait.status.results] == ["img-0", "img-1"]


def test_errors_about_other_tasks_are_not_this_tasks_answer():
    other = ApiErrorDetail.model_validate(
        {"code": "taskFailed", "taskUUID": "11111111-2222-4333-8444-555555555555"}
    )
    assert TaskWait(TASK).answer(RunwareResponse(errors=[other])).action is Action.WAIT
