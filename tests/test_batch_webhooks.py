"""Webhook delivery for `ZImageBatchGenerateOperator`: every task of the batch carries its own webhook
URL, the Runware test server POSTs real webhooks to the plugin app served by uvicorn (as in
`test_webhooks`), and the batch is woken from the inbox instead of polling.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_provider_zimage.compat import AirflowFailException
from airflow_provider_zimage.operators.batch import read_manifest_entries
from airflow_provider_zimage.webhooks.tokens import TOKEN_GRACE_SECONDS, webhook_token
from tests.conftest import zimage_connection_json
from tests.dagtest import FakeTI, run_dag, task_states
from tests.test_batch import batch, one_submission_each, rows, run_try
from tests.test_webhooks import SECRET, WebhookSetup, api_server, webhooks  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture
def wh(webhooks: WebhookSetup) -> WebhookSetup:  # noqa: F811  (the imported fixture)
    """`test_webhooks`' setup: `zimage_default` with a secret and base URL, a private inbox."""
    return webhooks


BATCH_WEBHOOK_DAG = """
import json
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator, read_manifest_entries

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    @task
    def to_requests():
        return [{"prompt": f"webhook catalogue item {i}", "seed": 700 + i} for i in range(PARAMS["n"])]

    shots = ZImageBatchGenerateOperator(
        task_id="shots",
        requests=to_requests(),
        width=256,
        height=256,
        output_path=PARAMS["output"],
        deferrable=True,
        defer_after=0,
        chunk_size=10,
        delivery="webhook",
        webhook_check_interval=0.05,
        poll_interval=0.05,
        max_poll_interval=0.2,
        **PARAMS["op_kwargs"],
    )

    @task
    def collect(summary):
        entries = read_manifest_entries(summary["manifest_uri"])
        out = Path(PARAMS["output"].removeprefix("file://"), "collected.json")
        out.write_text(json.dumps({"summary": summary, "entries": entries}))

    collect(shots.output)
"""


def run_batch_dag(dag_id: str, output: str, n: int, **op_kwargs: Any) -> Any:
    return run_dag(dag_id, BATCH_WEBHOOK_DAG, dag_id=dag_id, output=output, n=n, op_kwargs=op_kwargs)


def collected(output: str) -> dict[str, Any]:
    return json.loads(Path(output.removeprefix("file://"), "collected.json").read_text())


def test_a_deferred_batch_is_woken_by_webhooks_without_polling(wh, output_dir, caplog, capfd):
    wh.server.configure(delay=0.3)
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        run = run_batch_dag("batch_webhooks", output_dir, 25, webhook_grace_period=120)
    assert run.state == "success", task_states(run)
    # Woken by the webhooks before polling would start (no getResponse poll is asserted below); the
    # bound is the grace period, not a speed target.
    assert time.monotonic() - started < 120

    got = collected(output_dir)
    assert got["summary"]["images"] == 25 and got["summary"]["failed"] == 0
    assert sorted(e["index"] for e in got["entries"]) == list(range(25))
    stats = wh.server.stats
    # Neither the trigger nor the resumed worker asked getResponse: everything came from the inbox.
    assert stats["get_response_polls"] == 0
    assert stats["webhook_deliveries"] == 25
    one_submission_each(wh.server, 25)
    assert wh.stored() == []  # every task's inbox folder is cleared once its image is stored

    # Each task was sent its own URL, whose token authorises that task only.
    sent = [t for body in wh.server.request_bodies for t in body or [] if t.get("webhookURL")]
    assert len(sent) == 25
    for item in sent:
        url = urlsplit(item["webhookURL"])
        assert f"{url.scheme}://{url.netloc}{url.path}" == f"{wh.api}/zimage/webhooks/{item['taskUUID']}"
        query = parse_qs(url.query)
        expires = int(query["expires"][0])
        assert time.time() + 3600 < expires < time.time() + 3600 + TOKEN_GRACE_SECONDS + 60  # timeout 3600
        assert query["token"] == [webhook_token(SECRET, "zimage_default", item["taskUUID"], expires)]

    # The secret and the tokens stay out of logs, the XCom summary and the manifest.
    logs = caplog.text + "".join(capfd.readouterr())
    assert f"Runware will POST the results to {wh.api}/zimage/webhooks/<taskUUID>" in logs
    manifest = Path(got["summary"]["manifest_uri"].removeprefix("file://")).read_text()
    tokens = wh.sent_tokens()
    for text in (logs, json.dumps(got), manifest):
        assert SECRET not in text
        assert not any(token in text for token in tokens)


