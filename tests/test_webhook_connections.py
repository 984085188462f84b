"""Webhooks and connections: a token is bound to one connection, one task and an expiry, each connection
has its own part of the inbox, and what nobody waits for does not pile up.

Two teams share one Airflow: team A on `zimage_default`, team B on `teamb`, each with its own
`webhook_secret`. Team B holds its own secret and can guess team A's taskUUIDs (they derive from
dag/task/run/map index); what it must not be able to do is make team A's task store an image B chose.
The tokens here are computed by hand from the documented format, so the tests pin the format too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import httpx
import pytest

from airflow_provider_zimage.triggers.task import ZImageTaskTrigger
from tests.conftest import zimage_connection_json
from tests.test_webhooks import SECRET, WebhookSetup, api_server, webhooks  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("airflow_db")

SECRET_B = "team-b-secret-0d41e8"
TASK_A = "5b2e9c10-7a4d-4f6e-9b3c-1d2e3f4a5b6c"
TASK_B = "c7d8e9f0-1a2b-4c3d-8e4f-5a6b7c8d9e0f"
EVIL_URL = "https://evil.example.com/planted.png"


def result_item(task_uuid: str, n: int = 1) -> dict[str, object]:
    return {
        "taskType": "imageInference",
        "taskUUID": task_uuid,
        "imageUUID": f"0c1d2e3f-aaaa-4bbb-8ccc-{n:012d}",
        "imageURL": EVIL_URL,
        "status": "success",
    }


def v2_token(secret: str, conn_id: str, task_uuid: str, expires: int) -> str:
    """HMAC-SHA256 over version, connection, task and expiry, as docs/webhooks.md documents it."""
    message = f"zimage-webhook\n2\n{conn_id}\n{task_uuid}\n{expires}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def signed_url(
    setup: WebhookSetup,
    task_uuid: str,
    *,
    secret: str = SECRET,
    conn_id: str = "zimage_default",
    expires: int | None = None,
    signed_conn_id: str | None = None,
) -> str:
    """A webhook URL; `signed_conn_id` signs for another connection than the URL names."""
    expires = int(time.time()) + 3600 if expires is None else expires
    token = v2_token(secret, signed_conn_id or conn_id, task_uuid, expires)
    query = {"token": token, "expires": str(expires), "conn_id": conn_id}
    return f"{setup.api}/zimage/webhooks/{task_uuid}?{urlencode(query)}"


@pytest.fixture
def two_teams(webhooks: WebhookSetup, monkeypatch: pytest.MonkeyPatch) -> WebhookSetup:  # noqa: F811
    """Team A on `zimage_default` (the `webhooks` setup, secret SECRET), team B on `teamb` (SECRET_B)."""
    team_b = zimage_connection_json(webhooks.server, webhook_secret=SECRET_B, webhook_base_url=webhooks.api)
    monkeypatch.setenv("AIRFLOW_CONN_TEAMB", team_b)
    return webhooks


async def outcome_of_waiting_task(
    setup: WebhookSetup, task_uuid: str, conn_id: str = "zimage_default"
) -> dict:
    """What a deferred task waiting on the inbox sees within a second (no polling: the grace is long)."""
    trigger = ZImageTaskTrigger(
        task_uuid=task_uuid,
        zimage_conn_id=conn_id,
        deadline=time.time() + 1.0,
        webhook_inbox=f"file://{setup.inbox}",
        poll_after=time.time() + 600,
        inbox_interval=0.05,
    )
    events = [event async for event in trigger.run()]
    return dict(events[0].payload)


@pytest.fixture
def app_state() -> Iterator[object]:
    """The state of the app the API server mounted, restored after the test."""
    from airflow_provider_zimage.webhooks.plugin import ZImageWebhookPlugin

    state = ZImageWebhookPlugin.fastapi_apps[0]["app"].state
    saved = dict(state._state)
    yield state
    state._state.clear()
    state._state.update(saved)


# -- one connection's secret cannot post for another connection's task ----------------------------------


async def test_a_webhook_signed_with_another_connections_secret_is_refused_and_wakes_nothing(
    two_teams, caplog
):
    # The attack of issue 19, as it was answered 200 {"stored": 1}: team B's secret, its own conn_id.
    old_style = hmac.new(SECRET_B.encode(), TASK_A.encode(), hashlib.sha256).hexdigest()
    as_team_b = f"{two_teams.api}/zimage/webhooks/{TASK_A}?token={old_style}&conn_id=teamb"
    # The same with the current format: team B's secret, claiming team A's connection.
    as_team_a = signed_url(two_teams, TASK_A, secret=SECRET_B, conn_id="zimage_default")
    with caplog.at_level(logging.INFO, logger="airflow_provider_zimage"):
        async with httpx.AsyncClient() as client:
            for url in (as_team_b, as_team_a):
                response = await client.post(url, json=result_item(TASK_A))
                assert response.status_code == 403, response.text

    event = await outcome_of_waiting_task(two_teams, TASK_A)
    assert event["outcome"] != "store" and event["results"] == []
    assert two_teams.stored() == []
    for secret in (SECRET, SECRET_B, old_style):
        assert secret not in caplog.text


async def test_a_token_team_b_mints_for_its_own_connection_reaches_only_team_bs_inbox(two_teams, caplog):
    """Team B may sign for its own connection (it holds that secret): the delivery lands in B's part of
    the inbox, where team A's task never looks."""
    url = signed_url(two_teams, TASK_A, secret=SECRET_B, conn_id="teamb")
    with caplog.at_level(logging.INFO, logger="airflow_provider_zimage"):
        response = httpx.post(url, json=result_item(TASK_A))
    assert response.status_code == 200, response.text

    event = await outcome_of_waiting_task(two_teams, TASK_A)
    assert event["outcome"] != "store" and event["results"] == []
    assert [p.relative_to(two_teams.inbox).parts[0] for p in two_teams.stored()] == ["teamb"]
    # The log names the connection whose secret checked the delivery, never the secret or the token.
    assert "checked with the webhook secret of connection 'teamb'" in caplog.text
    assert SECRET_B not in caplog.text and url.split("token=")[1][:64] not in caplog.text


