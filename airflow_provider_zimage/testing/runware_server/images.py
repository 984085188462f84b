"""Real, decodable images that cost almost nothing to make.

Clients check what they store (format, size, hash), so the stand-in must return genuine JPG/PNG/WEBP
files of the requested size. The picture is a function of (prompt, seed) only: the same request gives
the same bytes, which is what lets tests prove a re-run reused an image instead of paying for a new one.
Everything is done by Pillow in C (a 256-step gradient resized and colourised, a few shapes); no
per-pixel Python.
"""

from __future__ import annotations

import hashlib
import io

from PIL import Image, ImageDraw, ImageOps

from .schema import TWINFLOW, Z_IMAGE, Z_IMAGE_TURBO

CONTENT_TYPES: dict[str, str] = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
EXTENSIONS: dict[str, str] = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}
_PIL_FORMATS: dict[str, str] = {"JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}

# USD per megapixel (width * height / 1e6), from the prices the seeds quote: Turbo "about $0.0034 per
# megapixel", Z-Image $0.0045 at 1024x1024, TwinFlow $0.0006 at 1024x768.
PRICE_PER_MEGAPIXEL: dict[str, float] = {
    Z_IMAGE_TURBO: 0.0034,
    Z_IMAGE: 0.0045 / (1024 * 1024 / 1e6),
    TWINFLOW: 0.0006 / (1024 * 768 / 1e6),
}


# Page 002 bills $0.0013 for a 512x512 Turbo image, above its per-megapixel rate: a per-image minimum.
MIN_PRICE: dict[str, float] = {Z_IMAGE_TURBO: 0.0013}


def image_cost(model: str, width: int, height: int, prices: dict[str, float] | None = None) -> float:
    """Cost of one image as the seeds bill it; deterministic so tests can compare it with the estimate."""
    table = prices or PRICE_PER_MEGAPIXEL
    per_mp = table.get(model, PRICE_PER_MEGAPIXEL[Z_IMAGE_TURBO])
    return round(max(MIN_PRICE.get(model, 0.0) if prices is None else 0.0, per_mp * width * height / 1e6), 6)


def _digest(prompt: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()


def render_image(prompt: str, seed: int, width: int, height: int, output_format: str, quality: int) -> bytes:
    """Encoded image bytes; identical inputs give identical bytes."""
    d = _digest(prompt, seed)
    gradient = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    if d[6] & 1:
        gradient = gradient.transpose(Image.Transpose.ROTATE_180)
    img = ImageOps.colorize(gradient, (d[0], d[1], d[2]), (d[3], d[4], d[5]))
    draw = ImageDraw.Draw(img)
    for k in range(3):
        b = d[8 + 8 * k : 16 + 8 * k]
        x0, y0 = b[0] * width // 256, b[1] * height // 256
        x1 = x0 + max(8, b[2] * width // 512)
        y1 = y0 + max(8, b[3] * height // 512)
        colour = (b[4], b[5], b[6])
        if b[7] & 1:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    buf = io.BytesIO()
    fmt = output_format.upper()
    if fmt == "PNG":
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, _PIL_FORMATS.get(fmt, "JPEG"), quality=int(quality))
    return buf.getvalue()
