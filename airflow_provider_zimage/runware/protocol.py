"""The Runware wire protocol without I/O.

Written once and shared by `ZImageHook`'s sync and async paths (and by the trigger), the way httpx keeps
request building in `BaseClient`: these functions build the JSON arrays Runware expects, turn an HTTP
answer into result/error models or typed exceptions, and hold the retry policy as data. Nothing here
opens a socket, sleeps or reads a connection, so it is tested without a server.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from airflow_provider_zimage.exceptions import (
    ZImageAPIError,
    ZImageAuthError,
    ZImageConflictError,
    ZImageInsufficientCreditsError,
    ZImagePermanentError,
    ZImageTaskNotFound,
    ZImageTimeout,
    ZImageTransientError,
)
from airflow_provider_zimage.redaction import redact  # noqa: F401  (part of the protocol's API)
from airflow_provider_zimage.runware.models import ApiErrorDetail, ImageInferenceRequest, ImageResult

DEFAULT_BASE_URL = "https://api.runware.ai/v1"

# Error codes with a meaning the client acts on, not just reports.
CONFLICT_TASK_UUID = "conflictTaskUUID"
TASK_NOT_FOUND = "taskNotFound"
TRANSIENT_CODES = frozenset({"rateLimitExceeded", "timeoutProvider", "serviceUnavailable", "internalError"})

TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})


def inference_payload(requests: Sequence[ImageInferenceRequest]) -> list[dict[str, Any]]:
    """One POST carries several tasks; Runware answers per task, matched by taskUUID."""
    if not requests:
        raise ValueError("at least one imageInference request is needed")
    return [r.to_wire() for r in requests]


def get_response_payload(*task_uuids: str) -> list[dict[str, Any]]:
    """One POST can poll many tasks; every item of the answer names its taskUUID."""
    return [{"taskType": "getResponse", "taskUUID": uuid} for uuid in task_uuids]


@dataclass
class RunwareResponse:
    """A 2xx answer split by what the caller does next: store results, keep waiting, or fail."""

    results: list[ImageResult] = field(default_factory=list)
    processing: list[str] = field(default_factory=list)
    errors: list[ApiErrorDetail] = field(default_factory=list)


@dataclass
class TaskStatus:
    """Everything known about one taskUUID after a poll; results are deduplicated by imageUUID.

    Runware returns each finished image of a `numberResults > 1` task as its own item, and later polls
    return the earlier items again; `merge` keeps the first copy of each imageUUID.
    """

    task_uuid: str
    expected_results: int = 1
    results: list[ImageResult] = field(default_factory=list)
    errors: list[ApiErrorDetail] = field(default_factory=list)

    def merge(self, response: RunwareResponse | TaskStatus) -> TaskStatus:
        seen = {r.image_uuid for r in self.results}
        for result in response.results:
            if result.task_uuid != self.task_uuid:
                continue
            if result.image_uuid in seen:
                continue
            seen.add(result.image_uuid)
            self.results.append(result)
        for error in response.errors:
            if error.task_uuid in (None, self.task_uuid) and error not in self.errors:
                self.errors.append(error)
        return self

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    @property
    def complete(self) -> bool:
        return len(self.results) >= self.expected_results

    @property
    def finished(self) -> bool:
        return self.failed or self.complete


def _load_json(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return None


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After is undocumented at Runware but honoured when a proxy or the API sends it."""
    value = None
    for key, val in headers.items():
        if key.lower() == "retry-after":
            value = val.strip()
            break
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from datetime import datetime, timezone

        when = parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _error_details(body: Any) -> list[ApiErrorDetail]:
    if not isinstance(body, Mapping):
        return []
    items = body.get("errors") or []
    if isinstance(items, Mapping):
        items = [items]
    details = []
    for item in items:
        if isinstance(item, Mapping):
            details.append(ApiErrorDetail.model_validate(dict(item)))
    return details


