"""Keeping credentials out of logs, exceptions, XCom and manifests: one place, every caller.

The provider's credentials hide in three shapes: known values (the API key, the webhook secret), the
query string of a URL (webhook tokens, presigned S3 signatures) and a URL's userinfo. Every module that
prints, raises or records text uses these helpers rather than its own variant, so a new kind of
credential is handled once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

REDACTED = "<redacted>"
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^\s/?#@'\"]*@)?([^\s?#'\"]*)(\?[^\s#'\"]*)?")


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Remove known secret values (servers sometimes echo what they got; masking short values would
    blank out ordinary words, so values under 4 characters are left)."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


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
