"""A deferred task's trigger lives in the metadata DB as `serialize()` wrote it: an upgrade must read it.

The expected tuples below were captured from the 0.2 code (before the triggers shared their
serialization); they are literals on purpose, so a refactoring that renames a key, drops one or moves a
class fails here instead of leaving deferred tasks that no triggerer can re-create.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from airflow_provider_zimage.triggers.batch import ZImageBatchTrigger
from airflow_provider_zimage.triggers.task import ZImageTaskTrigger

TASK_KWARGS: dict[str, Any] = {
    "task_uuid": "0b0d9a0e-5c2f-4d3e-9a51-1f0e2c3d4b5a",
    "zimage_conn_id": "zimage_eu",
    "expected_results": 2,
    "deadline": 1767225600.5,
    "poll_interval": 0.5,
    "max_poll_interval": 4.0,
    "max_consecutive_errors": 3,
    "webhook_inbox": "s3://bucket/inbox",
    "poll_after": 1767222060.0,
    "inbox_interval": 0.25,
    "not_before": 1767222010.0,
}
BATCH_KWARGS: dict[str, Any] = {
    "task_uuids": {"a1": 1, "b2": 3},
    "zimage_conn_id": "zimage_eu",
    "deadline": 1767225600.5,
    "poll_interval": 0.5,
    "max_poll_interval": 4.0,
    "max_consecutive_errors": 3,
    "webhook_inbox": "file:///tmp/inbox",
    "poll_after": 1767222060.0,
    "inbox_interval": 2.0,
    "not_before": 1767222010.0,
}

# What the 0.2 code wrote, key order included.
SERIALIZED_0_2: list[tuple[Any, tuple[str, dict[str, Any]]]] = [
    (
        ZImageTaskTrigger(**TASK_KWARGS),
        ("airflow_provider_zimage.triggers.task.ZImageTaskTrigger", dict(TASK_KWARGS)),
    ),
    (
        ZImageTaskTrigger(task_uuid="u", deadline=100.0),
        (
            "airflow_provider_zimage.triggers.task.ZImageTaskTrigger",
            {
                "task_uuid": "u",
                "zimage_conn_id": "zimage_default",
                "expected_results": 1,
                "deadline": 100.0,
                "poll_interval": 1.0,
                "max_poll_interval": 10.0,
                "max_consecutive_errors": 5,
                "webhook_inbox": None,
                "poll_after": 0.0,
                "inbox_interval": 0.25,
                "not_before": 0.0,
            },
        ),
    ),
    (
        ZImageBatchTrigger(**BATCH_KWARGS),
        ("airflow_provider_zimage.triggers.batch.ZImageBatchTrigger", dict(BATCH_KWARGS)),
    ),
    (
        ZImageBatchTrigger(task_uuids={"a1": 1}, deadline=100.0),
        (
            "airflow_provider_zimage.triggers.batch.ZImageBatchTrigger",
            {
                "task_uuids": {"a1": 1},
                "zimage_conn_id": "zimage_default",
                "deadline": 100.0,
                "poll_interval": 1.0,
                "max_poll_interval": 10.0,
                "max_consecutive_errors": 5,
                "webhook_inbox": None,
                "poll_after": 0.0,
                "inbox_interval": 1.0,
                "not_before": 0.0,
            },
        ),
    ),
]


@pytest.mark.parametrize(("trigger", "expected"), SERIALIZED_0_2)
def test_a_trigger_serializes_exactly_as_0_2_did(trigger: Any, expected: tuple[str, dict[str, Any]]) -> None:
    classpath, kwargs = trigger.serialize()
    assert classpath == expected[0]
    assert list(kwargs.items()) == list(expected[1].items())


@pytest.mark.parametrize(("trigger", "expected"), SERIALIZED_0_2)
def test_a_trigger_stored_by_0_2_is_recreated_by_the_triggerer(
    trigger: Any, expected: tuple[str, dict[str, Any]]
) -> None:
    """What the triggerer does with a row of the trigger table: import the classpath, call it."""
    classpath, kwargs = expected
    module, _, name = classpath.rpartition(".")
    recreated = getattr(importlib.import_module(module), name)(**kwargs)
    assert type(recreated) is type(trigger)
    assert recreated.serialize() == expected
