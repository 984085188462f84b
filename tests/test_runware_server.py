"""The Runware stand-in must be right before anything is proved with it: every other test trusts its counts.

All tests talk real HTTP to a real server on 127.0.0.1 with httpx, the client the provider uses.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from PIL import Image

from airflow_provider_zimage.testing.runware_server import (
    TWINFLOW,
    Z_IMAGE,
    Z_IMAGE_TURBO,
    HTTPSink,
    RunwareTestServer,
    image_cost,
)

AUTH = {"Authorization": "Bearer test-key"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> Iterator[RunwareTestServer]:
    with RunwareTestServer() as srv:
        yield srv


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers=AUTH, timeout=10, trust_env=False) as c:
        yield c


@pytest.fixture
def sink() -> Iterator[HTTPSink]:
    with HTTPSink() as s:
        yield s


def task(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": Z_IMAGE_TURBO,
        "positivePrompt": "a lighthouse at dawn",
        "width": 256,
        "height": 256,
    }
    body.update(overrides)
    return body


def poll(client: httpx.Client, url: str, task_uuid: str) -> httpx.Response:
    return client.post(url, json=[{"taskType": "getResponse", "taskUUID": task_uuid}])


def poll_until(client: httpx.Client, url: str, task_uuid: str, count: int, timeout: float = 5) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = poll(client, url, task_uuid).json()["data"]
        done = [i for i in items if i["status"] != "processing"]
        if len(done) >= count:
            return done
        time.sleep(0.01)
    raise AssertionError(f"{task_uuid}: fewer than {count} results in {timeout} s")


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ----------------------------------------------------------------------------- validation and auth


def test_schema_violation_is_400_naming_the_wire_parameter(
    server: RunwareTestServer, client: httpx.Client
) -> None:
    bad = task(width=500, height=512, CFGScale=25, bogus=1)
    resp = client.post(server.url, json=[bad])
    assert resp.status_code == 400
    errors = {e["parameter"]: e for e in resp.json()["errors"]}
    assert set(errors) == {"width", "CFGScale", "bogus"}
    assert errors["width"]["code"] == "invalidParameter"
    assert errors["width"]["taskUUID"] == bad["taskUUID"]
    assert errors["width"]["taskType"] == "imageInference"
    assert errors["bogus"]["code"] == "unsupportedParameter"
    assert server.accepted_submissions(bad["taskUUID"]) == 0
    # width without height, an unknown model, and a lora weight out of range, nested path named
    no_height = {k: v for k, v in task(model="runware:nope@1").items() if k != "height"}
    resp = client.post(server.url, json=[no_height])
    params = {e["parameter"] for e in resp.json()["errors"]}
    assert {"height", "model"} <= params
    resp = client.post(server.url, json=[task(lora=[{"model": "civitai:1@2", "weight": 9}])])
    assert [e["parameter"] for e in resp.json()["errors"]] == ["lora[0].weight"]
    assert server.total_accepted == 0


def test_model_specific_rules(server: RunwareTestServer, client: httpx.Client) -> None:
    ok = client.post(server.url, json=[task(model=TWINFLOW, acceleration="high", CFGScale=40)])
    assert ok.status_code == 200, ok.text
    resp = client.post(server.url, json=[task(model=Z_IMAGE_TURBO, acceleration="high")])
    assert resp.json()["errors"][0]["parameter"] == "acceleration"
    resp = client.post(server.url, json=[task(model=TWINFLOW, inputs={"seedImage": str(uuid.uuid4())})])
    assert resp.json()["errors"][0]["parameter"] == "inputs"
    assert client.post(server.url, json=[task(model=Z_IMAGE)]).status_code == 200


def test_auth_header_task_and_401(server: RunwareTestServer) -> None:
    body = [task()]
    resp = httpx.post(server.url, json=body, trust_env=False)
    assert resp.status_code == 401
    assert resp.json()["errors"][0]["code"] == "invalidApiKey"
    resp = httpx.post(server.url, json=body, headers={"Authorization": "Bearer wrong"}, trust_env=False)
    assert resp.status_code == 401
    resp = httpx.post(
        server.url, json=[{"taskType": "authentication", "apiKey": "test-key"}, *body], trust_env=False
    )
    assert resp.status_code == 200
    assert server.total_accepted == 1
    assert server.stats["auth_failures"] == 2
    assert server.request_bodies[2][0]["apiKey"] == "***"


# ----------------------------------------------------------------------------- delivery


def test_sync_base64_is_a_real_image_of_the_requested_size(
    server: RunwareTestServer, client: httpx.Client
) -> None:
    first = task(
        width=320, height=192, seed=42, outputType="base64Data", outputFormat="PNG", includeCost=True
    )
    resp = client.post(server.url, json=[first])
    assert resp.status_code == 200
    (item,) = resp.json()["data"]
    assert item["taskUUID"] == first["taskUUID"]
    assert item["seed"] == 42 and item["NSFWContent"] is False
    assert item["cost"] == image_cost(Z_IMAGE_TURBO, 320, 192)
    uuid.UUID(item["imageUUID"])
    img = decode(base64.b64decode(item["imageBase64Data"]))
    assert (img.format, img.size) == ("PNG", (320, 192))
    # same prompt and seed -> the same bytes; another seed -> other bytes
    again = client.post(server.url, json=[{**first, "taskUUID": str(uuid.uuid4())}]).json()["data"][0]
    other = client.post(server.url, json=[{**first, "taskUUID": str(uuid.uuid4()), "seed": 43}]).json()[
        "data"
    ][0]
    assert again["imageBase64Data"] == item["imageBase64Data"] != other["imageBase64Data"]
    # dataURI / WEBP
    data_uri = task(outputType="dataURI", outputFormat="WEBP", outputQuality=50)
    item = client.post(server.url, json=[data_uri]).json()["data"][0]
    header, encoded = item["imageDataURI"].split(",", 1)
    assert header == "data:image/webp;base64"
    assert decode(base64.b64decode(encoded)).format == "WEBP"
    assert "cost" not in item


def test_url_output_is_served_by_the_server(server: RunwareTestServer, client: httpx.Client) -> None:
    item = client.post(server.url, json=[task(outputFormat="JPG")]).json()["data"][0]
    assert item["imageURL"].startswith(server.origin + "/image/")
    got = client.get(item["imageURL"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert decode(got.content).size == (256, 256)
    assert client.get(server.origin + "/image/nope.jpg").status_code == 404


def test_async_submit_then_get_response(client: httpx.Client) -> None:
    with RunwareTestServer(delay=0.15) as server:
        t = task(deliveryMethod="async")
        ack = client.post(server.url, json=[t])
        assert ack.status_code == 200
        assert ack.json()["data"] == [
            {"taskType": "imageInference", "taskUUID": t["taskUUID"], "status": "processing"}
        ]
        first = poll(client, server.url, t["taskUUID"]).json()["data"]
        assert [i["status"] for i in first] == ["processing"]
        (item,) = poll_until(client, server.url, t["taskUUID"], 1)
        assert item["status"] == "success" and item["imageURL"]
        assert server.stats["get_response_polls"] >= 2
        assert server.accepted_submissions(t["taskUUID"]) == 1


def test_number_results_arrive_one_by_one_and_repeat(client: httpx.Client) -> None:
    with RunwareTestServer(delay=0.05, stagger=0.2) as server:
        t = task(deliveryMethod="async", numberResults=3, seed=7)
        client.post(server.url, json=[t])
        partial = poll_until(client, server.url, t["taskUUID"], 1)
        assert len(partial) == 1, "the second image is 0.2 s behind the first"
        everything = poll_until(client, server.url, t["taskUUID"], 3)
        assert len(everything) == 3
        assert everything[0]["imageUUID"] == partial[0]["imageUUID"], "later polls return earlier items"
        assert [i["seed"] for i in everything] == [7, 8, 9]
        assert len({i["imageUUID"] for i in everything}) == 3
        assert server.total_accepted == 1


def test_conflict_task_uuid_is_not_counted(server: RunwareTestServer, client: httpx.Client) -> None:
    t = task()
    assert client.post(server.url, json=[t]).status_code == 200
    resp = client.post(server.url, json=[t])
    assert resp.status_code == 400
    (err,) = resp.json()["errors"]
    assert err["code"] == "conflictTaskUUID" and err["taskUUID"] == t["taskUUID"]
    # a request with one new and one reused taskUUID is refused as a whole
    fresh = task()
    assert client.post(server.url, json=[fresh, t]).status_code == 400
    assert server.accepted_submissions(t["taskUUID"]) == 1
    assert server.accepted_submissions(fresh["taskUUID"]) == 0
    assert server.stats["conflicts"] == 2


def test_get_response_unknown_task(server: RunwareTestServer, client: httpx.Client) -> None:
    missing = str(uuid.uuid4())
    resp = poll(client, server.url, missing)
    assert resp.status_code == 400
    (err,) = resp.json()["errors"]
    assert (err["code"], err["taskUUID"]) == ("taskNotFound", missing)


def test_prompt_markers_fail_and_nsfw(server: RunwareTestServer, client: httpx.Client) -> None:
    failing = task(positivePrompt="a cat __fail__", deliveryMethod="async")
    client.post(server.url, json=[failing])
    (item,) = poll_until(client, server.url, failing["taskUUID"], 1)
    body = poll(client, server.url, failing["taskUUID"]).json()
    assert item["status"] == "error" and item["code"] == "taskFailed"
    assert body["errors"][0]["taskUUID"] == failing["taskUUID"]
    sync_fail = client.post(server.url, json=[task(positivePrompt="x __fail:nsfwContentDetected__")])
    assert sync_fail.status_code == 400
    assert sync_fail.json()["errors"][0]["code"] == "nsfwContentDetected"
    nsfw = client.post(server.url, json=[task(positivePrompt="a cat __nsfw__")]).json()["data"][0]
    assert nsfw["NSFWContent"] is True


def test_fail_once_fails_the_first_task_of_a_prompt_and_not_its_resubmission(
    server: RunwareTestServer, client: httpx.Client
) -> None:
    first = task(positivePrompt="a lamp __fail_once__", deliveryMethod="async")
    client.post(server.url, json=[first])
    (item,) = poll_until(client, server.url, first["taskUUID"], 1)
    assert item["status"] == "error" and item["code"] == "taskFailed"
    again = task(positivePrompt="a lamp __fail_once__", deliveryMethod="async")  # a new taskUUID
    client.post(server.url, json=[again])
    assert poll_until(client, server.url, again["taskUUID"], 1)[0]["status"] == "success"


# ----------------------------------------------------------------------------- faults


def test_drop_after_accept_counts_one_submission(server: RunwareTestServer, client: httpx.Client) -> None:
    server.drop_next(after_accept=True, task_type="imageInference")
    t = task(deliveryMethod="async")
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(server.url, json=[t])
    assert server.accepted_submissions(t["taskUUID"]) == 1
    # the client retries blindly: conflict, still one submission; then it reattaches by polling
    assert client.post(server.url, json=[t]).json()["errors"][0]["code"] == "conflictTaskUUID"
    assert poll_until(client, server.url, t["taskUUID"], 1)[0]["status"] == "success"
    assert server.accepted_submissions(t["taskUUID"]) == 1
    assert server.stats["dropped_connections"] == 1


def test_drop_and_status_faults(server: RunwareTestServer, client: httpx.Client) -> None:
    server.script_faults([{"drop": True}, {"status": 429, "retry_after": 2}, {"status": 402}])
    t = task()
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(server.url, json=[t])
    resp = client.post(server.url, json=[t])
    assert resp.status_code == 429 and resp.headers["retry-after"] == "2"
    assert resp.json()["errors"][0]["code"] == "rateLimitExceeded"
    resp = client.post(server.url, json=[t])
    assert (resp.status_code, resp.json()["errors"][0]["code"]) == (402, "insufficientCredits")
    assert server.accepted_submissions(t["taskUUID"]) == 0
    assert client.post(server.url, json=[t]).status_code == 200
    assert server.stats["faults_injected"] == {"drop": 1, "429": 1, "402": 1}
    # a fault filtered by taskType leaves other requests alone
    server.fail_next(503, task_type="getResponse")
    assert client.post(server.url, json=[task()]).status_code == 200
    assert poll(client, server.url, t["taskUUID"]).status_code == 503


def test_fault_rates_are_reproducible() -> None:
    def run() -> list[int]:
        with RunwareTestServer() as server, httpx.Client(headers=AUTH, trust_env=False) as c:
            server.script_faults(rates={"500": 0.3, "503": 0.3}, seed=1, task_type="getResponse")
            return [poll(c, server.url, str(uuid.uuid4())).status_code for _ in range(20)]

    first = run()
    assert first == run()
    assert {500, 503, 400} <= set(first)


def test_control_api_over_http(server: RunwareTestServer, client: httpx.Client) -> None:
    ctl = server.control_url
    resp = client.post(ctl + "/faults", json={"queue": [{"status": 504, "taskType": "imageInference"}]})
    assert resp.status_code == 200 and resp.json()["queue"][0]["status"] == 504
    assert client.post(server.url, json=[task()]).json()["errors"][0]["code"] == "timeoutProvider"
    t = task()
    client.post(server.url, json=[t])
    stats = client.get(ctl + "/stats").json()
    assert stats["accepted"] == {t["taskUUID"]: 1} and stats["total_accepted"] == 1
    assert stats["requests_by_type"]["imageInference"] == 2
    assert (
        client.get(ctl + "/stats", params={"bodies": 1}).json()["request_bodies"][1][0]["taskUUID"]
        == t["taskUUID"]
    )
    assert client.post(ctl + "/faults", json={"queue": [{"nonsense": 1}]}).status_code == 400
    assert client.post(ctl + "/config", json={"delay": 0.5}).json()["delay"] == 0.5
    assert client.post(ctl + "/reset").status_code == 200
    assert server.stats["total_accepted"] == 0 and server.options.delay == 0.0
    # after a reset the taskUUID is unknown again
    assert poll(client, server.url, t["taskUUID"]).json()["errors"][0]["code"] == "taskNotFound"


# ----------------------------------------------------------------------------- webhooks and uploads


def test_webhooks_retry_until_2xx(server: RunwareTestServer, client: httpx.Client, sink: HTTPSink) -> None:
    sink.script([500])
    t = task(deliveryMethod="async", numberResults=2, webhookURL=sink.url + "/hook?token=abc")
    client.post(server.url, json=[t])
    server.wait_for(lambda s: s["webhook_deliveries"] == 2)
    got = sink.requests
    assert [r.status for r in got] == [500, 200, 200]
    assert got[0].query == {"token": "abc"}
    bodies = [r.json() for r in got[1:]]
    assert all(b["taskUUID"] == t["taskUUID"] and b["status"] == "success" for b in bodies)
    assert server.stats["webhook_attempts"] == 3


def test_webhook_envelope_and_drops(client: httpx.Client, sink: HTTPSink) -> None:
    with RunwareTestServer(webhook_envelope=True) as server:
        client.post(server.url, json=[task(webhookURL=sink.url + "/hook")])
        server.wait_for(lambda s: s["webhook_deliveries"] == 1)
        assert list(sink.requests[0].json()) == ["data"]
        server.script_faults(webhook_drop_rate=1.0)
        client.post(server.url, json=[task(webhookURL=sink.url + "/hook")])
        server.wait_for(lambda s: s["webhooks_dropped"] == 1)
        assert len(sink.requests) == 1


def test_upload_endpoint(server: RunwareTestServer, client: httpx.Client, sink: HTTPSink) -> None:
    target = sink.url + "/bucket/out.png?X-Amz-Signature=abc"
    item = client.post(server.url, json=[task(outputFormat="PNG", uploadEndpoint=target)]).json()["data"][0]
    assert item["imageURL"] == sink.url + "/bucket/out.png"
    (put,) = sink.requests
    assert put.method == "PUT" and put.headers["content-type"] == "image/png"
    assert decode(client.get(item["imageURL"]).content).size == (256, 256)
    sink.script([403])
    resp = client.post(server.url, json=[task(uploadEndpoint=target)])
    assert resp.status_code == 400 and resp.json()["errors"][0]["code"] == "uploadFailed"
    assert server.stats["uploads_failed"] == 1


# ----------------------------------------------------------------------------- scale and lifecycle


async def _raw_post(
    conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: Any
) -> Any:
    """One request on a kept-alive socket; raw h11 because httpx's pool, not the server, is slow at 1000."""
    data = json.dumps(body).encode()
    headers = [("host", "x"), ("authorization", "Bearer test-key"), ("content-length", str(len(data)))]
    out = conn.send(h11.Request(method="POST", target="/v1", headers=headers))
    writer.write(out + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))  # type: ignore[operator]
    payload = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Data):
            payload += event.data
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return json.loads(payload)


