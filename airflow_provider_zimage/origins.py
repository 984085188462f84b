"""Origins (scheme, host, port) that a URL taken from data may be fetched from.

Two fetches follow URLs that someone else wrote: result downloads (a webhook item or a poll answer names
the image URL, `hooks/runware.py`) and the local backends' URL inputs (`seedImage` / `maskImage` in a
request, `local/images.py`). Both check every URL, each redirect hop included, against an allow-list of
origins parsed here, so that "which origins" is one rule with one normal form. Pure: httpx parses, nothing
is fetched and nothing reads Airflow's configuration.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from airflow_provider_zimage.exceptions import ZImagePermanentError

__all__ = [
    "DEFAULT_PORTS",
    "MAX_REDIRECTS",
    "ImageOrigin",
    "check_image_url",
    "parse_origin",
    "parse_origins",
]

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_REDIRECTS = 5
# Labels of letters, digits, "-" and "_" (Docker and Kubernetes service names use "_" too).
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
_ENTRY_FORMS = "host (https on 443), host:port (https), http://host[:port] or https://host[:port]"


@dataclass(frozen=True)
class ImageOrigin:
    """Scheme, host and port: what a download is allowed by. A host alone is not enough, because the
    same host's other ports (an executor's admin listener, a proxy's internal one) are other services."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: httpx.URL) -> ImageOrigin:
        """Compared in one normal form: lower case, ASCII (IDNA) names, compressed IP literals and the
        scheme's default port written out, so `HTTPS://Host:443` and `https://host` are one origin."""
        host = url.raw_host.decode("ascii").lower()
        with contextlib.suppress(ValueError):
            host = ipaddress.ip_address(host).compressed
        return cls(url.scheme, host, url.port or DEFAULT_PORTS.get(url.scheme, 0))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}" if self.port else f"{self.scheme}://{host}"


def parse_origin(entry: str, option: str) -> ImageOrigin:
    """One allow-list entry. Without a scheme it means https, and without a port the scheme's default:
    a bare host opens https on 443 only, never its other ports or plain http. `option` names where the
    entry came from (`[zimage] allowed_image_hosts`, `--input-url-origin`) in the refusal."""
    text = entry
    if "://" not in text:
        if text.count(":") > 1 and not text.startswith("["):
            text = f"[{text}]"  # a bare IPv6 literal
        text = f"https://{text}"
    try:
        url = httpx.URL(text)
        origin = ImageOrigin.of(url)
    except (httpx.InvalidURL, UnicodeError):
        url, origin = None, None
    if (
        url is None
        or origin is None
        or url.scheme not in DEFAULT_PORTS
        or url.userinfo
        or url.path not in ("", "/")
        or url.query
        or url.fragment
        or not 0 < origin.port < 65536
        or not (":" in origin.host or _HOST_NAME.fullmatch(origin.host))
    ):
        raise ZImagePermanentError(
            f"{option}: cannot read the entry {entry!r}; write each entry as {_ENTRY_FORMS}"
        )
    return origin


def parse_origins(entries: Iterable[str], option: str) -> frozenset[ImageOrigin]:
    """Entries as a list or comma-separated strings; blanks are skipped."""
    return frozenset(
        parse_origin(part.strip(), option) for entry in entries for part in entry.split(",") if part.strip()
    )


def check_image_url(
    url: str | httpx.URL,
    origins: frozenset[ImageOrigin],
    option: str = "[zimage] allowed_image_hosts",
) -> httpx.URL:
    """The URL to fetch, parsed by httpx itself so that what is checked is what is fetched; refused
    (permanently: a retry would fetch the same URL) off the allowed origins. The refusal names the
    origin only: a path or query may hold a presigned credential."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        origin = ImageOrigin.of(parsed)
    except (httpx.InvalidURL, UnicodeError):
        raise ZImagePermanentError("refusing to download an image from a URL that does not parse") from None
    if parsed.userinfo:
        raise ZImagePermanentError(
            f"refusing to download an image from {origin}: the URL carries userinfo (user:password@), "
            "which image URLs never need"
        )
    if origin.scheme not in DEFAULT_PORTS or not origin.host or origin not in origins:
        allowed = f"only {', '.join(sorted(map(str, origins)))} are" if origins else "no origin is"
        raise ZImagePermanentError(
            f"refusing to download an image from {origin}: {allowed} allowed (add the origin, "
            f"with its port, to {option})"
        )
    return parsed
