"""ZImageHook over real HTTP against the Runware test server: auth, errors, retries, partial results."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest
from PIL import Image

from airflow_provider_zimage.exceptions import (
    ZImageAuthError,
    ZImageInsufficientCreditsError,
    ZImagePermanentError,
    ZImageTransientError,
)
from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.runware.protocol import RetryPolicy

FAST = RetryPolicy(max_retries=6, base_delay=0.01, max_delay=0.05)


def hook_for(server, *, api_key=None, retry=FAST) -> ZImageHook:
    settings = ConnectionSettings(base_url=server.url, api_key=api_key or server.api_key, retry=retry)
    return ZImageHook(settings=settings)


def request(prompt="a lighthouse at dawn", **kw) -> ImageInferenceRequest:
    base = {"model": "runware:z-image@turbo", "positive_prompt": prompt, "width": 256, "height": 256}
    return ImageInferenceRequest.build(**{**base, **kw})


def test_sync_inference_returns_real_images_of_the_requested_size(runware_server):
    hook = hook_for(runware_server)
    results = hook.infer([request(output_type="base64Data", output_format="PNG", include_cost=True)])
    assert len(results) == 1
    image = Image.open(io.BytesIO(hook.download(results[0])))
    assert (image.format, image.size) == ("PNG", (256, 256))
    assert results[0].cost and results[0].cost > 0


def test_several_tasks_in_one_post(runware_server):
    hook = hook_for(runware_server)
    reqs = [request(f"prompt number {i}") for i in range(3)]
    uuids = hook.submit(reqs)
    assert uuids == [r.task_uuid for r in reqs]
    assert runware_server.stats["requests_by_type"].get("imageInference", 0) >= 1
    assert runware_server.total_accepted == 3
    for r in reqs:
        status = hook.wait_for_task(r.task_uuid, poll_interval=0.02, timeout=10)
        assert status.complete and len(status.results) == 1


def test_wrong_api_key_fails_at_once_without_retrying_and_without_leaking_the_key(runware_server, caplog):
    hook = hook_for(runware_server, api_key="sk-wrong-secret-123")
    with caplog.at_level(logging.DEBUG), pytest.raises(ZImageAuthError) as info:
        hook.submit([request()])
    assert info.value.status_code == 401
    assert "sk-wrong-secret-123" not in str(info.value) + repr(info.value) + caplog.text
    assert "sk-wrong-secret-123" not in repr(hook) + repr(hook.settings)
    assert runware_server.stats["requests"] == 1  # no retry of a permanent error


def test_402_is_permanent_and_not_retried(runware_server):
    runware_server.fail_next(402, task_type="imageInference")
    with pytest.raises(ZImageInsufficientCreditsError):
        hook_for(runware_server).submit([request()])
    assert runware_server.total_accepted == 0


def test_400_names_the_offending_parameter(runware_server):
    # Bypass our own validation to prove the server's 400 is surfaced with the parameter named.
    bad = request().model_copy(update={"width": 100})
    with pytest.raises(ZImagePermanentError) as info:
        hook_for(runware_server).submit([bad])
    assert info.value.status_code == 400
    assert "width" in str(info.value)


@pytest.mark.parametrize("status", [429, 500, 503, 504])
def test_transient_errors_are_retried_until_they_pass(runware_server, status):
    runware_server.fail_next(status, times=2, task_type="imageInference")
    req = request()
    assert hook_for(runware_server).submit([req]) == [req.task_uuid]
    assert runware_server.accepted_submissions(req.task_uuid) == 1


def test_retries_give_up_after_the_configured_number(runware_server):
    runware_server.fail_next(503, times=10, task_type="imageInference")
    hook = hook_for(runware_server, retry=RetryPolicy(max_retries=2, base_delay=0.01, max_delay=0.02))
    with pytest.raises(ZImageTransientError):
        hook.submit([request()])
    assert runware_server.stats["requests"] == 3


def test_retry_after_header_is_honoured(runware_server):
    import time

    runware_server.fail_next(429, task_type="imageInference", retry_after=0.3)
    started = time.monotonic()
    hook_for(runware_server).submit([request()])
    assert time.monotonic() - started >= 0.3


def test_a_dropped_answer_after_acceptance_is_not_paid_twice(runware_server):
    runware_server.drop_next(after_accept=True, task_type="imageInference")
    req = request()
    assert hook_for(runware_server).submit([req]) == [req.task_uuid]
    # The re-sent POST was answered conflictTaskUUID, which means "it landed": one paid submission.
    assert runware_server.accepted_submissions(req.task_uuid) == 1
    status = hook_for(runware_server).wait_for_task(req.task_uuid, poll_interval=0.02, timeout=10)
    assert status.complete


def test_a_dropped_connection_before_acceptance_is_retried(runware_server):
    runware_server.drop_next(task_type="imageInference")
    req = request()
    hook_for(runware_server).submit([req])
    assert runware_server.accepted_submissions(req.task_uuid) == 1


def test_partial_results_arrive_one_by_one_and_are_deduplicated(runware_server):
    runware_server.configure(delay=0.05, stagger=0.1)
    hook = hook_for(runware_server)
    req = request(number_results=3)
    hook.submit([req])
    seen = []
    from airflow_provider_zimage.runware.protocol import TaskStatus

    status = TaskStatus(req.task_uuid, 3)
    while not status.complete:
        hook.get_response(req.task_uuid, status)
        seen.append(len(status.results))
    assert seen[0] < 3  # some polls saw only part of the images
    assert len({r.image_uuid for r in status.results}) == 3 == len(status.results)
    assert len({r.seed for r in status.results}) == 3


def test_a_task_that_fails_at_runware_is_reported_as_failed(runware_server):
    hook = hook_for(runware_server)
    req = request("this one will __fail__ at runware")
    hook.submit([req])
    status = hook.wait_for_task(req.task_uuid, poll_interval=0.02, timeout=10)
    assert status.failed and not status.complete
    with pytest.raises(ZImagePermanentError, match="taskFailed"):
        hook.infer([request("sync __fail__ too")])


def test_url_results_are_downloaded(runware_server):
    hook = hook_for(runware_server)
    (result,) = hook.infer([request(output_format="WEBP")])
    assert result.image_url
    image = Image.open(io.BytesIO(hook.download(result)))
    assert (image.format, image.size) == ("WEBP", (256, 256))


def test_async_path_behaves_like_the_sync_path(runware_server):
    hook = hook_for(runware_server)
    runware_server.fail_next(500, task_type="getResponse")

    async def go():
        req = request(number_results=2)
        await hook.asubmit([req])
        status = await hook.await_task(req.task_uuid, 2, poll_interval=0.02, timeout=10)
        data = [await hook.adownload(r) for r in status.results]
        return req, status, data

    req, status, data = asyncio.run(go())
    assert status.complete and len(data) == 2
    assert all(Image.open(io.BytesIO(d)).size == (256, 256) for d in data)
    assert runware_server.accepted_submissions(req.task_uuid) == 1


def test_test_connection_reports_a_good_and_a_bad_key(runware_server):
    ok, message = hook_for(runware_server).test_connection()
    assert ok, message
    ok, message = hook_for(runware_server, api_key="bad-key-999").test_connection()
    assert not ok and "bad-key-999" not in message
    assert runware_server.total_accepted == 0  # checking a key costs nothing


def test_connection_from_airflow(zimage_conn):
    hook = ZImageHook()
    assert hook.settings.base_url == zimage_conn.url
    assert hook.test_connection()[0]


def test_connection_uri_forms():
    from airflow.sdk import Connection

    conn = Connection(conn_id="x", conn_type="zimage", host="api.runware.ai", schema="v1", password="k")
    assert ConnectionSettings.from_connection(conn).base_url == "https://api.runware.ai/v1"
    conn = Connection(conn_id="x", conn_type="zimage", password="k")
    assert ConnectionSettings.from_connection(conn).base_url == "https://api.runware.ai/v1"
    conn = Connection(
        conn_id="x",
        conn_type="zimage",
        password="k",
        extra='{"extra__zimage__max_retries": "2", "backend": "local"}',
    )
    settings = ConnectionSettings.from_connection(conn)
    assert settings.retry.max_retries == 2 and settings.backend == "local"