async def test_a_thousand_concurrent_pollers_on_keepalive_connections() -> None:
    with RunwareTestServer(delay=0.3) as server:
        assert server.port is not None

        clients = 1000
        finished: list[str] = []
        all_finished = asyncio.Event()

        async def one() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            conn = h11.Connection(h11.CLIENT)
            t = task(deliveryMethod="async")
            assert (await _raw_post(conn, reader, writer, [t]))["data"][0]["status"] == "processing"
            poll_body = [{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]
            while (await _raw_post(conn, reader, writer, poll_body))["data"][0]["status"] != "success":
                await asyncio.sleep(0.05)
            finished.append(t["taskUUID"])
            if len(finished) == clients:
                all_finished.set()
            await all_finished.wait()  # hold every connection open until all are done
            writer.close()

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(clients))), 30)
        stats = server.stats
        assert stats["total_accepted"] == clients and all(stats["accepted"][u] == 1 for u in finished)
        assert stats["connections_opened"] == stats["max_open_connections"] == clients
        assert stats["requests"] >= 2000

        # and through httpx.AsyncClient, the provider's async path
        async with httpx.AsyncClient(headers=AUTH, trust_env=False) as ac:
            t = task(deliveryMethod="async")
            assert (await ac.post(server.url, json=[t])).status_code == 200
            assert server.accepted_submissions(t["taskUUID"]) == 1


