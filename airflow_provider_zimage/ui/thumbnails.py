"""Thumbnails: made once, on first view, and kept next to the image as `thumbnails/{name}.jpg`.

A run's page shows up to hundreds of cards; sending full 1024x1024 images for them would be tens of
megabytes per page. The thumbnail is written with the store's atomic write, so two viewers opening the
same page at once both get a complete file, and a later view reads it instead of decoding the original.
"""

from __future__ import annotations

import io
import logging

from airflow.sdk import ObjectStoragePath

from airflow_provider_zimage.storage.artifacts import write_bytes_atomic

log = logging.getLogger(__name__)

__all__ = ["THUMBNAIL_DIR", "THUMBNAIL_SIZE", "thumbnail", "thumbnail_path"]

THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_SIZE = 256
"""Longest side in pixels; the grid's cells are 256 CSS pixels wide."""


def thumbnail_path(image: ObjectStoragePath) -> ObjectStoragePath:
    return image.parent / THUMBNAIL_DIR / f"{image.name}.jpg"


def render(data: bytes, size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG at most `size` pixels on its longest side."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.thumbnail((size, size))
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=82, optimize=True)
    return out.getvalue()


def thumbnail(image: ObjectStoragePath) -> bytes:
    """The cached thumbnail of `image`, made and stored first if there is none (FileNotFoundError if
    the image itself is missing)."""
    cached = thumbnail_path(image)
    try:
        return bytes(cached.fs.cat_file(cached.path))
    except FileNotFoundError:
        pass
    data = render(bytes(image.fs.cat_file(image.path)))
    try:
        write_bytes_atomic(cached, data)
    except Exception as exc:  # a read-only store still gets thumbnails, made again per view
        log.warning("Could not cache the thumbnail %s: %s", cached, exc)
    return data
