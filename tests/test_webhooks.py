"""Webhook delivery end to end: the plugin app mounted as the API server mounts it, served by a real
uvicorn on loopback, with the Runware test server POSTing real webhooks to the URLs the operator built.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.testing.runware_server.server import RunwareTestServer
from airflow_provider_zimage.triggers.task import ZImageTaskTrigger
from airflow_provider_zimage.webhooks.inbox import WebhookInbox
from airflow_provider_zimage.webhooks.tokens import token_expiry, webhook_token, webhook_url
from tests.conftest import zimage_connection_json
from tests.dagtest import FakeTI, run_dag, task_states
from tests.test_operator_dag import MAPPED_DAG

pytestmark = pytest.mark.usefixtures("airflow_db")

SECRET = "wh-secret-7f3a9c1e5b"


@pytest.fixture(scope="module")
def api_server() -> Iterator[str]:
    """Airflow's own `init_plugins` mounts every plugin app on a bare FastAPI, served by uvicorn."""
    import uvicorn
    from airflow.api_fastapi.app import init_plugins
    from fastapi import FastAPI

    app = FastAPI()
    init_plugins(app)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@dataclass
class WebhookSetup:
    server: RunwareTestServer
    api: str
    inbox: Path

    def url(self, task_uuid: str, token: str | None = None) -> str:
        query = "" if token is None else f"?token={token}"
        return f"{self.api}/zimage/webhooks/{task_uuid}{query}"

    def signed(self, task_uuid: str, secret: str = SECRET, conn_id: str = "zimage_default") -> str:
        """The URL an operator of `conn_id` would send Runware, signed with `secret`."""
        return webhook_url(self.api, task_uuid, secret, conn_id, expires=token_expiry(600))

    def sent_tokens(self) -> list[str]:
        """The tokens of the webhook URLs the operator sent Runware."""
        from urllib.parse import parse_qs, urlsplit

        urls = [
            t["webhookURL"] for body in self.server.request_bodies for t in body or [] if t.get("webhookURL")
        ]
        return [parse_qs(urlsplit(u).query)["token"][0] for u in urls]

    def stored(self) -> list[Path]:
        return sorted(p for p in self.inbox.rglob("*") if p.is_file())


@pytest.fixture
def webhooks(runware_server, api_server, tmp_path, monkeypatch) -> WebhookSetup:
    """`zimage_default` with a webhook secret and base URL, and a private inbox for the test."""
    conn = zimage_connection_json(runware_server, webhook_secret=SECRET, webhook_base_url=api_server)
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", conn)
    inbox = tmp_path / "inbox"
    monkeypatch.setenv("AIRFLOW__ZIMAGE__WEBHOOK_INBOX", f"file://{inbox}")
    return WebhookSetup(runware_server, api_server, inbox)


def run_webhook_dag(dag_id: str, output: str, prompts: list[str], **op_kwargs):
    """The mapped DAG of the polling tests, deferred and with delivery="webhook"."""
    op_kwargs = {"deferrable": True, "delivery": "webhook", **op_kwargs}
    return run_dag(dag_id, MAPPED_DAG, dag_id=dag_id, output=output, prompts=prompts, op_kwargs=op_kwargs)


def request(prompt: str = "a webhook", **kw) -> ImageInferenceRequest:
    base = {"model": "runware:z-image@turbo", "positive_prompt": prompt, "width": 256, "height": 256}
    return ImageInferenceRequest.build(**{**base, **kw})


# -- the plugin --------------------------------------------------------------------------------------


def test_the_plugin_is_registered_for_the_api_server_under_zimage():
    from airflow import plugins_manager

    info = {p["name"]: p for p in plugins_manager.get_plugin_info(["fastapi_apps"])}
    assert info["zimage"]["fastapi_apps"] == [
        {
            "app": "fastapi.applications.FastAPI",
            "url_prefix": "/zimage",
            "name": "Z-Image webhooks and image views",
        }
    ]


# -- deferred tasks woken by webhooks ----------------------------------------------------------------


