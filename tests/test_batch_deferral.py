"""When a batch defers, and what its deferral costs: the settle window against Airflow's deferral race.

A deferred trigger holds an answer that comes within `[zimage] deferral_settle_seconds` of the
deferral (apache/airflow#66374: the scheduler may process the deferring try's exit after the trigger
resumed the task, and fail it). Nothing a trigger can read tells it the scheduler has processed that
exit, so the hold stays; these tests pin down that it is paid only inside the window, and that a
batch with the default settings does not defer into a window it would then wait out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from airflow_provider_zimage.compat import TaskDeferred
from airflow_provider_zimage.triggers.batch import ZImageBatchTrigger
from tests.dagtest import FakeTI
from tests.test_batch import batch, one_submission_each, rows


async def _first_event(trigger: ZImageBatchTrigger) -> Any:
    async for event in trigger.run():
        return event
    raise AssertionError("the trigger sent no event")


def test_a_batch_ready_inside_the_settle_window_is_stored_without_deferring(
    zimage_conn, output_dir, monkeypatch
):
    """Ready 5.6 s after submission: past the old 5 s in-process wait, so the batch used to defer and
    its trigger held the answers until 10 s (here 2 s) after the deferral. A deferral cannot hand the
    answers back sooner than that, so the default waits that window out on the worker instead."""
    monkeypatch.setenv("AIRFLOW__ZIMAGE__DEFERRAL_SETTLE_SECONDS", "2")
    zimage_conn.configure(delay=5.6)
    summary = batch(output_dir, rows(3), deferrable=True).execute({"ti": FakeTI("manual__ready_soon")})
    assert summary["images"] == 3  # a TaskDeferred above is the old behaviour
    one_submission_each(zimage_conn, 3)


def test_a_batch_still_defers_and_an_answer_after_the_window_is_not_held(
    zimage_conn, output_dir, monkeypatch
):
    """A slow batch still frees its worker (after 5 s plus the window), and its trigger, whose answers
    come after the window, sends them at once: the window is measured from the deferral."""
    monkeypatch.setenv("AIRFLOW__ZIMAGE__DEFERRAL_SETTLE_SECONDS", "0.5")
    zimage_conn.configure(delay=7.5)
    started = time.monotonic()
    with pytest.raises(TaskDeferred) as deferred:
        batch(output_dir, rows(2), deferrable=True).execute({"ti": FakeTI("manual__slow_batch")})
    deferred_after = time.monotonic() - started
    assert 5.5 <= deferred_after < 7.0, deferred_after
    trigger = deferred.value.trigger
    assert isinstance(trigger, ZImageBatchTrigger)
    assert trigger.not_before <= time.time() + 0.5
    event = asyncio.run(_first_event(trigger))
    fired_after = time.monotonic() - started
    assert event.payload["pending"] == 0 and event.payload["error"] is None
    assert fired_after < 7.5 + 1.5, fired_after  # the answers' time and a poll, no hold on top


def test_a_deferred_batch_holds_an_early_answer_until_the_window_after_its_deferral(
    zimage_conn, output_dir, monkeypatch
):
    """The race guard, for batches: answers ready 0.2 s after the deferral are sent 1.5 s after it."""
    monkeypatch.setenv("AIRFLOW__ZIMAGE__DEFERRAL_SETTLE_SECONDS", "1.5")
    zimage_conn.configure(delay=0.2)
    with pytest.raises(TaskDeferred) as deferred:
        batch(output_dir, rows(2), deferrable=True, defer_after=0).execute({"ti": FakeTI("manual__held")})
    deferred_at = time.monotonic()
    event = asyncio.run(_first_event(deferred.value.trigger))
    assert event.payload["pending"] == 0
    assert time.monotonic() - deferred_at >= 1.4


def test_an_explicit_defer_after_is_kept(zimage_conn, output_dir, monkeypatch):
    """`defer_after` given: the batch defers then, whatever the window (0 defers at once)."""
    monkeypatch.setenv("AIRFLOW__ZIMAGE__DEFERRAL_SETTLE_SECONDS", "30")
    zimage_conn.configure(delay=5)
    started = time.monotonic()
    with pytest.raises(TaskDeferred):
        batch(output_dir, rows(2), deferrable=True, defer_after=0.3).execute(
            {"ti": FakeTI("manual__explicit")}
        )
    assert time.monotonic() - started < 3


def test_a_negative_defer_after_is_refused_naming_it(output_dir):
    with pytest.raises(ValueError, match="defer_after must be >= 0"):
        batch(output_dir, rows(1), deferrable=True, defer_after=-1)


def test_a_batch_still_receiving_answers_does_not_defer_between_them(zimage_conn, output_dir):
    """`defer_after` counts from the last answer, not from the start: a batch whose images arrive one
    every 0.8 s is storing, not waiting, so a deferral would only hold the next answers in a trigger."""
    requests = [
        {"prompt": f"staggered shot {i} __delay:{0.6 + 0.8 * i:.1f}__", "seed": 7 + i} for i in range(4)
    ]
    started = time.monotonic()
    summary = batch(output_dir, requests, deferrable=True, defer_after=1.2).execute(
        {"ti": FakeTI("manual__staggered")}
    )
    assert summary["images"] == 4  # a TaskDeferred above is the old behaviour (deferred at 1.2 s)
    assert time.monotonic() - started >= 3.0  # the last answer came at 3 s: it waited for it
    one_submission_each(zimage_conn, 4)