def describe(detail: ApiErrorDetail | None, status_code: int | None = None) -> str:
    parts = ["Runware"]
    if status_code is not None:
        parts.append(str(status_code))
    if detail is not None:
        if detail.code:
            parts.append(detail.code)
        text = " ".join(parts)
        if detail.message:
            text += f": {detail.message}"
        if detail.parameter:
            text += f" (parameter: {detail.parameter})"
        return text
    return " ".join(parts) + ": no error details in the response"


def error_for_status(status_code: int, body: Any, headers: Mapping[str, str]) -> ZImageAPIError:
    """Map an HTTP error answer to the exception type that tells the caller whether to retry."""
    details = _error_details(body)
    first = details[0] if details else None
    kwargs: dict[str, Any] = {
        "status_code": status_code,
        "code": first.code if first else None,
        "parameter": first.parameter if first else None,
        "task_uuid": first.task_uuid if first else None,
        "retry_after": parse_retry_after(headers),
    }
    message = describe(first, status_code)
    if details and all(d.code == CONFLICT_TASK_UUID for d in details):
        uuids = [d.task_uuid for d in details if d.task_uuid]
        return ZImageConflictError(message, uuids, **kwargs)
    if first is not None and first.code == TASK_NOT_FOUND:
        return ZImageTaskNotFound(message, **kwargs)
    if status_code in AUTH_STATUSES:
        return ZImageAuthError(message, **kwargs)
    if status_code == 402:
        return ZImageInsufficientCreditsError(message, **kwargs)
    if status_code in TRANSIENT_STATUSES or status_code >= 500:
        return ZImageTransientError(message, **kwargs)
    return ZImagePermanentError(message, **kwargs)


def parse_response(
    status_code: int, content: bytes, headers: Mapping[str, str] | None = None
) -> RunwareResponse:
    """Turn one HTTP answer into results, or raise the typed error the retry policy understands."""
    headers = headers or {}
    body = _load_json(content)
    if status_code >= 400:
        raise error_for_status(status_code, body, headers)
    if not isinstance(body, Mapping):
        # A 2xx without a JSON object is a proxy or gateway glitch, not an answer from Runware.
        raise ZImageTransientError(
            f"Runware {status_code}: the response body is not a JSON object", status_code=status_code
        )
    response = RunwareResponse(errors=_error_details(body))
    for item in body.get("data") or []:
        if not isinstance(item, Mapping):
            continue
        status = item.get("status")
        if status == "processing" or (status is None and not _has_image(item)):
            if item.get("taskUUID"):
                response.processing.append(str(item["taskUUID"]))
            continue
        if status == "error":
            response.errors.append(
                ApiErrorDetail.model_validate(
                    {
                        "code": item.get("code") or item.get("error") or "taskFailed",
                        "message": item.get("message") or "the task failed at Runware",
                        "taskUUID": item.get("taskUUID"),
                        "taskType": item.get("taskType"),
                        "parameter": item.get("parameter"),
                    }
                )
            )
            continue
        response.results.append(ImageResult.from_wire(dict(item)))
    return response


PER_TASK_POLL_CODES = frozenset({TASK_NOT_FOUND, "taskExpired"})


def parse_poll_response(
    status_code: int, content: bytes, headers: Mapping[str, str] | None = None
) -> RunwareResponse:
    """Like `parse_response`, but a 400 whose errors all concern named tasks (unknown or expired) is an
    answer about those tasks, not a failure of the whole poll: a batched poll must not fail every task
    because one of them expired."""
    if status_code == 400:
        details = _error_details(_load_json(content))
        if details and all(d.code in PER_TASK_POLL_CODES and d.task_uuid for d in details):
            return RunwareResponse(errors=details)
    return parse_response(status_code, content, headers)


def _has_image(item: Mapping[str, Any]) -> bool:
    keys = ("imageUUID", "imageURL", "imageBase64Data", "imageDataURI")
    return any(item.get(k) for k in keys)


