"""The wire protocol without a server: what a user sees when Runware answers in each documented way."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from airflow_provider_zimage.exceptions import (
    ZImageAuthError,
    ZImageInsufficientCreditsError,
    ZImagePermanentError,
    ZImageTransientError,
)
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.models import ImageInferenceRequest


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_several_tasks_go_in_one_array_with_wire_names():
    reqs = [
        ImageInferenceRequest.build(
            model="runware:z-image@turbo", positive_prompt=f"a red fox {i}", width=512, height=512
        )
        for i in range(3)
    ]
    payload = protocol.inference_payload(reqs)
    assert [p["taskType"] for p in payload] == ["imageInference"] * 3
    assert {p["taskUUID"] for p in payload} == {r.task_uuid for r in reqs}
    assert all("positivePrompt" in p and "positive_prompt" not in p for p in payload)
    assert protocol.get_response_payload("abc") == [{"taskType": "getResponse", "taskUUID": "abc"}]


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "invalidParameter", ZImagePermanentError),
        (401, "invalidApiKey", ZImageAuthError),
        (403, "forbidden", ZImageAuthError),
        (402, "insufficientCredits", ZImageInsufficientCreditsError),
        (429, "rateLimitExceeded", ZImageTransientError),
        (500, "internalError", ZImageTransientError),
        (503, "serviceUnavailable", ZImageTransientError),
        (504, "timeoutProvider", ZImageTransientError),
    ],
)
def test_http_errors_become_permanent_or_transient(status, code, expected):
    err = {"errors": [{"code": code, "message": "nope", "parameter": "width", "taskUUID": "t1"}]}
    with pytest.raises(expected) as info:
        protocol.parse_response(status, body(err), {})
    assert info.value.status_code == status
    assert info.value.code == code
    assert "width" in str(info.value)
    transient = isinstance(info.value, ZImageTransientError)
    assert transient == (status >= 429)


def test_conflict_task_uuid_is_its_own_signal():
    uid = str(uuid.uuid4())
    err = {"errors": [{"code": "conflictTaskUUID", "message": "exists", "taskUUID": uid}]}
    with pytest.raises(protocol.ZImageConflictError) as info:
        protocol.parse_response(400, body(err), {})
    assert info.value.task_uuids == [uid]


def test_task_not_found_is_its_own_signal():
    err = {"errors": [{"code": "taskNotFound", "message": "unknown", "taskUUID": "x"}]}
    with pytest.raises(protocol.ZImageTaskNotFound):
        protocol.parse_response(400, body(err), {})


def test_a_non_json_200_is_a_transient_glitch():
    with pytest.raises(ZImageTransientError):
        protocol.parse_response(200, b"<html>bad gateway</html>", {})


def test_retry_after_is_read_in_seconds_and_as_a_date():
    assert protocol.parse_retry_after({"Retry-After": "7"}) == 7.0
    assert protocol.parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert protocol.parse_retry_after({}) is None
    with pytest.raises(ZImageTransientError) as info:
        protocol.parse_response(
            429, body({"errors": [{"code": "rateLimitExceeded", "message": "slow"}]}), {"Retry-After": "3"}
        )
    assert info.value.retry_after == 3.0


def test_processing_success_and_error_items_are_split():
    data = {
        "data": [
            {"taskType": "imageInference", "taskUUID": "a", "status": "processing"},
            {
                "taskType": "imageInference",
                "taskUUID": "b",
                "status": "success",
                "imageUUID": "i1",
                "imageURL": "http://x/1.jpg",
                "seed": 3,
                "cost": 0.0032,
            },
            {"taskType": "imageInference", "taskUUID": "c", "imageUUID": "i2", "imageBase64Data": "AAAA"},
            {
                "taskType": "imageInference",
                "taskUUID": "d",
                "status": "error",
                "code": "nsfwContentDetected",
                "message": "blocked",
            },
        ]
    }
    parsed = protocol.parse_response(200, body(data), {})
    assert parsed.processing == ["a"]
    assert [r.image_uuid for r in parsed.results] == ["i1", "i2"]
    assert parsed.results[0].cost == pytest.approx(0.0032)
    assert [e.code for e in parsed.errors] == ["nsfwContentDetected"]


def test_partial_results_accumulate_and_are_deduplicated_by_image_uuid():
    status = protocol.TaskStatus("t", expected_results=3)
    first = protocol.parse_response(
        200,
        body(
            {
                "data": [
                    {"taskUUID": "t", "status": "success", "imageUUID": "i1"},
                    {"taskUUID": "t", "status": "processing"},
                ]
            }
        ),
        {},
    )
    status.merge(first)
    assert not status.finished
    second = protocol.parse_response(
        200,
        body(
            {
                "data": [
                    {"taskUUID": "t", "status": "success", "imageUUID": "i1"},
                    {"taskUUID": "t", "status": "success", "imageUUID": "i2"},
                ]
            }
        ),
        {},
    )
    status.merge(second)
    assert [r.image_uuid for r in status.results] == ["i1", "i2"]
    third = protocol.parse_response(
        200,
        body({"data": [{"taskUUID": "t", "status": "success", "imageUUID": f"i{n}"} for n in (1, 2, 3)]}),
        {},
    )
    assert status.merge(third).complete
    assert len(status.results) == 3


def test_results_of_other_tasks_are_not_mixed_in():
    status = protocol.TaskStatus("mine")
    other = protocol.parse_response(
        200, body({"data": [{"taskUUID": "theirs", "status": "success", "imageUUID": "x"}]}), {}
    )
    assert not status.merge(other).results


def test_backoff_grows_with_jitter_and_caps():
    policy = protocol.RetryPolicy(max_retries=10, base_delay=0.5, max_delay=4.0)
    rng = random.Random(1)
    for attempt in range(8):
        cap = min(4.0, 0.5 * 2**attempt)
        delays = {policy.delay(attempt, rng=rng) for _ in range(50)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1  # jitter: a fleet that failed together spreads out


def test_retry_after_wins_when_longer_and_permanent_errors_are_never_retried():
    policy = protocol.RetryPolicy(max_retries=3, base_delay=0.1, max_delay=1.0)
    slow = ZImageTransientError("429", status_code=429, retry_after=9.0)
    assert policy.next_delay(0, slow) == 9.0
    assert policy.next_delay(3, slow) is None  # retries spent
    assert policy.next_delay(0, ZImagePermanentError("400")) is None
    assert policy.next_delay(0, ValueError("bug")) is None


def test_webhook_bodies_in_both_documented_shapes():
    item = {"taskUUID": "t", "imageUUID": "i"}
    assert protocol.webhook_items(item) == [item]
    assert protocol.webhook_items({"data": [item, item]}) == [item, item]
    assert protocol.webhook_items("junk") == []


def test_poll_delays_start_fast_and_back_off_to_a_cap():
    delays = protocol.poll_delays(0.5, 4.0)
    seq = [next(delays) for _ in range(10)]
    assert seq[0] == 0.5
    assert seq == sorted(seq)
    assert max(seq) == 4.0


def test_redact_removes_secrets_from_text():
    assert protocol.redact("key sk-ABCDEF leaked", ["sk-ABCDEF", None]) == "key *** leaked"