def test_stop_is_clean_and_runs_as_a_process() -> None:
    before = set(threading.enumerate())
    server = RunwareTestServer(delay=5).start()
    httpx.post(server.url, json=[task(deliveryMethod="async")], headers=AUTH, trust_env=False)
    server.stop()
    assert set(threading.enumerate()) <= before

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "airflow_provider_zimage.testing.runware_server",
            "--port",
            "0",
            "--api-key",
            "k2",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        resp = httpx.post(url, json=[task()], headers={"Authorization": "Bearer k2"}, trust_env=False)
        assert resp.status_code == 200
        assert (
            httpx.get(url.removesuffix("/v1") + "/_control/stats", trust_env=False).json()["total_accepted"]
            == 1
        )
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_the_vendored_schema_copy_matches_the_shared_seed():
    """The copy only stands in when shared/ is absent; it must never drift from the spec."""
    from airflow_provider_zimage.testing.runware_server.schema import SEED_COPY, SHARED_SEEDS

    shared = sorted(SHARED_SEEDS.glob("003_*.txt"))
    if not shared:
        pytest.skip(f"no shared seeds at {SHARED_SEEDS}")
    (copy,) = sorted(SEED_COPY.glob("003_*.txt"))
    assert copy.name == shared[0].name
    assert copy.read_bytes() == shared[0].read_bytes()
