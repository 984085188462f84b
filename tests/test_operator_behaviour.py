"""What a DAG author notices: bad input fails fast and free, failures are final or retried as they should,
NSFW and cost policies hold, and the sensor stores like the operator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from airflow_provider_zimage.compat import AirflowException, AirflowFailException
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
from tests.dagtest import FakeTI, run_dag, task_states


def generate(output_dir, **kwargs) -> ZImageGenerateOperator:
    base = {"task_id": "generate", "prompt": "a teapot on a desk", "width": 256, "height": 256}
    return ZImageGenerateOperator(output_path=output_dir, poll_interval=0.02, **{**base, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"width": 100}, "width"),
        ({"width": 2064, "height": 512}, "width"),
        ({"prompt": "x" * 3001}, "positivePrompt"),
        ({"prompt": "x"}, "positivePrompt"),
        ({"cfg_scale": 25}, "CFGScale"),
        ({"scheduler": "NotAScheduler"}, "scheduler"),
        ({"output_format": "GIF"}, "outputFormat"),
        ({"number_results": 21}, "numberResults"),
        ({"model": "runware:twinflow-z-image-turbo@0", "seed_image": "aGVsbG8="}, "seedImage"),
        ({"acceleration": "high"}, "acceleration"),
        ({"model": "sdxl"}, "model"),
    ],
)
def test_bad_input_fails_before_any_call_naming_the_parameter(zimage_conn, output_dir, kwargs, parameter):
    with pytest.raises(AirflowFailException) as info:
        generate(output_dir, **kwargs).execute({"ti": FakeTI()})
    assert parameter in str(info.value)
    assert zimage_conn.stats["requests"] == 0  # not one request, not one cent


def test_max_cost_refuses_before_submitting(zimage_conn, output_dir):
    op = generate(output_dir, width=2048, height=2048, number_results=20, max_cost_usd=0.01)
    with pytest.raises(AirflowFailException, match="max_cost_usd"):
        op.execute({"ti": FakeTI()})
    assert zimage_conn.stats["requests"] == 0


def test_cost_is_recorded_per_image_and_in_total(zimage_conn, output_dir):
    images = generate(output_dir, number_results=2).execute({"ti": FakeTI()})
    assert len(images) == 2 and all(i["cost"] > 0 for i in images)
    manifest_path = Path(images[0]["uri"].removeprefix("file://")).parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["total_cost"] == pytest.approx(sum(i["cost"] for i in images))


@pytest.mark.parametrize("policy", ["fail", "skip", "keep"])
def test_nsfw_policy(zimage_conn, output_dir, policy):
    op = generate(output_dir, prompt="a statue __nsfw__", on_nsfw=policy)
    if policy == "fail":
        with pytest.raises(AirflowFailException, match="NSFW"):
            op.execute({"ti": FakeTI()})
        return
    images = op.execute({"ti": FakeTI()})
    assert len(images) == (0 if policy == "skip" else 1)
    if images:
        assert images[0]["nsfw"] is True


def test_a_task_failed_at_runware_fails_and_a_rerun_pays_for_a_new_generation(zimage_conn, output_dir):
    op = generate(output_dir, prompt="this will __fail__")
    with pytest.raises(AirflowFailException, match="failed"):
        op.execute({"ti": FakeTI()})
    with pytest.raises(AirflowFailException):
        op.execute({"ti": FakeTI()})
    accepted = zimage_conn.stats["accepted"]
    assert len(accepted) == 2 and set(accepted.values()) == {1}  # two generations, two taskUUIDs


def test_a_wrong_api_key_fails_without_retries_and_never_shows_the_key(
    runware_server, output_dir, monkeypatch, caplog
):
    from tests.conftest import zimage_connection_json

    conn = json.loads(zimage_connection_json(runware_server))
    conn["password"] = "sk-live-TOPSECRET-42"
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(conn))
    with pytest.raises(AirflowFailException) as info:
        generate(output_dir).execute({"ti": FakeTI()})
    assert "401" in str(info.value)
    assert "TOPSECRET" not in str(info.value) + caplog.text
    assert runware_server.stats["requests"] == 1


def test_a_transient_outage_that_outlasts_the_retries_leaves_it_to_airflow_retries(zimage_conn, output_dir):
    zimage_conn.fail_next(503, times=100, task_type="imageInference")
    with pytest.raises(AirflowException) as info:
        generate(output_dir).execute({"ti": FakeTI()})
    assert not isinstance(info.value, AirflowFailException)
    zimage_conn.clear_faults()
    images = generate(output_dir).execute({"ti": FakeTI()})  # Airflow's retry
    assert len(images) == 1 and zimage_conn.total_accepted == 1


def test_no_xcom_besides_the_return_value_is_pushed_for_the_extra_link(zimage_conn, output_dir):
    """Airflow stores the link under its own key; a second copy was a duplicate XCom per task."""
    ti = FakeTI()
    generate(output_dir).execute({"ti": ti})
    assert ti.xcom == {}


def test_no_secret_in_xcom_or_rendered_template_fields(zimage_conn, output_dir):
    ti = FakeTI()
    op = generate(output_dir)
    images = op.execute({"ti": ti})
    dumped = json.dumps(images) + json.dumps({k: str(getattr(op, k)) for k in op.template_fields})
    assert zimage_conn.api_key not in dumped
    manifest = (Path(images[0]["uri"].removeprefix("file://")).parent / "manifest.json").read_text()
    assert zimage_conn.api_key not in manifest


# -- through real DAG runs ----------------------------------------------------------------------------

RETRYING_DAG = """
import pendulum
from datetime import timedelta
from airflow.sdk import DAG
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageGenerateOperator(
        task_id="generate", output_path=PARAMS["output"], retries=3, retry_delay=timedelta(seconds=0),
        poll_interval=0.02, **PARAMS["op_kwargs"],
    )
