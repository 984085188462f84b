"""Keeping credentials out of logs, exceptions, XCom and manifests: one place, every caller.

The provider's credentials hide in three shapes: known values (the API key, the webhook secret), the
query string of a URL (webhook tokens, presigned S3 signatures) and a URL's userinfo. Every module that
prints, raises or records text uses these helpers rather than its own variant, so a new kind of
credential is handled once.

A credential can also arrive inside a request: Airflow renders Jinja in mapped values and batch rows,
so `{{ conn.zimage_default.password }}` in a table becomes the API key in a prompt. `secret_paths`
finds such values (the given credentials and whatever Airflow's secrets masker holds) so the operators
refuse the request; `scrub_secrets` is the defence in depth for what a manifest or a label records.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^\s/?#@'\"]*@)?([^\s?#'\"]*)(\?[^\s#'\"]*)?")


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Remove known secret values (servers sometimes echo what they got; masking short values would
    blank out ordinary words, so values under 4 characters are left)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


class SecretValues(tuple[str, ...]):
    """Credentials already passed through `_secret_values`: a batch checks 100,000 rows against the
    same ones, and reading `min_length_masked_secret` for each row cost more than the check itself."""

    @classmethod
    def of(cls, secrets: Iterable[str | None]) -> SecretValues:
        return cls(_secret_values(secrets))


def _secret_values(secrets: Iterable[str | None]) -> list[str]:
    """The given credentials long enough to look for: as short as Airflow's masker would mask
    (`[logging] min_length_masked_secret`), never shorter than `redact`'s 4 characters."""
    if isinstance(secrets, SecretValues):
        return list(secrets)
    # why: Airflow at runtime only; models and the executor service import this module without it.
    from airflow_provider_zimage.compat import conf

    shortest = max(4, conf.getint("logging", "min_length_masked_secret", fallback=5))
    return [s for s in secrets if isinstance(s, str) and len(s) >= shortest]


def _image_data(text: str) -> bool:
    """A data URI or base64 image: bytes, not text a template could put a secret into; a short
    secret would match one by chance. Prompts stop at 3000 characters; base64 has no whitespace."""
    return text.startswith("data:") or (len(text) > 3000 and not any(c.isspace() for c in text[:3000]))


def secret_paths(value: Any, secrets: Iterable[str | None] = ()) -> list[str]:
    """Where in `value` (nested dicts and lists) a string holds a known secret: one of `secrets`, or
    anything Airflow's secrets masker hides in this process. Paths read `lora[0].model`."""
    # why: Airflow at runtime only; models and the executor service import this module without it.
    from airflow_provider_zimage.compat import secrets_masker_patterns

    known = _secret_values(secrets)
    patterns = secrets_masker_patterns()
    found: list[str] = []

    def walk(item: Any, where: str) -> None:
        if isinstance(item, str):
            if not _image_data(item) and (
                any(s in item for s in known) or any(p.search(item) for p in patterns)
            ):
                found.append(where)
        elif isinstance(item, Mapping):
            for key, inner in item.items():
                walk(inner, f"{where}.{key}" if where else str(key))
        elif isinstance(item, (list, tuple)):
            for index, inner in enumerate(item):
                walk(inner, f"{where}[{index}]")

    walk(value, "")
    return found


def scrub_secrets(value: Any, secrets: Iterable[str | None] = ()) -> Any:
    """`value` (nested dicts and lists) with every known secret in its strings replaced by "***": what
    a manifest or a page may show of text that should never have held one."""
    # why: Airflow at runtime only; models and the executor service import this module without it.
    from airflow_provider_zimage.compat import secrets_masker_patterns

    known = _secret_values(secrets)
    patterns = secrets_masker_patterns()
    if not known and not patterns:
        return value

    def scrub(item: Any) -> Any:
        if isinstance(item, str):
            if _image_data(item):
                return item
            for pattern in patterns:
                item = pattern.sub("***", item)
            return redact(item, known)
        if isinstance(item, Mapping):
            return {key: scrub(inner) for key, inner in item.items()}
        if isinstance(item, list):
            return [scrub(inner) for inner in item]
        return item

    return scrub(value)


def redact_urls(text: str) -> str:
    """Every URL in `text` without its userinfo and query (marked as redacted when there was one)."""

    def scrub(match: re.Match[str]) -> str:
        userinfo = f"{REDACTED}@" if "@" in match.group(0).split("?")[0] else ""
        query = f"?{REDACTED}" if match.group(3) else ""
        return f"{match.group(1)}{userinfo}{match.group(2)}{query}"

    return _URL.sub(scrub, text)


def without_query(url: str) -> str:
    """A URL fit for a log line: tokens and presigned signatures live in the query string."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def query_secrets(url: str) -> list[str]:
    """The values a token or a presigned signature hides in, to mask each on its own wherever it shows."""
    return [value for _, value in parse_qsl(urlsplit(url).query) if len(value) >= 8]


def mask_credentials(*values: str | None) -> None:
    """Register credentials with Airflow's secrets masker (task logs, rendered fields), one by one.

    Only values the masker will keep: empty ones and ones shorter than `[logging]
    min_length_masked_secret` (which it cannot mask without blanking ordinary words) are left out,
    because handing one over makes every successful task log "Skipping masking for a secret as it's
    too short". Short values still go through `redact` wherever the provider raises or records text.
    """
    from airflow.sdk.log import mask_secret

    # why: Airflow at runtime only; models and the executor service import this module without it.
    from airflow_provider_zimage.compat import conf

    shortest = conf.getint("logging", "min_length_masked_secret", fallback=5)
    for value in values:
        if isinstance(value, str) and len(value) >= shortest:
            mask_secret(value)


def connection_extras(conn: Any, conn_id: str | None = None) -> dict[str, Any]:
    """A connection's extras, read without `Connection.extra_dejson`.

    `extra_dejson` hands every extra value to the secrets masker, so ordinary settings (`device`
    "cpu", `dtype` "auto") reach it and it logs "Skipping masking for a secret as it's too short" in
    every task. Airflow masks the password and the whole extra text when it loads a connection; the
    extras that are credentials are masked one by one by the caller (`mask_credentials`).
    """
    raw = conn.extra
    if isinstance(raw, dict):
        return dict(raw)
    if not raw:
        return {}
    try:
        extra = json.loads(raw)
    except ValueError:
        extra = None
    if not isinstance(extra, dict):
        # Never the text itself: it may hold a secret.
        log.warning("The extra of connection %r is not a JSON object; it is ignored", conn_id or conn.conn_id)
        return {}
    return extra
