"""Scripted failures: the faults a paid API shows in production, on demand and reproducibly.

Two sources, checked in this order for every API request (POST /v1 or /):

- a queue of one-shot faults, each optionally limited to requests carrying a given taskType;
- per-request probabilities (`rates`) drawn from a seeded RNG, so a flaky run can be replayed.

A fault is a dict (the HTTP control API takes the same JSON):

    {"status": 429, "retry_after": 2}         answer 429 rateLimitExceeded with Retry-After: 2
    {"status": 402, "code": "insufficientCredits", "message": "..."}
    {"drop": true}                            read the request, close the socket, no answer, nothing done
    {"drop": "reset"}                         the same with a TCP reset instead of a FIN
    {"drop_after_accept": true}               do the work (tasks are accepted and counted), then close
    {"delay": 3.0}                            do the work, then wait 3 s before answering (client timeouts)
    {"status": 503, "task_type": "getResponse", "times": 2}   only getResponse requests, twice

camelCase spellings (`retryAfter`, `taskType`, `dropAfterAccept`) are accepted too.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

# The code Runware puts in the error body for each HTTP status the server can be told to answer with.
STATUS_CODES: dict[int, str] = {
    400: "invalidRequest",
    401: "invalidApiKey",
    402: "insufficientCredits",
    403: "forbidden",
    404: "notFound",
    408: "timeoutProvider",
    429: "rateLimitExceeded",
    500: "internalError",
    502: "badGateway",
    503: "serviceUnavailable",
    504: "timeoutProvider",
}
STATUS_MESSAGES: dict[int, str] = {
    401: "Invalid API key. Get one at https://my.runware.ai/keys",
    402: "Insufficient credits. Top up your account to continue.",
    429: "Too many requests: the task queue is full. Retry later.",
    500: "An unexpected error occurred on the server.",
    502: "Bad gateway.",
    503: "No capacity available to run the task right now.",
    504: "The task waited too long in the queue and timed out.",
}

_ALIASES = {"retryAfter": "retry_after", "taskType": "task_type", "dropAfterAccept": "drop_after_accept"}
_DROP_MODES = ("close", "reset")


def error_item(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """One entry of the seed ErrorResponse `errors` array; None fields are left out."""
    item: dict[str, Any] = {"code": code, "message": message}
    item.update({k: v for k, v in extra.items() if v is not None})
    return item


def status_error(status: int, code: str | None = None, message: str | None = None) -> dict[str, Any]:
    return error_item(
        code or STATUS_CODES.get(status, "unknown"),
        message or STATUS_MESSAGES.get(status, f"HTTP {status}"),
    )


def _drop_mode(value: Any) -> str | None:
    if value in (None, False):
        return None
    if value is True:
        return "close"
    if value in _DROP_MODES:
        return str(value)
    raise ValueError(f"drop must be true, 'close' or 'reset', not {value!r}")


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour for one request (`times` requests when > 1)."""

    status: int | None = None
    code: str | None = None
    message: str | None = None
    retry_after: float | str | None = None
    drop: str | None = None
    drop_after_accept: str | None = None
    delay: float = 0.0
    task_type: str | None = None
    times: int = 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Fault) -> Fault:
        if isinstance(data, Fault):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"a fault is a JSON object, not {data!r}")
        values = {_ALIASES.get(k, k): v for k, v in data.items()}
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault keys {sorted(unknown)}")
        values["drop"] = _drop_mode(values.get("drop"))
        values["drop_after_accept"] = _drop_mode(values.get("drop_after_accept"))
        fault = cls(**values)
        if fault.status is not None and not (400 <= int(fault.status) <= 599):
            raise ValueError(f"fault status must be 4xx/5xx, not {fault.status}")
        if fault.status is None and not (fault.drop or fault.drop_after_accept or fault.delay):
            raise ValueError(
                f"fault {dict(data)!r} does nothing: give status, drop, drop_after_accept or delay"
            )
        if int(fault.times) < 1:
            raise ValueError("times must be >= 1")
        return fault

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, 0.0) or k == "times"}

    def matches(self, task_types: Collection[str]) -> bool:
        return self.task_type is None or self.task_type in task_types

    @property
    def kind(self) -> str:
        """Counter key in stats: the status code, or the drop flavour."""
        if self.drop:
            return "drop" if self.drop == "close" else "drop_reset"
        if self.status is not None:
            return str(self.status)
        if self.drop_after_accept:
            return "drop_after_accept"
        return "delay"


_RATE_KEYS = ("drop", "drop_reset", "drop_after_accept")


class FaultPlan:
    """The queue and the rates; shared by the loop thread and callers, hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()
        self._rates: dict[str, float] = {}
        self._rates_task_type: str | None = None
        self._rates_retry_after: float | str | None = None
        self._seed: int | None = None
        self._rng = random.Random()

    def add(self, faults: list[Mapping[str, Any] | Fault]) -> None:
        parsed = [Fault.from_dict(f) for f in faults]
        with self._lock:
            self._queue.extend(parsed)

    def set_rates(
        self,
        rates: Mapping[str, float],
        *,
        seed: int | None = None,
        task_type: str | None = None,
        retry_after: float | str | None = None,
    ) -> None:
        clean: dict[str, float] = {}
        for key, value in rates.items():
            key = str(key)
            if key not in _RATE_KEYS and not (key.isdigit() and 400 <= int(key) <= 599):
                raise ValueError(f"rate key must be an HTTP status or one of {_RATE_KEYS}, not {key!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"rate for {key} must be within [0, 1]")
            if float(value) > 0:
                clean[key] = float(value)
        if sum(clean.values()) > 1.0 + 1e-9:
            raise ValueError("fault rates add up to more than 1")
        with self._lock:
            self._rates = clean
            self._rates_task_type = task_type
            self._rates_retry_after = retry_after
            self._seed = seed
            self._rng = random.Random(seed)

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._rates = {}
            self._rates_task_type = None
            self._rates_retry_after = None
            self._seed = None

    def next_fault(self, task_types: Collection[str]) -> Fault | None:
        """The fault for this request, consuming a queued one; None means behave."""
        with self._lock:
            for index, fault in enumerate(self._queue):
                if fault.matches(task_types):
                    if fault.times > 1:
                        self._queue[index] = replace(fault, times=fault.times - 1)
                    else:
                        del self._queue[index]
                    return replace(fault, times=1)
            if not self._rates:
                return None
            if self._rates_task_type is not None and self._rates_task_type not in task_types:
                return None
            draw = self._rng.random()
            for key in sorted(self._rates):
                draw -= self._rates[key]
                if draw < 0:
                    if key == "drop":
                        return Fault(drop="close")
                    if key == "drop_reset":
                        return Fault(drop="reset")
                    if key == "drop_after_accept":
                        return Fault(drop_after_accept="close")
                    retry_after = self._rates_retry_after if int(key) in (429, 503) else None
                    return Fault(status=int(key), retry_after=retry_after)
            return None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "queue": [f.to_dict() for f in self._queue],
                "rates": dict(self._rates),
                "rates_task_type": self._rates_task_type,
                "retry_after": self._rates_retry_after,
                "seed": self._seed,
            }
