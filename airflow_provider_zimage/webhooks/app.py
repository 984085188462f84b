"""The FastAPI app that receives Runware webhooks on the Airflow API server.

`POST /zimage/webhooks/{taskUUID}?token=...[&conn_id=...]`: check the token, bound the body, parse it,
write it to the inbox, answer. Only then does Runware get its 2xx, so an accepted webhook is never
lost; and an answer that is not 2xx makes Runware retry, which is what a full disk or an unreachable
inbox should cause.

The checks run cheapest and least trusting first: the token before the body is read (an anonymous
caller cannot make the server buffer anything), the size before parsing, parsing before storing. A
refused request stores nothing. Nothing here logs the query string: it holds the token.

Storage calls go through `asyncio.to_thread`: they block, and the S3 filesystem factory calls
`asyncio.run()`, which raises inside the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
"""Room for an image delivered inline (outputType base64Data of a large PNG), not for abuse."""

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


def _store(inbox: str | None, task_uuid: str, entries: dict[str, dict[str, Any]]) -> None:
    from airflow_provider_zimage.inbox import WebhookInbox

    WebhookInbox(inbox).put(task_uuid, entries)


def create_app(inbox: str | None = None) -> FastAPI:
    """The webhook app; `inbox` None means `[zimage] webhook_inbox`, read per request.

    Read per request rather than once so the app built at plugin import follows the configuration the
    API server runs with. `app.state.max_body_bytes` bounds request bodies (default `MAX_BODY_BYTES`).
    """
    app = FastAPI(title="Z-Image webhooks", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.max_body_bytes = MAX_BODY_BYTES

    @app.post("/webhooks/{task_uuid}")
    async def receive_webhook(
        task_uuid: str, request: Request, token: str | None = None, conn_id: str | None = None
    ) -> JSONResponse:
        from airflow_provider_zimage.inbox import ForeignTaskError, inbox_entries
        from airflow_provider_zimage.webhooks.tokens import (
            DEFAULT_CONN_ID,
            secret_for_connection,
            token_matches,
        )

        if not _TASK_UUID.match(task_uuid):
            return _refuse(404, "not a taskUUID")
        if not token:
            log.warning("Refused a webhook for task %s: no token", task_uuid)
            return _refuse(401, "missing token")
        conn_id = conn_id or DEFAULT_CONN_ID
        if not _CONN_ID.match(conn_id):
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
        if not token_matches(secret, task_uuid, token):
            log.warning("Refused a webhook for task %s: wrong token", task_uuid)
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
        try:
            entries = inbox_entries(task_uuid, body)
        except ForeignTaskError as exc:
            log.warning("Refused a webhook for task %s: %s", task_uuid, exc)
            return _refuse(422, str(exc))
        if entries:
            await asyncio.to_thread(_store, inbox, task_uuid, entries)
        log.info("Webhook for task %s: %d item(s) stored", task_uuid, len(entries))
        return JSONResponse({"stored": len(entries)})

    return app
