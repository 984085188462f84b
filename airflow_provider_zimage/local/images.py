"""Image I/O of the local backend: decoding `seedImage`/`maskImage` references and encoding results.

File references are read only under allowed roots: a request is data (a templated DAG argument, a
payload POSTed to the executor service), and a path in it must not be a way to read any file the worker
or the GPU machine can see. In-process the roots are `[zimage] local_input_roots` (default: the output
path and the DAGs folder); the executor service takes them from `--input-root` (default: none).

URL references are fetched only from allowed origins (scheme, host and port; every redirect hop is
checked the same way), at most `MAX_INPUT_BYTES`, within `INPUT_TIMEOUT`: a URL in a request must not
make the GPU host fetch cloud metadata or a localhost admin port. In-process the origins are
`[zimage] local_input_origins`, on the executor `--input-url-origin`; both default to none. Whoever wrote
the URL gets one answer for "not allowed" and "could not be fetched", so a token holder cannot tell a
closed port from a 404 on any host; the reason goes to this process's log.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from airflow_provider_zimage import config
from airflow_provider_zimage.exceptions import (
    ZImagePermanentError,
    ZImageTransientError,
    ZImageValidationError,
)
from airflow_provider_zimage.local.refusals import issue
from airflow_provider_zimage.origins import MAX_REDIRECTS, ImageOrigin, check_image_url, parse_origins

if TYPE_CHECKING:
    import httpx
    import numpy as np

__all__ = [
    "DEFAULT_QUALITY",
    "INPUT_ORIGINS_OPTION",
    "MAX_INPUT_BYTES",
    "default_input_origins",
    "default_input_roots",
    "encode_image",
    "load_image",
]

log = logging.getLogger(__name__)

DEFAULT_QUALITY = 95  # Runware's default outputQuality
# Runware documents no size limit for inputs; the largest input the models use is 2048x2048, which no
# sane encoding makes larger than an uncompressed 16 MiB. 50 MiB leaves room for camera originals that
# the backend shrinks, and stops a URL from filling the GPU host's memory.
MAX_INPUT_BYTES = 50 * 2**20
INPUT_TIMEOUT = 30.0  # seconds per connect, read or write of one input download
INPUT_DEADLINE = 120.0  # seconds for a whole input download, redirects included: a slow drip ends too
INPUT_ORIGINS_OPTION = "[zimage] local_input_origins"
_ORIGIN_OPTIONS = "[zimage] local_input_origins (in-process) or --input-url-origin (executor)"
# One answer for every URL that did not give an image: refused origin, refused redirect, 404, closed port,
# timeout. Telling them apart would let a token holder map the network behind the executor.
URL_REFUSAL = (
    "was not fetched: image URLs are fetched only from allowed origins, every redirect included "
    "(scheme, host and port: [zimage] local_input_origins in-process, --input-url-origin on the "
    "executor), and this one was not allowed or did not answer with the image; pass the image as "
    "base64 or a data URI, or allow its origin"
)


def default_input_origins() -> frozenset[ImageOrigin]:
    """`[zimage] local_input_origins` (comma-separated origins); unset: none, so URL inputs are refused
    until someone decides which servers the worker may fetch request-supplied URLs from."""
    return parse_origins(config.local_input_origins(), INPUT_ORIGINS_OPTION)


def default_input_roots() -> list[str]:
    """`[zimage] local_input_roots` (comma-separated), else the local output path and the DAGs folder."""
    return config.local_input_roots()


def encode_image(array: np.ndarray, output_format: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """HxWx3 floats in [0, 1] -> file bytes; rounding as diffusers' own numpy_to_pil does."""
    import numpy as np

    image = Image.fromarray((np.clip(array, 0.0, 1.0) * 255).round().astype("uint8"))
    buffer = io.BytesIO()
    if output_format == "PNG":
        image.save(buffer, format="PNG")
    elif output_format == "WEBP":
        image.save(buffer, format="WEBP", quality=quality)
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def load_image(
    reference: str,
    parameter: str,
    mode: str,
    input_roots: Sequence[str],
    input_origins: frozenset[ImageOrigin] = frozenset(),
) -> Image.Image:
    """Decode an image given as a data URI, base64, an http(s) URL on an allowed origin, a file:// URL
    or a path under a root."""
    reference = reference.strip()
    data: bytes | None = None
    if reference.startswith("data:"):
        data = _b64(reference.partition(",")[2], parameter)
    elif reference.lower().startswith(("http://", "https://")):
        data = _download(reference, parameter, input_origins)
    elif reference.startswith("file:"):
        path = unquote(urlparse(reference).path) if reference.startswith("file://") else reference[5:]
        data = _read_file(path, parameter, input_roots)
    elif len(reference) < 4096 and (os.path.isabs(reference) or os.path.isfile(reference)):
        data = _read_file(reference, parameter, input_roots)
    else:
        data = _b64(reference, parameter)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ZImageValidationError(
            f"{parameter}: is not a readable image ({exc})",
            [issue(parameter, "is not a readable image", reference)],
        ) from None