def webhook_items(body: Any) -> list[dict[str, Any]]:
    """Runware has documented both a bare task object and a `{"data": [...]}` envelope as webhook bodies."""
    if isinstance(body, Mapping):
        if isinstance(body.get("data"), list):
            return [dict(i) for i in body["data"] if isinstance(i, Mapping)]
        return [dict(body)]
    if isinstance(body, list):
        return [dict(i) for i in body if isinstance(i, Mapping)]
    return []


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before retrying a transient error; shared data, not a loop written twice.

    Exponential backoff with equal jitter: attempt n waits between half and all of
    `min(max_delay, base_delay * 2**n)`, so a fleet of clients that failed together spreads out, and no
    retry follows its failure instantly. A Retry-After from the server wins when it asks for longer.
    """

    max_retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0

    def delay(
        self, attempt: int, error: ZImageAPIError | None = None, rng: random.Random | None = None
    ) -> float:
        cap: float = min(self.max_delay, self.base_delay * (2**attempt))  # int ** int is Any to mypy
        rand: float = (rng or random).uniform(0.0, cap / 2)
        backoff = cap / 2 + rand
        if error is not None and error.retry_after is not None:
            return min(self.max_retry_after, max(backoff, error.retry_after))
        return backoff

    def next_delay(self, attempt: int, error: Exception) -> float | None:
        """The wait before retry number `attempt + 1`, or None when the error must be raised now."""
        if not isinstance(error, ZImageTransientError) or attempt >= self.max_retries:
            return None
        return self.delay(attempt, error)


def poll_waits(task_uuid: str, timeout: float, initial: float = 1.0, cap: float = 10.0) -> Iterator[float]:
    """The waits of an in-process poll loop: 0 (poll at once), then the wait before each next poll.

    Raises ZImageTimeout instead of yielding a wait that would end past `timeout`, so the sync and the
    async loop share the deadline rule and only differ in how they sleep.
    """
    deadline = time.monotonic() + timeout
    yield 0.0
    for delay in poll_delays(initial, cap):
        if time.monotonic() + delay > deadline:
            raise ZImageTimeout(f"task {task_uuid} did not finish within {timeout:g}s")
        yield delay


#: First wait between getResponse polls when the operator is given no `poll_interval`, by backend. A
#: Runware Turbo image takes about a second; a zimage-executor answers a queued image in 0.1-1 s, and
#: the worker slot a task holds while it waits is what a mapped DAG on one machine runs short of.
DEFAULT_POLL_INTERVALS = {"runware": 1.0, "executor": 0.1}


def first_poll_interval(poll_interval: float | None, backend: str) -> float:
    """The operator's `poll_interval` when given, else the default for the connection's backend."""
    if poll_interval is not None:
        return poll_interval
    return DEFAULT_POLL_INTERVALS.get(backend, DEFAULT_POLL_INTERVALS["runware"])


def poll_delays(initial: float = 1.0, cap: float = 10.0, factor: float = 1.5) -> Iterator[float]:
    """Waits between getResponse polls: fast at first (turbo images take about a second), then backing
    off to `cap` so a long queue wait costs few requests. Endless; the caller owns the deadline."""
    delay = max(0.01, initial)
    while True:
        yield delay
        delay = min(cap, delay * factor)


def next_pause(
    next_poll: float, now: float, *, inbox_interval: float | None = None, deadline: float | None = None
) -> float:
    """Seconds to sleep before the next look: until the next poll, sooner when a webhook inbox is
    watched (every `inbox_interval`), never past `deadline`; never negative. Shared by both triggers
    and the batch job's in-process wait, so a change to when they look is made here once."""
    pause = next_poll - now
    if inbox_interval is not None:
        pause = min(pause, inbox_interval)
    if deadline is not None:
        pause = min(pause, deadline - now)
    return max(0.0, pause)


#: taskUUIDs per batched getResponse POST (Runware takes many tasks per request).
POLL_BATCH = 100


def split_by_task(response: RunwareResponse, uuids: list[str]) -> dict[str, RunwareResponse]:
    """Each task's part of a batched answer (an error naming no task concerns them all), so merging stays
    linear in the batch size."""
    parts = {u: RunwareResponse() for u in uuids}
    for result in response.results:
        if result.task_uuid in parts:
            parts[result.task_uuid].results.append(result)
    for error in response.errors:
        targets = [error.task_uuid] if error.task_uuid else uuids
        for uuid in targets:
            if uuid in parts:
                parts[uuid].errors.append(error)
    return parts
