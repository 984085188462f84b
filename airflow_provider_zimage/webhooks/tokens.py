"""Per-task webhook tokens: the only credential a Runware webhook carries.

Runware signs nothing (no signature header is documented); whatever authenticates a webhook has to be
in the URL we hand it. The token is HMAC-SHA256, under a secret that never leaves Airflow, of::

    "zimage-webhook\\n2\\n{conn_id}\\n{taskUUID}\\n{expires}"

so it authorises one task *of one connection* until `expires` (epoch seconds, in the URL beside it).
The connection is in the signed message because the inbox is partitioned by connection: a token
checks only under the secret of the connection the URL names, and what it lets in lands only in that
connection's part of the inbox. Someone holding one connection's secret can therefore neither write
into another connection's part (the token would have to be signed with that connection's secret) nor
wake another connection's task (which reads only its own part). The expiry bounds what a token seen
in a proxy log is worth. Nothing stored server-side is needed to check a token.

Imported by the operator (to build URLs) and by the webhook app (to check them); light on purpose.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import time
from urllib.parse import urlencode

from airflow_provider_zimage import config
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.redaction import without_query  # noqa: F401  (importable from here too)

ROUTE_PREFIX = "/zimage"
"""Where the plugin's app is mounted on the Airflow API server."""

DEFAULT_CONN_ID = "zimage_default"
"""`ZImageHook.default_conn_name`, repeated so the webhook app need not import the hook to read it."""

TOKEN_VERSION = 2
"""Bumped whenever the signed message changes; tokens of another version never match."""

TOKEN_GRACE_SECONDS = 3600
"""How long a token outlives the operator's `timeout`: Runware retries a webhook for a while after the
task finishes, and a task that finishes just before its deadline must still receive it."""


class TokenCheck(enum.Enum):
    VALID = "valid"
    EXPIRED = "expired"
    NO_EXPIRY = "no expiry"
    INVALID = "invalid"


def _message(conn_id: str, task_uuid: str, expires: int) -> bytes:
    return f"zimage-webhook\n{TOKEN_VERSION}\n{conn_id}\n{task_uuid}\n{expires}".encode()


def webhook_token(secret: str, conn_id: str, task_uuid: str, expires: int) -> str:
    return hmac.new(secret.encode("utf-8"), _message(conn_id, task_uuid, expires), hashlib.sha256).hexdigest()


def token_expiry(timeout: float, now: float | None = None) -> int:
    """The `expires` of a task submitted now that waits at most `timeout` seconds."""
    return math.ceil((time.time() if now is None else now) + timeout + TOKEN_GRACE_SECONDS)


def check_token(
    secret: str, conn_id: str, task_uuid: str, token: str, expires: str | None, now: float | None = None
) -> TokenCheck:
    """Whether `token` authorises a delivery for `task_uuid` of `conn_id` now.

    The signature is checked before the expiry, so "expired" is only ever said about a genuine token;
    the comparison is constant-time, so response timing tells a forger nothing about a guess.
    """
    if expires is None:
        return TokenCheck.NO_EXPIRY  # signed before tokens had one (provider 0.2), or forged
    if not expires.isdigit() or len(expires) > 12:
        return TokenCheck.INVALID
    if not hmac.compare_digest(webhook_token(secret, conn_id, task_uuid, int(expires)), token):
        return TokenCheck.INVALID
    if int(expires) < (time.time() if now is None else now):
        return TokenCheck.EXPIRED
    return TokenCheck.VALID


def configured_secret() -> str | None:
    """`[zimage] webhook_secret`: the fallback for connections without a `webhook_secret` extra."""
    return config.webhook_secret()


def secret_for_connection(conn_id: str) -> str | None:
    """The secret tokens of `conn_id`'s tasks are signed with, as the worker that signed them chose it.

    A connection that cannot be read falls back to the configured secret, exactly as the operator
    does when the connection has no `webhook_secret` extra. Connections sharing that fallback share
    trust (its holder can sign for any of them); only a token issued for one cannot be replayed for
    another, since the connection is part of the signed message.
    """
    try:
        secret = ZImageHook(conn_id).settings.webhook_secret
    except Exception:  # AirflowNotFoundException and friends, without importing them
        secret = None
    return secret or configured_secret()


def webhook_url(
    base_url: str, task_uuid: str, secret: str, conn_id: str = DEFAULT_CONN_ID, *, expires: int
) -> str:
    """`{base}/zimage/webhooks/{taskUUID}?token=...&expires=...`, plus `conn_id` unless it is the default.

    The connection id travels in the URL because the API server has to know whose secret to check the
    token with and which part of the inbox to write; it is signed, so changing it breaks the token.
    """
    query = {"token": webhook_token(secret, conn_id, task_uuid, expires), "expires": str(expires)}
    if conn_id != DEFAULT_CONN_ID:
        query["conn_id"] = conn_id
    return f"{base_url.rstrip('/')}{ROUTE_PREFIX}/webhooks/{task_uuid}?{urlencode(query)}"