def _b64(text: str, parameter: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ZImageValidationError(
            f"{parameter}: is neither base64 image data, a data URI, a URL nor an existing file",
            [issue(parameter, "is neither base64 image data, a data URI, a URL nor an existing file", text)],
        ) from None


def _under_roots(path: str, roots: Sequence[str]) -> bool:
    resolved = Path(path).resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def _read_file(path: str, parameter: str, roots: Sequence[str]) -> bytes:
    if not _under_roots(path, roots):
        allowed = ", ".join(str(r) for r in roots) or "none configured"
        message = (
            f"names a file outside the folders the local backend may read (allowed: {allowed}; set "
            "[zimage] local_input_roots, or --input-root on the executor), or pass the image as base64, "
            "a data URI or an http(s) URL on an allowed origin"
        )
        raise ZImageValidationError(f"{parameter}: {message}", [issue(parameter, message, path)])
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ZImageValidationError(
            f"{parameter}: cannot read {path}: {exc.strerror}", [issue(parameter, "cannot be read", path)]
        ) from None


def _download(url: str, parameter: str, origins: frozenset[ImageOrigin]) -> bytes:
    """The bytes at `url`, each hop checked against `origins` before it is requested. Refusals and
    failures raise the one `URL_REFUSAL`: validation (a retry would fail the same way) for a refused
    origin or a 4xx, transient for what may pass later (5xx, 429, timeouts, connections); the executor
    answers both alike."""
    import httpx

    where = _origin_of(url)
    deadline = time.monotonic() + INPUT_DEADLINE
    try:
        target = check_image_url(url, origins, _ORIGIN_OPTIONS)
        with httpx.Client(timeout=INPUT_TIMEOUT, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", target) as response:
                    if response.is_redirect and response.next_request is not None:
                        target = check_image_url(response.next_request.url, origins, _ORIGIN_OPTIONS)
                        continue
                    if response.status_code >= 400:
                        transient = response.status_code >= 500 or response.status_code == 429
                        _not_fetched(parameter, where, f"HTTP {response.status_code}", transient)
                    return _bounded_body(response, parameter, where, deadline)
        _not_fetched(parameter, where, f"more than {MAX_REDIRECTS} redirects", transient=False)
    except ZImagePermanentError as exc:  # an origin off the list, first URL or a redirect hop
        _not_fetched(parameter, where, str(exc), transient=False)
    except httpx.HTTPError as exc:
        _not_fetched(parameter, where, type(exc).__name__, transient=True)


def _origin_of(url: str) -> str:
    """What the log may say about a URL: its origin, never its path or query (presigned credentials)."""
    import httpx

    try:
        return str(ImageOrigin.of(httpx.URL(url)))
    except (httpx.InvalidURL, UnicodeError):
        return "a URL that does not parse"


def _not_fetched(parameter: str, where: str, reason: str, transient: bool) -> NoReturn:
    log.warning("%s: input image from %s not fetched: %s", parameter, where, reason)
    message = f"{parameter}: {URL_REFUSAL}"
    if transient:
        # Same words and parameter as the refusal: the executor answers both with one error item.
        raise ZImageTransientError(message, parameter=parameter) from None
    raise ZImageValidationError(message, [issue(parameter, URL_REFUSAL, where)]) from None


def _bounded_body(response: httpx.Response, parameter: str, where: str, deadline: float) -> bytes:
    """The body, refused past `MAX_INPUT_BYTES` (announced or streamed; counted after decompression)
    or past the download's deadline."""
    import httpx

    declared = response.headers.get("content-length", "")
    chunks, size = [], int(declared) if declared.isdigit() else 0
    if size <= MAX_INPUT_BYTES:
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_INPUT_BYTES:
                break
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout(f"the download took longer than {INPUT_DEADLINE:.0f}s")
            chunks.append(chunk)
    if size > MAX_INPUT_BYTES:
        message = (
            f"the image at {where} is larger than {MAX_INPUT_BYTES // 2**20} MiB, the most an input may be"
        )
        raise ZImageValidationError(f"{parameter}: {message}", [issue(parameter, message, where)])
    return b"".join(chunks)