@pytest.mark.parametrize("envelope", [False, True], ids=["bare-object", "data-envelope"])
def test_a_webhook_wakes_the_deferred_task_without_polling(webhooks, output_dir, envelope, caplog, capfd):
    webhooks.server.configure(delay=0.3, webhook_envelope=envelope)
    prompts = [f"webhook delivery {i}" for i in range(3)]
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        run = run_webhook_dag(f"webhook_{envelope}", output_dir, prompts, webhook_grace_period=120)
    assert run.state == "success", task_states(run)
    # Woken by the webhooks, long before polling would start (no getResponse poll is asserted below);
    # the bound is the grace period, not a speed target: dag.test() alone takes ~9 s a task on 2 cores.
    assert time.monotonic() - started < 120

    root = Path(output_dir.removeprefix("file://"))
    collected = json.loads((root / "collected.json").read_text())
    assert len(collected) == 3
    for entry in collected:
        assert entry["sha256"] and Path(entry["uri"].removeprefix("file://")).stat().st_size == entry["bytes"]
    stats = webhooks.server.stats
    assert stats["get_response_polls"] == 0
    assert stats["webhook_deliveries"] == 3 and stats["total_accepted"] == 3
    assert webhooks.stored() == []  # the inbox is cleared once the images are stored

    # The secret and the per-task tokens stay out of logs (task logs go to stdout), XCom and manifests.
    tokens = webhooks.sent_tokens()
    assert len(tokens) == 3
    logs = caplog.text + "".join(capfd.readouterr())
    assert f"Runware will POST the results to {webhooks.api}/zimage/webhooks/" in logs
    manifests = "".join(p.read_text() for p in root.rglob("manifest.json"))
    for text in (logs, json.dumps(collected), manifests):
        assert SECRET not in text
        assert not any(token in text for token in tokens)
    sent = [b for b in webhooks.server.request_bodies if b and b[0].get("taskType") == "imageInference"]
    assert all(body[0]["webhookURL"].startswith(f"{webhooks.api}/zimage/webhooks/") for body in sent)


def test_a_lost_webhook_costs_latency_not_the_image(webhooks, output_dir):
    webhooks.server.script_faults(webhook_drop_rate=1.0)
    prompts = [f"lost webhook {i}" for i in range(2)]
    run = run_webhook_dag("webhook_lost", output_dir, prompts, webhook_grace_period=0.3)
    assert run.state == "success", task_states(run)
    stats = webhooks.server.stats
    assert stats["webhooks_dropped"] == 2 and stats["webhook_deliveries"] == 0
    assert stats["get_response_polls"] >= 2
    assert stats["total_accepted"] == 2 and set(stats["accepted"].values()) == {1}
    collected = json.loads(Path(output_dir.removeprefix("file://"), "collected.json").read_text())
    assert len(collected) == 2


def test_webhook_delivery_without_deferring_waits_on_the_inbox_in_the_worker(webhooks, output_dir):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    webhooks.server.configure(delay=0.2)
    op = ZImageGenerateOperator(
        task_id="generate",
        prompt="in-process webhook",
        width=256,
        height=256,
        output_path=output_dir,
        deferrable=False,
        delivery="webhook",
        webhook_grace_period=30,
    )
    images = op.execute({"ti": FakeTI("manual__in_process", dag_id="webhooks", map_index=0)})
    assert len(images) == 1
    assert webhooks.server.stats["get_response_polls"] == 0
    assert webhooks.server.stats["webhook_deliveries"] == 1


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"webhook_base_url": None}, "webhook_base_url"), ({"webhook_secret": None}, "webhook_secret")],
)
def test_a_webhook_misconfiguration_fails_before_paying(webhooks, output_dir, monkeypatch, extra, named):
    from airflow_provider_zimage.compat import AirflowFailException
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    settings = {"webhook_secret": SECRET, "webhook_base_url": webhooks.api, **extra}
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", zimage_connection_json(webhooks.server, **settings))
    op = ZImageGenerateOperator(
        task_id="generate", prompt="misconfigured", output_path=output_dir, delivery="webhook"
    )
    with pytest.raises(AirflowFailException, match=named):
        op.execute({"ti": FakeTI("manual__misconfigured", dag_id="webhooks", map_index=0)})
    assert webhooks.server.total_accepted == 0


def test_webhook_delivery_needs_the_operator_to_wait():
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    with pytest.raises(ValueError, match="wait_for_completion"):
        ZImageGenerateOperator(task_id="t", prompt="x y", delivery="webhook", wait_for_completion=False)


# -- what the endpoint refuses -----------------------------------------------------------------------

TASK = "3f1c2a4e-8b7d-4c6e-9a1f-2d3e4f5a6b7c"
OTHER = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
ITEM = {"taskType": "imageInference", "taskUUID": TASK, "imageUUID": "0c1d2e3f-aaaa-4bbb-8ccc-000000000001"}


