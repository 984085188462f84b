"""`upload_to_storage`: the Runware test server PUTs each image through a presigned URL into a bucket
on the moto S3 server; the worker never downloads from Runware, and the manifest matches the bytes.
"""

from __future__ import annotations

import hashlib
import json

import pendulum
import pytest

from tests.dagtest import run_dag, task_states
from tests.s3_server import MOTO_CONN_ID

pytestmark = pytest.mark.usefixtures("airflow_db")

UPLOAD_DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageGenerateOperator.partial(
        task_id="generate",
        width=256,
        height=256,
        output_format="PNG",
        output_path=PARAMS["output"],
        upload_to_storage=True,
        deferrable=True,
        poll_interval=0.05,
        max_poll_interval=0.2,
    ).expand(prompt=PARAMS["prompts"])
"""


def test_runware_uploads_straight_into_the_bucket_and_the_manifest_matches(
    zimage_conn, moto_s3_server, s3_bucket
):
    output = f"s3://{MOTO_CONN_ID}@{s3_bucket}/generated"
    prompts = ["an upload to s3", "another upload to s3"]
    day = pendulum.datetime(2026, 4, 1, tz="UTC")
    run = run_dag(
        "upload_s3", UPLOAD_DAG, logical_date=day, dag_id="upload_s3", output=output, prompts=prompts
    )
    assert run.state == "success", task_states(run)

    stats = zimage_conn.stats
    assert stats["uploads_succeeded"] == 2 and stats["uploads_failed"] == 0
    assert stats["image_downloads"] == 0  # the worker fetched nothing from Runware
    s3 = moto_s3_server.client()
    keys = moto_s3_server.list_keys(s3_bucket, "generated/")
    manifests = [
        json.loads(s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read())
        for k in keys
        if k.endswith("manifest.json")
    ]
    assert len(manifests) == 2
    for manifest in manifests:
        [image] = manifest["images"]
        key = image["uri"].split(f"{s3_bucket}/", 1)[1]
        assert key.endswith(f"/{manifest['task_uuid']}.png")  # where the presigned PUT put it
        data = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == image["sha256"] and len(data) == image["bytes"]
        assert (image["width"], image["height"], image["format"]) == (256, 256, "png")
        assert "uploadEndpoint" not in manifest["request"]  # presigned URLs are credentials
    images = [k for k in keys if k.endswith(".png")]
    assert len(images) == 2

    again = run_dag(
        "upload_s3", UPLOAD_DAG, logical_date=day, dag_id="upload_s3", output=output, prompts=prompts
    )
    assert again.state == "success"
    assert zimage_conn.stats["total_accepted"] == 2  # a re-run finds the uploads and pays nothing
    assert zimage_conn.stats["uploads_attempted"] == 2


class FakeTI:
    dag_id, task_id, run_id, map_index = "uploads", "generate", "manual__refused", 0

    def xcom_push(self, key, value):
        pass


def test_upload_to_storage_refuses_a_local_output_before_paying(zimage_conn, output_dir):
    from airflow_provider_zimage.compat import AirflowFailException
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    op = ZImageGenerateOperator(
        task_id="generate", prompt="not s3", output_path=output_dir, upload_to_storage=True
    )
    with pytest.raises(AirflowFailException, match="s3:// output_path"):
        op.execute({"ti": FakeTI()})
    assert zimage_conn.total_accepted == 0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"number_results": 2}, "number_results"),
        ({"upload_endpoint": "https://storage.example.com/x.jpg?sig=abc"}, "upload_endpoint"),
    ],
)
def test_upload_to_storage_refuses_what_one_upload_url_cannot_carry(kwargs, named):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    with pytest.raises(ValueError, match=named):
        ZImageGenerateOperator(task_id="t", prompt="two images", upload_to_storage=True, **kwargs)


def test_a_user_upload_endpoint_is_sent_as_given(zimage_conn, output_dir, monkeypatch):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from airflow_provider_zimage.testing.runware_server import HTTPSink

    with HTTPSink() as sink:
        # The image is fetched back from the endpoint's origin, which the user allows like any image host.
        monkeypatch.setenv("AIRFLOW__ZIMAGE__ALLOWED_IMAGE_HOSTS", sink.url)
        endpoint = f"{sink.url}/bucket/image.jpg?signature=abc123"
        op = ZImageGenerateOperator(
            task_id="generate", prompt="own endpoint", output_path=output_dir, upload_endpoint=endpoint
        )
        op.execute({"ti": FakeTI()})
    [body] = [b for b in zimage_conn.request_bodies if b[0].get("taskType") == "imageInference"]
    assert body[0]["uploadEndpoint"] == endpoint