"""


@pytest.mark.usefixtures("airflow_db")
def test_an_invalid_request_in_a_dag_with_retries_fails_once_and_spends_nothing(zimage_conn, output_dir):
    run = run_dag(
        "invalid_once",
        RETRYING_DAG,
        dag_id="invalid_once",
        output=output_dir,
        op_kwargs={"prompt": "ok prompt", "width": 130, "height": 128},
    )
    assert run.state == "failed"
    assert task_states(run) == {"generate[-1]": "failed"}
    assert zimage_conn.stats["requests"] == 0


SENSOR_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
from airflow_provider_zimage.sensors.task import ZImageTaskSensor

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    submit = ZImageGenerateOperator(
        task_id="submit", prompt="a lighthouse", width=256, height=256, number_results=2,
        output_path=PARAMS["output"], wait_for_completion=False,
    )
    wait = ZImageTaskSensor(
        task_id="wait", task_uuid="{{ ti.xcom_pull(task_ids='submit') }}", expected_results=2,
        output_path=PARAMS["output"], poke_interval=0.05, timeout=60, **PARAMS["sensor_kwargs"],
    )
    submit >> wait
"""


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize(
    "sensor_kwargs",
    [{"mode": "poke"}, {"mode": "reschedule"}, {"deferrable": True}],
    ids=["poke", "reschedule", "deferrable"],
)
def test_the_sensor_waits_for_a_task_submitted_elsewhere_and_stores_it(
    zimage_conn, output_dir, sensor_kwargs
):
    zimage_conn.configure(delay=0.2)
    name = "sensor_" + "_".join(f"{k}{v}" for k, v in sensor_kwargs.items())
    run = run_dag(name, SENSOR_DAG, dag_id=name, output=output_dir, sensor_kwargs=sensor_kwargs)
    assert run.state == "success", task_states(run)
    manifests = list(Path(output_dir.removeprefix("file://")).rglob("wait/*/manifest.json"))
    assert len(manifests) == 1
    images = json.loads(manifests[0].read_text())["images"]
    assert len(images) == 2
    for image in images:
        data = Path(image["uri"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["sha256"]
    assert zimage_conn.total_accepted == 1


S3_DAG = """
import pendulum
from airflow.sdk import DAG, Asset
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageGenerateOperator.partial(
        task_id="generate", width=256, height=256, output_path=PARAMS["output"], deferrable=True,
        poll_interval=0.02, output_format="PNG", outlets=[Asset("zimage://catalog")],
    ).expand(prompt=["an s3 fox", "an s3 owl", "an s3 bear"])
"""


@pytest.mark.usefixtures("airflow_db")
def test_images_land_in_s3_with_manifests_whose_hashes_match(zimage_conn, s3_bucket):
    bucket = s3_bucket
    output = f"s3://moto_s3@{bucket}/zimage"
    run = run_dag("s3_dag", S3_DAG, dag_id="s3_dag", output=output)
    assert run.state == "success", task_states(run)
    from airflow.sdk import ObjectStoragePath

    manifests = [p for p in ObjectStoragePath(output).rglob("manifest.json")]
    assert len(manifests) == 3
    for path in manifests:
        manifest = json.loads(path.read_text())
        (image,) = manifest["images"]
        assert image["uri"].startswith(f"s3://moto_s3@{bucket}/zimage/s3_dag/")
        data = ObjectStoragePath(image["uri"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image["sha256"] and image["format"] == "png"
    assert zimage_conn.total_accepted == 3


def test_templated_numbers_rendered_as_strings_are_accepted(zimage_conn, output_dir):
    op = generate(output_dir, seed="20260301", width="256", height="256", steps="8", cfg_scale="1.5")
    (image,) = op.execute({"ti": FakeTI()})
    assert image["seed"] == 20260301
    body = next(b for b in zimage_conn.request_bodies if b[0].get("taskType") == "imageInference")
    assert (body[0]["seed"], body[0]["steps"], body[0]["CFGScale"]) == (20260301, 8, 1.5)


def test_a_templated_value_that_is_not_a_number_is_refused_naming_it(zimage_conn, output_dir):
    with pytest.raises(AirflowFailException, match="seed"):
        generate(output_dir, seed="tomorrow").execute({"ti": FakeTI()})


@pytest.mark.parametrize(("backend", "first_wait"), [("runware", 1.0), ("executor", 0.1)])
def test_without_a_poll_interval_the_connection_backend_decides_how_soon_a_task_looks_again(
    runware_server, output_dir, monkeypatch, backend, first_wait
):
    """A zimage-executor answers a queued image in a fraction of a second: a task on it looks again
    after 0.1 s, not after Runware's 1 s, both while it holds a worker slot and once deferred."""
    from airflow_provider_zimage.compat import TaskDeferred
    from airflow_provider_zimage.hooks.runware import ZImageHook
    from airflow_provider_zimage.testing.pytest_plugin import connection_json

    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", connection_json(runware_server, backend=backend))
    # An executor's /health names its weights (the fingerprint's origin); the test server has no /health.
    served = {"models": [{"model": "runware:z-image@turbo", "weights": "w1"}]}
    monkeypatch.setattr(ZImageHook, "executor_health", lambda self: served)
    base = {"task_id": "generate", "width": 256, "height": 256, "output_path": output_dir}

    # Ready 0.6 s after the submission: Runware's cadence looks at 0 s and 1 s; the executor's at
    # 0, 0.1, 0.25, 0.48 and 0.81 s.
    op = ZImageGenerateOperator(prompt="a teapot __delay:0.6__", **base)
    (image,) = op.execute({"ti": FakeTI()})
    polls = runware_server.stats["get_response_polls"]
    assert polls == 2 if backend == "runware" else polls >= 4, polls
    assert Path(image["uri"].removeprefix("file://")).exists()

    deferring = ZImageGenerateOperator(
        prompt="a slow teapot __delay:60__", deferrable=True, defer_after=0, **base
    )
    with pytest.raises(TaskDeferred) as deferred:
        deferring.execute({"ti": FakeTI()})
    assert deferred.value.trigger.poll_interval == first_wait

    # An explicit poll_interval is kept whatever the backend.
    explicit = ZImageGenerateOperator(
        prompt="a slower teapot __delay:60__", deferrable=True, defer_after=0, poll_interval=2.5, **base
    )
    with pytest.raises(TaskDeferred) as deferred:
        explicit.execute({"ti": FakeTI()})
    assert deferred.value.trigger.poll_interval == 2.5
