"""Image I/O of the local backend: decoding `seedImage`/`maskImage` references and encoding results.

File references are read only under allowed roots: a request is data (a templated DAG argument, a
payload POSTed to the executor service), and a path in it must not be a way to read any file the worker
or the GPU machine can see. In-process the roots are `[zimage] local_input_roots` (default: the output
path and the DAGs folder); the executor service takes them from `--input-root` (default: none).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from airflow_provider_zimage import config
from airflow_provider_zimage.exceptions import ZImageTransientError, ZImageValidationError
from airflow_provider_zimage.local.refusals import issue

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEFAULT_QUALITY", "default_input_roots", "encode_image", "load_image"]

DEFAULT_QUALITY = 95  # Runware's default outputQuality
MAX_DOWNLOAD = 64 * 1024 * 1024


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


def load_image(reference: str, parameter: str, mode: str, input_roots: Sequence[str]) -> Image.Image:
    """Decode an image given as a data URI, base64, http(s) URL, file:// URL or a path under a root."""
    reference = reference.strip()
    data: bytes | None = None
    if reference.startswith("data:"):
        data = _b64(reference.partition(",")[2], parameter)
    elif reference.lower().startswith(("http://", "https://")):
        data = _download(reference, parameter)
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
            "a data URI or an http(s) URL"
        )
        raise ZImageValidationError(f"{parameter}: {message}", [issue(parameter, message, path)])
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ZImageValidationError(
            f"{parameter}: cannot read {path}: {exc.strerror}", [issue(parameter, "cannot be read", path)]
        ) from None


def _download(url: str, parameter: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=60.0, follow_redirects=True) as response:
            if 400 <= response.status_code < 500:
                raise ZImageValidationError(
                    f"{parameter}: download failed with HTTP {response.status_code}",
                    [
                        issue(
                            parameter, f"download failed with HTTP {response.status_code}", url.split("?")[0]
                        )
                    ],
                )
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_DOWNLOAD:
                    raise ZImageValidationError(
                        f"{parameter}: image is larger than {MAX_DOWNLOAD // 2**20} MiB",
                        [issue(parameter, "is too large", url.split("?")[0])],
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
        raise ZImageTransientError(
            f"{parameter}: could not download {url.split('?')[0]}: {exc}", status_code=status
        ) from exc