async def test_each_connections_task_is_woken_by_its_own_connections_webhook(two_teams):
    for conn_id, secret, task in (("zimage_default", SECRET, TASK_A), ("teamb", SECRET_B, TASK_B)):
        response = httpx.post(
            signed_url(two_teams, task, secret=secret, conn_id=conn_id), json=result_item(task)
        )
        assert response.status_code == 200, response.text
        event = await outcome_of_waiting_task(two_teams, task, conn_id)
        assert event["outcome"] == "store"
        assert [r["imageURL"] for r in event["results"]] == [EVIL_URL]
    # Neither task sees the other's delivery, even for the same taskUUID in both connections.
    event = await outcome_of_waiting_task(two_teams, TASK_B, "zimage_default")
    assert event["results"] == []


# -- tokens expire --------------------------------------------------------------------------------------


def test_an_expired_token_is_refused_while_an_unexpired_one_for_the_same_task_is_accepted(two_teams, caplog):
    setup = two_teams
    now = int(time.time())
    expired = signed_url(setup, TASK_A, expires=now - 1)
    with caplog.at_level(logging.INFO, logger="airflow_provider_zimage"):
        response = httpx.post(expired, json=result_item(TASK_A))
    assert response.status_code == 403 and "expired" in response.text
    assert "expired" in caplog.text
    assert setup.stored() == []

    # Moving the expiry in the URL breaks the signature.
    token = v2_token(SECRET, "zimage_default", TASK_A, now - 1)
    moved = f"{setup.api}/zimage/webhooks/{TASK_A}?token={token}&expires={now + 3600}"
    assert httpx.post(moved, json=result_item(TASK_A)).status_code == 403
    assert setup.stored() == []

    assert httpx.post(signed_url(setup, TASK_A), json=result_item(TASK_A)).status_code == 200
    assert len(setup.stored()) == 1


# -- what nobody waits for is swept, and one request stores a bounded number of items -------------------


def test_deliveries_nobody_collects_are_removed_after_the_ttl(two_teams, app_state, monkeypatch):
    setup = two_teams
    monkeypatch.setenv("AIRFLOW__ZIMAGE__WEBHOOK_INBOX_TTL", "3600")
    app_state.inbox_sweep_interval = 0  # sweep on the next delivery, not once in 10 minutes
    two_days_ago = time.time() - 2 * 86400
    stale = [
        setup.inbox / "teamb" / TASK_B / "result-late.json",  # a late or replayed delivery
        setup.inbox / TASK_B / "result-from-0.2.json",  # the layout before connections
    ]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result_item(TASK_B)))
        os.utime(path, (two_days_ago, two_days_ago))

    response = httpx.post(signed_url(setup, TASK_A), json=result_item(TASK_A))
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 10  # the sweep runs after the answer
    while any(p.parent.exists() for p in stale) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.exists() for p in stale)
    fresh = setup.stored()
    assert [p.name for p in fresh] == [f"result-{result_item(TASK_A)['imageUUID']}.json"]
    assert not (setup.inbox / TASK_B).exists()  # emptied folders go too
    assert not (setup.inbox / "teamb").exists()


def test_one_request_cannot_store_thousands_of_items(two_teams):
    from airflow_provider_zimage.webhooks.app import MAX_ITEMS_PER_WEBHOOK

    setup = two_teams

    url = signed_url(setup, TASK_A)
    flood = {"data": [result_item(TASK_A, n) for n in range(2000)]}
    response = httpx.post(url, json=flood)
    assert response.status_code == 413
    assert str(MAX_ITEMS_PER_WEBHOOK) in response.text
    assert setup.stored() == []

    most = [result_item(TASK_A, n) for n in range(MAX_ITEMS_PER_WEBHOOK)]
    response = httpx.post(url, json=most)
    assert response.status_code == 200 and response.json() == {"stored": MAX_ITEMS_PER_WEBHOOK}


def test_the_sweep_reads_object_ages_on_s3_too(moto_s3_server, s3_bucket):
    from airflow_provider_zimage.webhooks.inbox import WebhookInbox, sweep
    from tests.s3_server import MOTO_CONN_ID

    inbox = f"s3://{MOTO_CONN_ID}@{s3_bucket}/inbox"
    WebhookInbox(inbox, conn_id="teamb").put(TASK_B, {"result-x.json": result_item(TASK_B)})
    assert sweep(inbox, ttl=3600) == 0  # fresh: kept
    assert moto_s3_server.list_keys(s3_bucket) != []
    assert sweep(inbox, ttl=3600, now=time.time() + 7200) == 1
    assert moto_s3_server.list_keys(s3_bucket) == []