@pytest.fixture
def small_body_limit() -> Iterator[int]:
    """The plugin's own app (the one the API server mounted), with a body limit a test can exceed."""
    from airflow_provider_zimage.webhooks.app import MAX_BODY_BYTES
    from airflow_provider_zimage.webhooks.plugin import ZImageWebhookPlugin

    state = ZImageWebhookPlugin.fastapi_apps[0]["app"].state
    state.max_body_bytes = 4096
    yield 4096
    state.max_body_bytes = MAX_BODY_BYTES


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("no token", 401),
        ("forged token", 403),
        ("token of another task", 403),
        ("token under another secret", 403),
        ("token of 0.2, without expiry", 403),
        ("oversized body", 413),
        ("oversized body, no length", 413),
        ("malformed JSON", 400),
        ("JSON scalar", 400),
        ("item of another task", 422),
    ],
)
def test_refused_webhooks_store_nothing(webhooks, small_body_limit, case, status):
    expires = token_expiry(600)
    token = webhook_token(SECRET, "zimage_default", TASK, expires)
    body: bytes | Iterator[bytes] = json.dumps(ITEM).encode()
    url = f"{webhooks.url(TASK, token)}&expires={expires}"
    if case == "no token":
        url = webhooks.url(TASK)
    elif case == "forged token":
        url = f"{webhooks.url(TASK, '0' * 64)}&expires={expires}"
    elif case == "token of another task":
        url = webhooks.signed(OTHER).replace(OTHER, TASK)
    elif case == "token under another secret":
        url = webhooks.signed(TASK, secret="not-the-secret")
    elif case == "token of 0.2, without expiry":
        url = webhooks.url(TASK, hmac.new(SECRET.encode(), TASK.encode(), hashlib.sha256).hexdigest())
    elif case == "oversized body":
        body = json.dumps({**ITEM, "pad": "x" * small_body_limit}).encode()
    elif case == "oversized body, no length":
        body = iter([b'{"pad": "', b"x" * small_body_limit, b'"}'])
    elif case == "malformed JSON":
        body = b'{"taskUUID": '
    elif case == "JSON scalar":
        body = b'"hello"'
    elif case == "item of another task":
        body = json.dumps({**ITEM, "taskUUID": OTHER}).encode()

    response = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert SECRET not in response.text and token not in response.text
    assert webhooks.stored() == []


def test_duplicate_deliveries_in_either_shape_are_stored_once(webhooks):
    url = webhooks.signed(TASK)
    item = {**ITEM, "imageURL": "https://im.runware.ai/x.jpg", "seed": 7, "cost": 0.0013, "status": "success"}
    error = {"taskUUID": TASK, "code": "uploadFailed", "message": "the upload failed"}
    bodies = [
        item,
        item,
        {"data": [item]},
        [item],
        {"data": [], "errors": [error]},
        {**error, "status": "error"},
    ]
    for body in bodies:
        response = httpx.post(url, json=body)
        assert response.status_code == 200, response.text
    names = [p.name for p in webhooks.stored()]  # one result, one error, however often and however sent
    assert len(names) == 2
    assert f"result-{ITEM['imageUUID']}.json" in names and any(n.startswith("error-") for n in names)
    inbox = WebhookInbox(f"file://{webhooks.inbox}", conn_id="zimage_default")
    response = inbox.read(TASK, inbox.names(TASK))
    assert [r.image_uuid for r in response.results] == [ITEM["imageUUID"]]
    assert response.results[0].seed == 7
    assert [e.code for e in response.errors] == ["uploadFailed"]


def test_a_webhook_for_a_connection_with_its_own_secret(webhooks, monkeypatch):
    other = zimage_connection_json(webhooks.server, webhook_secret="another-secret-42")
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_OTHER", other)
    good = webhooks.signed(TASK, secret="another-secret-42", conn_id="zimage_other")
    under_default = webhooks.signed(TASK, secret=SECRET, conn_id="zimage_other")
    assert httpx.post(under_default, json=ITEM).status_code == 403
    assert httpx.post(good, json=ITEM).status_code == 200
    assert len(webhooks.stored()) == 1


# -- the trigger -------------------------------------------------------------------------------------


