"""Per-task webhook tokens: the only credential a Runware webhook carries.

Runware signs nothing (no signature header is documented); whatever authenticates a webhook has to be
in the URL we hand it. The token is HMAC-SHA256 of the taskUUID under a secret that never leaves
Airflow, so it authorises exactly one task: a token seen in a proxy log cannot post results for any
other task, and nothing stored server-side is needed to check it (the API server and the worker that
built the URL only share the secret).

Imported by the operator (to build URLs) and by the webhook app (to check them); light on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlencode

from airflow_provider_zimage.redaction import without_query  # noqa: F401  (importable from here too)

ROUTE_PREFIX = "/zimage"
"""Where the plugin's app is mounted on the Airflow API server."""

DEFAULT_CONN_ID = "zimage_default"
"""`ZImageHook.default_conn_name`, repeated so the webhook app need not import the hook to read it."""


def webhook_token(secret: str, task_uuid: str) -> str:
    return hmac.new(secret.encode("utf-8"), task_uuid.encode("utf-8"), hashlib.sha256).hexdigest()


def token_matches(secret: str, task_uuid: str, token: str) -> bool:
    """Constant-time, so response timing tells a forger nothing about how close a guess was."""
    return hmac.compare_digest(webhook_token(secret, task_uuid), token)


def configured_secret() -> str | None:
    """`[zimage] webhook_secret`: the fallback for connections without a `webhook_secret` extra."""
    from airflow_provider_zimage.compat import conf

    value = conf.get("zimage", "webhook_secret", fallback=None)
    return (value.strip() or None) if isinstance(value, str) else None


def secret_for_connection(conn_id: str) -> str | None:
    """The secret tokens of `conn_id`'s tasks are signed with, as the worker that signed them chose it.

    A connection that cannot be read falls back to the configured secret, exactly as the operator
    does when the connection has no `webhook_secret` extra.
    """
    from airflow_provider_zimage.hooks.runware import ZImageHook

    try:
        secret = ZImageHook(conn_id).settings.webhook_secret
    except Exception:  # AirflowNotFoundException and friends, without importing them
        secret = None
    return secret or configured_secret()


def webhook_url(base_url: str, task_uuid: str, secret: str, conn_id: str = DEFAULT_CONN_ID) -> str:
    """`{base}/zimage/webhooks/{taskUUID}?token=...`, with `conn_id` only when it is not the default.

    The connection id travels in the URL because the API server has to know whose secret signed the
    token; it needs no protection of its own, since a token checked under another secret fails.
    """
    query = {"token": webhook_token(secret, task_uuid)}
    if conn_id != DEFAULT_CONN_ID:
        query["conn_id"] = conn_id
    return f"{base_url.rstrip('/')}{ROUTE_PREFIX}/webhooks/{task_uuid}?{urlencode(query)}"
