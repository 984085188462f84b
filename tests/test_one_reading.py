"""Issue 10's defects, each as the story a user would tell: every path reads Runware's answers the
same way, and none of them pays twice or loses a paid image."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from airflow_provider_zimage.compat import AirflowException, AirflowFailException, TaskDeferred
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.jobs.ledger import STATE_FILE, Ledger, LedgerStore, Submission, job_fingerprint
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.sensors.task import ZImageTaskSensor
from airflow_provider_zimage.storage.artifacts import ArtifactStore
from airflow_provider_zimage.triggers.task import MAX_EVENT_BYTES, ZImageTaskTrigger
from tests.conftest import zimage_connection_json
from tests.dagtest import FakeTI


def generate(output_dir, **kwargs) -> ZImageGenerateOperator:
    base = {"task_id": "generate", "prompt": "a teapot on a desk", "width": 256, "height": 256, "seed": 7}
    return ZImageGenerateOperator(output_path=output_dir, poll_interval=0.02, **{**base, **kwargs})


def run_try(op: ZImageGenerateOperator, ti: FakeTI):
    """One try of a task as Airflow runs it: execute, and if it defers, the trigger then execute_complete."""
    context = {"ti": ti}
    try:
        return op.execute(context)
    except TaskDeferred as deferred:
        events = asyncio.run(_events(deferred.trigger))
        assert len(events) == 1
        return op.execute_complete(context, events[0].payload)


async def _events(trigger):
    return [event async for event in trigger.run()]


def ledger_of(output_dir: str, ti: FakeTI) -> dict:
    root = Path(output_dir.removeprefix("file://"))
    (path,) = [p for p in root.rglob(STATE_FILE) if f"/{ti.dag_id}/" in str(p)]
    return json.loads(path.read_text())


# -- 1. an auth error while deferred never pays again -----------------------------------------------


def test_an_auth_outage_while_deferred_then_a_clear_stores_the_image_without_paying_again(
    zimage_conn, output_dir
):
    zimage_conn.configure(delay=0.4)
    ti = FakeTI("manual__auth_outage")
    op = generate(output_dir, deferrable=True, defer_after=0)
    zimage_conn.fail_next(401, times=100, task_type="getResponse", code="invalidApiKey")
    with pytest.raises(AirflowFailException, match="clearing the task reattaches"):
        run_try(op, ti)
    (submission,) = ledger_of(output_dir, ti)["submissions"].values()
    assert submission["status"] == "submitted"  # not "failed": the next try must reattach

    zimage_conn.clear_faults()
    images = run_try(generate(output_dir, deferrable=True, defer_after=0), ti)  # the user clears the task
    assert len(images) == 1
    assert zimage_conn.stats["total_accepted"] == 1
    assert zimage_conn.accepted_submissions(images[0]["task_uuid"]) == 1


@pytest.mark.parametrize("status", [401, 402, 403, 400])
def test_a_poll_level_error_never_marks_the_ledger_failed(zimage_conn, output_dir, status):
    ti = FakeTI(f"manual__poll_{status}")
    zimage_conn.configure(delay=0.2)
    zimage_conn.fail_next(status, times=100, task_type="getResponse")
    with pytest.raises(AirflowException):
        run_try(generate(output_dir), ti)
    (submission,) = ledger_of(output_dir, ti)["submissions"].values()
    assert submission["status"] == "submitted"


def test_a_key_rotated_in_airflow_while_a_task_waits_is_picked_up_by_the_trigger(
    runware_server_factory, monkeypatch
):
    """500 tasks waiting must not need a triggerer restart after the key is rotated."""
    server = runware_server_factory(api_key="old-key", delay=0.3)
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", zimage_connection_json(server))
    request = ImageInferenceRequest.build(
        model="turbo", positive_prompt="a rotated key", width=256, height=256
    )
    ZImageHook().submit([request])

    async def rotate_then_wait():
        trigger = ZImageTaskTrigger(
            task_uuid=request.task_uuid, deadline=time.time() + 20, poll_interval=0.05
        )
        waiting = asyncio.ensure_future(_events(trigger))
        await asyncio.sleep(0.1)
        server.configure(api_key="new-key")  # the account's key changes...
        rotated = json.loads(zimage_connection_json(server))
        rotated["password"] = "new-key"  # ...and the Airflow connection with it
        monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(rotated))
        return await waiting

    events = asyncio.run(rotate_then_wait())
    assert events[0].payload["outcome"] == "store"


# -- 2. changing how the bytes travel pays nothing ---------------------------------------------------


def test_changing_only_delivery_options_on_the_same_run_pays_nothing(zimage_conn, output_dir):
    ti = FakeTI("manual__delivery_changes")
    first = run_try(generate(output_dir), ti)
    for change in (
        {"output_type": "base64Data"},
        {"output_type": "URL"},
        {"output_format": "JPG"},
        {"include_cost": False},
        {"ttl": 3600},
        {"output_quality": 95},
    ):
        again = run_try(generate(output_dir, **change), ti)
        assert again == first, change
    assert zimage_conn.stats["total_accepted"] == 1


def test_upgrading_from_0_1_0_finds_its_recorded_submission_and_pays_nothing(zimage_conn, output_dir):
    """A ledger written by 0.1.0 (under its fingerprint) is reattached to, not submitted again."""
    ti = FakeTI("manual__upgrade")
    op = generate(output_dir)
    request = op.build_request()
    (legacy,) = request.legacy_fingerprints()
    old_fp = job_fingerprint(legacy, backend="runware", origin="zimage_default")
    submitted = request.model_copy(update={"task_uuid": "0c1b4c8e-7d25-4a8e-9a53-0d6f7e1e9b10"})
    ZImageHook().submit([submitted])  # what 0.1.0 paid for before the upgrade
    directory = ArtifactStore(output_dir).task_dir(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    ledger = Ledger(ti.dag_id, ti.task_id, ti.run_id, ti.map_index)
    ledger.submissions[old_fp] = Submission(old_fp, 0, submitted.task_uuid, "submitted")
    LedgerStore(directory).save(ledger)

    (image,) = run_try(op, ti)
    assert image["task_uuid"] == submitted.task_uuid
    assert zimage_conn.stats["total_accepted"] == 1


# -- 4. a missing API key is permanent ----------------------------------------------------------------


def test_an_empty_api_key_fails_for_good_and_names_the_connection(runware_server, monkeypatch, output_dir):
    conn = json.loads(zimage_connection_json(runware_server))
    conn["password"] = ""
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(conn))
    with pytest.raises(AirflowFailException, match="'zimage_default' has no API key") as info:
        generate(output_dir).execute({"ti": FakeTI("manual__nokey")})
    assert "may retry" not in str(info.value)
    assert runware_server.stats["requests"] == 0


# -- 6. the sensor reads the format from the bytes -----------------------------------------------------


def test_the_sensor_stores_a_png_task_under_its_real_format(zimage_conn, output_dir):
    request = ImageInferenceRequest.build(
        model="turbo", positive_prompt="a png", width=256, height=256, output_format="PNG"
    )
    ZImageHook().submit([request])
    sensor = ZImageTaskSensor(
        task_id="wait", task_uuid=request.task_uuid, output_path=output_dir, poke_interval=0.05, timeout=10
    )
    (image,) = sensor.execute({"ti": FakeTI("manual__png", task_id="wait")})
    assert image["format"] == "png" and image["uri"].endswith(".png")
    assert Path(image["uri"].removeprefix("file://")).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_storage_failure_after_payment_is_retryable_and_the_retry_pays_nothing(
    zimage_conn, output_dir, monkeypatch
):
    from airflow_provider_zimage.storage.artifacts import ArtifactStore, ZImageStorageError

    ti = FakeTI("manual__storage_down")
    real = ArtifactStore.write_image

    def broken(*args, **kwargs):
        raise ZImageStorageError("the bucket is unreachable")

    monkeypatch.setattr(ArtifactStore, "write_image", broken)
    with pytest.raises(AirflowException, match="a retry reattaches") as info:
        run_try(generate(output_dir), ti)
    assert not isinstance(info.value, AirflowFailException)
    monkeypatch.setattr(ArtifactStore, "write_image", real)
    assert len(run_try(generate(output_dir), ti)) == 1
    assert zimage_conn.stats["total_accepted"] == 1


# -- 7. messages say what was tried ------------------------------------------------------------------


def test_a_host_without_a_scheme_names_the_url_it_tried(runware_server, monkeypatch):
    conn = json.loads(zimage_connection_json(runware_server, max_retries=0))
    conn["host"] = runware_server.url.removeprefix("http://")
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(conn))
    with pytest.raises(Exception) as info:
        ZImageHook().get_response("0c1b4c8e-7d25-4a8e-9a53-0d6f7e1e9b10")
    message = str(info.value)
    assert f"https://{conn['host']}" in message
    assert "no scheme" in message and "http://" in message
    assert runware_server.api_key not in message


def test_a_validation_error_says_invalid_once(zimage_conn, output_dir):
    with pytest.raises(AirflowFailException) as info:
        generate(output_dir, width=100).execute({"ti": FakeTI()})
    assert str(info.value).lower().count("invalid z-image request") == 1


# -- the outcome table in practice ---------------------------------------------------------------------


@pytest.mark.parametrize("code", ["rateLimitExceeded", "timeoutProvider"])
def test_a_task_level_transient_code_retries_and_reattaches(zimage_conn, output_dir, code):
    ti = FakeTI(f"manual__transient_{code}")
    with pytest.raises(AirflowException) as info:
        run_try(generate(output_dir, prompt=f"a transient failure __fail:{code}__"), ti)
    assert not isinstance(info.value, AirflowFailException)
    (submission,) = ledger_of(output_dir, ti)["submissions"].values()
    assert submission["status"] == "submitted"


def test_a_task_runware_failed_fails_for_good_and_moves_to_a_new_generation(zimage_conn, output_dir):
    ti = FakeTI("manual__task_failed")
    with pytest.raises(AirflowFailException, match="failed"):
        run_try(generate(output_dir, prompt="a failure __fail__"), ti)
    (submission,) = ledger_of(output_dir, ti)["submissions"].values()
    assert submission["status"] == "failed"


def test_the_deadline_is_measured_from_the_first_submission(zimage_conn, output_dir):
    """A retry that reattaches gets what is left of `timeout`, not a fresh one."""
    zimage_conn.configure(delay=30)
    ti = FakeTI("manual__deadline")
    op = generate(output_dir, timeout=0.5, deferrable=True, defer_after=0)
    with pytest.raises(AirflowException, match="deadline"):
        run_try(op, ti)
    (submission,) = ledger_of(output_dir, ti)["submissions"].values()
    assert submission["submitted_at"] is not None
    try:
        op.execute({"ti": ti})
    except TaskDeferred as deferred:  # pragma: no cover - would mean a fresh timeout
        pytest.fail(f"a retry got a fresh deadline: {deferred.trigger.deadline - time.time():.1f}s left")
    except AirflowException as exc:
        assert "deadline" in str(exc)
    assert zimage_conn.stats["total_accepted"] == 1


# -- small trigger events ------------------------------------------------------------------------------


def test_trigger_events_carry_no_image_bytes_and_the_worker_fetches_them(zimage_conn, output_dir):
    zimage_conn.configure(delay=2)  # still generating when the operator looks before deferring
    ti = FakeTI("manual__base64")
    op = generate(
        output_dir, deferrable=True, defer_after=0, output_type="base64Data", width=1024, height=1024
    )
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": ti})
    (event,) = asyncio.run(_events(deferred.value.trigger))
    payload = json.dumps(event.payload)
    assert "imageBase64Data" not in payload and len(payload) < MAX_EVENT_BYTES
    assert event.payload["refetch"] is True
    (image,) = op.execute_complete({"ti": ti}, event.payload)
    assert image["bytes"] > 0 and Path(image["uri"].removeprefix("file://")).exists()
    assert zimage_conn.stats["total_accepted"] == 1


# -- fast images never defer ---------------------------------------------------------------------------


def test_a_fast_image_is_stored_without_deferring(zimage_conn, output_dir):
    zimage_conn.configure(delay=0.2)
    op = generate(output_dir, deferrable=True, defer_after=3)
    images = op.execute({"ti": FakeTI("manual__fast")})  # TaskDeferred here would fail the test
    assert len(images) == 1


def test_a_slow_image_defers_after_defer_after_seconds(zimage_conn, output_dir):
    zimage_conn.configure(delay=5)
    op = generate(output_dir, deferrable=True, defer_after=0.3)
    started = time.monotonic()
    with pytest.raises(TaskDeferred):
        op.execute({"ti": FakeTI("manual__slow")})
    assert 0.3 <= time.monotonic() - started < 3


# -- downloads only from image hosts ------------------------------------------------------------------


def test_a_result_url_off_the_allowed_hosts_is_never_fetched(zimage_conn):
    from airflow_provider_zimage.exceptions import ZImagePermanentError
    from airflow_provider_zimage.runware.models import ImageResult

    result = ImageResult.from_wire(
        {
            "taskUUID": "0c1b4c8e-7d25-4a8e-9a53-0d6f7e1e9b10",
            "imageUUID": "x",
            "imageURL": "http://169.254.169.254/latest",
        }
    )
    with pytest.raises(ZImagePermanentError, match="allowed_image_hosts"):
        ZImageHook().download(result)
    assert zimage_conn.stats["requests"] == 0


def test_a_redirect_off_the_allowed_hosts_is_refused(zimage_conn, monkeypatch):
    import httpx

    from airflow_provider_zimage.exceptions import ZImagePermanentError
    from airflow_provider_zimage.runware.models import ImageResult

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://10.0.0.1/admin"})

    hook = ZImageHook()
    hook._client = httpx.Client(transport=httpx.MockTransport(handler))
    result = ImageResult.from_wire(
        {
            "taskUUID": "0c1b4c8e-7d25-4a8e-9a53-0d6f7e1e9b10",
            "imageUUID": "x",
            "imageURL": f"{zimage_conn.url}/img.jpg",
        }
    )
    with pytest.raises(ZImagePermanentError, match="10.0.0.1"):
        hook.download(result)


# -- a batched poll refused as a whole ------------------------------------------------------------------


def test_a_batch_refused_as_a_whole_is_asked_again_task_by_task(zimage_conn):
    from airflow_provider_zimage.triggers.polling import BatchPoller

    requests = [
        ImageInferenceRequest.build(model="turbo", positive_prompt=f"batch {i}", width=256, height=256)
        for i in range(3)
    ]
    ZImageHook().submit(requests)

    async def poll_all():
        poller = BatchPoller("zimage_default")
        zimage_conn.fail_next(400, times=1, task_type="getResponse")  # the whole batch, once
        return await asyncio.gather(*(poller.poll(r.task_uuid) for r in requests))

    answers = asyncio.run(poll_all())
    assert all(answer.results for answer in answers)


def test_a_deferred_trigger_holds_a_fast_answer_for_the_settle_time(zimage_conn, output_dir, monkeypatch):
    """Airflow 3.3 fails a task whose trigger fires before the scheduler saw the deferral: hold it."""
    monkeypatch.setenv("AIRFLOW__ZIMAGE__DEFERRAL_SETTLE_SECONDS", "0.8")
    zimage_conn.configure(delay=0.3)
    op = generate(output_dir, deferrable=True, defer_after=0)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute({"ti": FakeTI("manual__settle")})
    started = time.monotonic()
    (event,) = asyncio.run(_events(deferred.value.trigger))
    assert event.payload["outcome"] == "store"
    assert time.monotonic() - started >= 0.5
