"""The FastAPI app that receives Runware webhooks on the Airflow API server.

`POST /zimage/webhooks/{taskUUID}?token=...&expires=...[&conn_id=...]`: check the token under the secret
of the URL's connection (and only that one), bound the body, parse it, write it to that connection's
part of the inbox, answer. Only then does Runware get its 2xx, so an accepted webhook is never
lost; and an answer that is not 2xx makes Runware retry, which is what a full disk or an unreachable
inbox should cause.

The checks run cheapest and least trusting first: the token before the body is read (an anonymous
caller cannot make the server buffer anything), the size before parsing, parsing before storing. A
refused request stores nothing. Nothing here logs the query string: it holds the token. What is
logged names the connection whose secret checked a delivery, so an operator can tell whose secret
let something in.

Now and then (at most every `app.state.inbox_sweep_interval` seconds, after an answer) the app removes
inbox objects older than `[zimage] webhook_inbox_ttl`: the receiver is what makes the inbox grow, so
it is what keeps it small.

Storage calls go through `asyncio.to_thread`: they block, and the S3 filesystem factory calls
`asyncio.run()`, which raises inside the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from airflow_provider_zimage import config
from airflow_provider_zimage.exceptions import ForeignTaskError
from airflow_provider_zimage.webhooks.inbox import WebhookInbox, inbox_entries, sweep
from airflow_provider_zimage.webhooks.tokens import (
    DEFAULT_CONN_ID,
    TokenCheck,
    check_token,
    secret_for_connection,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
"""Room for an image delivered inline (outputType base64Data of a large PNG), not for abuse."""

MAX_ITEMS_PER_WEBHOOK = 100
"""Items (results and errors) one request may carry: a task has at most 20 results (numberResults), so
this is room for every result and its errors several times over, not for a flood of objects."""

INBOX_SWEEP_INTERVAL = 600.0
"""Seconds between two sweeps of the inbox by one API server process."""

_TASK_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_CONN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds `limit`; a declared length over it is refused unread."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _item_count(body: dict[str, Any] | list[Any]) -> int:
    """How many items a body holds, counted before any of them is looked at."""
    if isinstance(body, list):
        return len(body)
    data, errors = body.get("data"), body.get("errors")
    return (len(data) if isinstance(data, list) else 1) + (len(errors) if isinstance(errors, list) else 0)


def _store(inbox: str | None, conn_id: str, task_uuid: str, entries: dict[str, dict[str, Any]]) -> None:
    WebhookInbox(inbox, conn_id=conn_id).put(task_uuid, entries)


def _sweep(inbox: str | None) -> None:
    """Remove what nobody collected; a failure is logged and tried again at the next interval."""
    try:
        ttl = config.webhook_inbox_ttl()
        removed = sweep(inbox, ttl)
    except Exception as exc:
        log.error("Could not sweep the webhook inbox: %s", exc)
        return
    if removed:
        log.info("Webhook inbox: removed %d item(s) older than %gs that no task collected", removed, ttl)


def _sweep_task(app: FastAPI, inbox: str | None) -> BackgroundTask | None:
    """The sweep to run after this answer, when the last one is long enough ago."""
    now = time.monotonic()
    last = getattr(app.state, "inbox_swept_at", None)
    if last is not None and now - last < float(app.state.inbox_sweep_interval):
        return None
    app.state.inbox_swept_at = now

    async def run() -> None:
        await asyncio.to_thread(_sweep, inbox)

    return BackgroundTask(run)


def create_app(inbox: str | None = None) -> FastAPI:
    """The webhook app; `inbox` None means `[zimage] webhook_inbox`, read per request.

    Read per request rather than once so the app built at plugin import follows the configuration the
    API server runs with. `app.state.max_body_bytes` bounds request bodies (default `MAX_BODY_BYTES`),
    `app.state.inbox_sweep_interval` spaces the sweeps (default `INBOX_SWEEP_INTERVAL`).
    """
    app = FastAPI(title="Z-Image webhooks", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.max_body_bytes = MAX_BODY_BYTES
    app.state.inbox_sweep_interval = INBOX_SWEEP_INTERVAL

    @app.post("/webhooks/{task_uuid}")
    async def receive_webhook(
        task_uuid: str,
        request: Request,
        token: str | None = None,
        expires: str | None = None,
        conn_id: str | None = None,
    ) -> JSONResponse:
        if not _TASK_UUID.match(task_uuid):
            return _refuse(404, "not a taskUUID")
        if not token:
            log.warning("Refused a webhook for task %s: no token", task_uuid)
            return _refuse(401, "missing token")
        conn_id = conn_id or DEFAULT_CONN_ID
        if not _CONN_ID.match(conn_id):
            log.warning("Refused a webhook for task %s: not a connection id", task_uuid)
            return _refuse(403, "invalid token")
        secret = await asyncio.to_thread(secret_for_connection, conn_id)
        if secret is None:
            # A configuration problem, not a forgery: 503 makes Runware retry until it is fixed.
            log.error(
                "Cannot check a webhook for task %s: connection %r has no webhook_secret extra and "
                "[zimage] webhook_secret is not set",
                task_uuid,
                conn_id,
            )
            return _refuse(503, "webhook secret not configured")
        # Only the URL's connection's secret is tried: a token signed under another connection's
        # secret, or for another connection, fails here (the connection is part of what is signed).
        checked = check_token(secret, conn_id, task_uuid, token, expires)
        if checked is TokenCheck.EXPIRED:
            log.warning(
                "Refused a webhook for task %s of connection %r: its token expired", task_uuid, conn_id
            )
            return _refuse(403, "token expired")
        if checked is TokenCheck.NO_EXPIRY:
            # A URL built before tokens named their connection (provider 0.2), or a forgery: the
            # task it was built for finishes by polling getResponse after its grace period.
            log.warning(
                "Refused a webhook for task %s of connection %r: a token without expiry (built before "
                "provider 0.3, or forged); a task waiting for it finishes by polling",
                task_uuid,
                conn_id,
            )
            return _refuse(403, "invalid token")
        if checked is not TokenCheck.VALID:
            log.warning(
                "Refused a webhook for task %s: its token does not check with the webhook secret of "
                "connection %r",
                task_uuid,
                conn_id,
            )
            return _refuse(403, "invalid token")

        limit = int(request.app.state.max_body_bytes)
        raw = await _read_body(request, limit)
        if raw is None:
            log.warning("Refused a webhook for task %s: body over %d bytes", task_uuid, limit)
            return _refuse(413, f"body larger than {limit} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            return _refuse(400, "body is not JSON")
        if not isinstance(body, (dict, list)):
            return _refuse(400, "body is neither a task object, a list of them, nor a data envelope")
        count = _item_count(body)
        if count > MAX_ITEMS_PER_WEBHOOK:
            log.warning(
                "Refused a webhook for task %s of connection %r: %d items, at most %d per request",
                task_uuid,
                conn_id,
                count,
                MAX_ITEMS_PER_WEBHOOK,
            )
            return _refuse(413, f"{count} items in one webhook; at most {MAX_ITEMS_PER_WEBHOOK} per request")
        try:
            entries = inbox_entries(task_uuid, body)
        except ForeignTaskError as exc:
            log.warning("Refused a webhook for task %s: %s", task_uuid, exc)
            return _refuse(422, str(exc))
        if entries:
            await asyncio.to_thread(_store, inbox, conn_id, task_uuid, entries)
        log.info(
            "Webhook for task %s, checked with the webhook secret of connection %r: %d item(s) stored",
            task_uuid,
            conn_id,
            len(entries),
        )
        return JSONResponse({"stored": len(entries)}, background=_sweep_task(request.app, inbox))

    return app