def test_lost_webhooks_cost_latency_not_images(wh, output_dir):
    wh.server.configure(delay=0.2)
    wh.server.script_faults(webhook_drop_rate=0.5, seed=3)
    run = run_batch_dag("batch_webhooks_lost", output_dir, 20, webhook_grace_period=0.5)
    assert run.state == "success", task_states(run)
    stats = wh.server.stats
    assert stats["webhooks_dropped"] > 0 and stats["webhook_deliveries"] > 0
    assert stats["get_response_polls"] > 0  # the dropped ones were found by polling after the grace
    one_submission_each(wh.server, 20)
    assert collected(output_dir)["summary"]["images"] == 20
    assert wh.stored() == []


def test_without_deferring_the_worker_waits_on_the_inbox(wh, output_dir):
    wh.server.configure(delay=0.2)
    op = batch(output_dir, rows(12), delivery="webhook", webhook_grace_period=30, webhook_check_interval=0.05)
    summary = run_try(op, FakeTI("manual__inbox", dag_id="batch_inbox"))
    assert summary["images"] == 12
    assert wh.server.stats["get_response_polls"] == 0
    one_submission_each(wh.server, 12)


def test_a_failure_delivered_by_webhook_is_reported_and_the_retry_resubmits_only_it(wh, output_dir):
    """An error item in the inbox is Runware failing that taskUUID: a new generation on the next try,
    and its inbox folder is cleared so the retry is not failed by the old error again."""
    wh.server.configure(delay=0.1)
    requests = rows(6)
    requests[4] = {"prompt": "this one fails __fail__", "seed": 99}
    ti = FakeTI("manual__wh_fail", dag_id="batch_wh_fail")
    op = batch(output_dir, requests, delivery="webhook", webhook_grace_period=30, webhook_check_interval=0.05)
    with pytest.raises(Exception, match=r"1 of 6 request\(s\) failed.*requests\[4\]"):
        run_try(op, ti)
    assert wh.server.stats["get_response_polls"] == 0
    assert wh.stored() == []
    assert wh.server.stats["total_accepted"] == 6

    requests[4] = {"prompt": "this one fails __fail__", "seed": 99}
    tolerant = batch(
        output_dir,
        requests,
        delivery="webhook",
        webhook_grace_period=30,
        webhook_check_interval=0.05,
        fail_on_partial_error=False,
    )
    summary = run_try(tolerant, ti)  # the retry: only requests[4] is sent again, under a new taskUUID
    assert summary["images"] == 5 and summary["failed"] == 1
    stats = wh.server.stats
    assert stats["total_accepted"] == 7 and set(stats["accepted"].values()) == {1}
    assert [e["index"] for e in read_manifest_entries(summary["manifest_uri"])] == [0, 1, 2, 3, 5]


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"webhook_base_url": None}, "webhook_base_url"), ({"webhook_secret": None}, "webhook_secret")],
)
def test_a_webhook_misconfiguration_fails_the_batch_before_any_post(
    wh, output_dir, monkeypatch, extra, named
):
    settings = {"webhook_secret": SECRET, "webhook_base_url": wh.api, **extra}
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", zimage_connection_json(wh.server, **settings))
    monkeypatch.delenv("AIRFLOW__ZIMAGE__WEBHOOK_SECRET", raising=False)
    op = batch(output_dir, rows(3), delivery="webhook")
    with pytest.raises(AirflowFailException, match=named):
        op.execute({"ti": FakeTI("manual__wh_misconfigured", dag_id="batch_wh_bad")})
    assert wh.server.stats["requests"] == 0


def test_batch_webhook_arguments_are_checked_when_the_dag_is_parsed():
    with pytest.raises(ValueError, match="delivery must be 'polling' or 'webhook'"):
        batch("file:///tmp/x", rows(1), delivery="push")
    with pytest.raises(ValueError, match="webhook_check_interval must be > 0"):
        batch("file:///tmp/x", rows(1), delivery="webhook", webhook_check_interval=0)