async def test_partial_webhooks_and_polls_merge_into_one_set_of_results(webhooks):
    server = webhooks.server
    req = request("two images", number_results=2)  # no webhookURL: one webhook is delivered by hand
    await ZImageHook().asubmit([req])
    await asyncio.to_thread(server.wait_idle)
    polled = await ZImageHook().aget_response(req.task_uuid)
    one = polled.results[0].model_dump(by_alias=True, exclude_none=True)
    async with httpx.AsyncClient() as client:
        response = await client.post(webhooks.signed(req.task_uuid), json={**one, "status": "success"})
    assert response.status_code == 200
    polls_before = server.stats["get_response_polls"]

    trigger = ZImageTaskTrigger(
        task_uuid=req.task_uuid,
        expected_results=2,
        deadline=time.time() + 30,
        poll_interval=0.05,
        webhook_inbox=f"file://{webhooks.inbox}",
        poll_after=time.time() + 0.3,
    )
    events = [event async for event in trigger.run()]
    payload = events[0].payload
    assert payload["outcome"] == "store"
    image_uuids = [r["imageUUID"] for r in payload["results"]]
    assert sorted(image_uuids) == sorted(r.image_uuid for r in polled.results)  # no duplicate
    assert server.stats["get_response_polls"] - polls_before >= 1  # the second image came by polling


def test_the_trigger_serializes_to_exactly_its_constructor_arguments():
    kwargs = {
        "task_uuid": TASK,
        "zimage_conn_id": "zimage_other",
        "expected_results": 2,
        "deadline": 1_900_000_000.5,
        "poll_interval": 0.5,
        "max_poll_interval": 5.0,
        "max_consecutive_errors": 3,
        "webhook_inbox": "s3://aws_default@bucket/inbox",
        "poll_after": 1_899_999_000.0,
        "inbox_interval": 0.4,
        "not_before": 1_899_999_010.0,
    }
    classpath, serialized = ZImageTaskTrigger(**kwargs).serialize()
    assert classpath == "airflow_provider_zimage.triggers.task.ZImageTaskTrigger"
    assert serialized == kwargs
    assert ZImageTaskTrigger(**serialized).serialize() == (classpath, serialized)


def test_delivery_fields_do_not_change_which_image_is_made():
    plain = request("same image")
    delivered = plain.model_copy(
        update={
            "webhook_url": "https://airflow.example.com/zimage/webhooks/x?token=abc",
            "upload_endpoint": "https://bucket.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc",
            "delivery_method": "async",
        }
    )
    assert delivered.fingerprint() == plain.fingerprint()


def test_a_task_failure_pushed_by_webhook_fails_the_task_without_polling(webhooks, output_dir):
    from airflow_provider_zimage.compat import AirflowFailException
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    op = ZImageGenerateOperator(
        task_id="generate",
        prompt="a scripted failure __fail__",
        output_path=output_dir,
        delivery="webhook",
        webhook_grace_period=30,
    )
    with pytest.raises(AirflowFailException, match="taskFailed"):
        op.execute({"ti": FakeTI("manual__failed_by_webhook", dag_id="webhooks", map_index=0)})
    assert webhooks.server.stats["get_response_polls"] == 0
    assert webhooks.stored() == []


async def test_an_inbox_on_s3_carries_webhooks_from_the_api_server_to_the_trigger(
    webhooks, moto_s3_server, s3_bucket, monkeypatch
):
    from tests.s3_server import MOTO_CONN_ID

    inbox = f"s3://{MOTO_CONN_ID}@{s3_bucket}/inbox"
    monkeypatch.setenv("AIRFLOW__ZIMAGE__WEBHOOK_INBOX", inbox)
    req = request("an s3 inbox")
    url = webhooks.signed(req.task_uuid)
    await ZImageHook().asubmit([req.model_copy(update={"webhook_url": url})])
    await asyncio.to_thread(webhooks.server.wait_idle)
    assert webhooks.server.stats["webhook_deliveries"] == 1
    assert moto_s3_server.list_keys(s3_bucket) != []

    trigger = ZImageTaskTrigger(
        task_uuid=req.task_uuid,
        deadline=time.time() + 30,
        webhook_inbox=inbox,
        poll_after=time.time() + 30,
    )
    events = [event async for event in trigger.run()]  # S3 calls from inside the running loop
    assert events[0].payload["outcome"] == "store"
    assert webhooks.server.stats["get_response_polls"] == 0
    await asyncio.to_thread(WebhookInbox(inbox, conn_id="zimage_default").discard, req.task_uuid)
    assert moto_s3_server.list_keys(s3_bucket) == []
