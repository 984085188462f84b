"""Runware request -> OpenAI images request bodies, refusals, answers and local re-encoding (sans-IO).

The engines behind this API (SGLang Diffusion 0.5, vLLM-Omni) accept unknown fields, unknown model
names and empty prompts silently with 200, round sizes down to multiples of 16 without saying so, and
fail `n > 1` on their native Z-Image path. So the provider checks everything here, before a byte is
sent, and sends one request per image: image i of a request gets seed `seed + i`, which keeps every
image reproducible from the seed recorded in the manifest (the local backend's rule as well).

Parameters the OpenAI schema lacks travel as SGLang's documented extras of `ImageGenerationsRequest`
(`seed`, `num_inference_steps`, `guidance_scale`, `negative_prompt`); vLLM-Omni's images endpoint reads
the same names. What the engine cannot take per request is refused, parameter named, by the rows of
runware/support.py marked refused for `openai_images` (the one table the local backends, the parity
page and the conformance matrix read); the value checks no row can express (a model the connection
serves, sizes in multiples of 16, a scheduler the engine runs) are made here, and their rows are notes.

Pixels travel losslessly (`output_format: "png"`, `response_format: "b64_json"`) and the provider
encodes the requested `outputFormat` / `outputQuality` itself: the OpenAI schema has no quality that
means Runware's `outputQuality` (its `output_compression` is gpt-image's, SGLang's `output_quality` a
preset name), so encoding here is the one way the stored file is what the request asked for.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from airflow_provider_zimage.exceptions import (
    ZImageAPIError,
    ZImageAuthError,
    ZImagePermanentError,
    ZImageTransientError,
    ZImageValidationError,
)
from airflow_provider_zimage.local.refusals import issue
from airflow_provider_zimage.runware.catalog import CATALOG, guidance_for_cfg
from airflow_provider_zimage.runware.models import ImageInferenceRequest, resolve_model
from airflow_provider_zimage.runware.protocol import parse_retry_after
from airflow_provider_zimage.runware.support import Backend, refusals

__all__ = [
    "BACKEND",
    "DEFAULT_QUALITY",
    "GENERATIONS_PATH",
    "SIZE_MULTIPLE",
    "ImageAnswer",
    "ImageCall",
    "encode_result",
    "error_for_answer",
    "generations_url",
    "parse_answer",
    "plan_calls",
    "served_models",
]

BACKEND: Backend = "openai_images"
GENERATIONS_PATH = "/images/generations"
SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2: the engine rounds anything else down, silently
MAX_SEED = 2**63 - 1  # Runware's seed range; seed + numberResults - 1 must stay inside it
DEFAULT_QUALITY = 95  # Runware's outputQuality default
DEFAULT_FORMAT = "JPG"  # Runware's outputFormat default
# Schedulers that are the flow-matching Euler sampler the served Z-Image pipeline runs anyway.
_DEFAULT_SCHEDULERS = frozenset({"default", "flowmatcheulerdiscretescheduler"})
_TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})
_MAX_ANSWER_PIXELS = 2048 * 2048  # the largest size a request may ask for


def _scheduler(wire: Mapping[str, Any]) -> Any:
    """A scheduler other than the one the server runs anyway, or None."""
    name = wire.get("scheduler")
    return None if name is None or str(name).strip().lower() in _DEFAULT_SCHEDULERS else name


_SCHEDULER = (
    "the server's sampler is fixed when it starts; the OpenAI images API has no per-request "
    "scheduler (leave it unset or 'Default')"
)


def served_models(value: Any) -> dict[str, str]:
    """The connection's `served_model` extra -> {catalog AIR id: the name the server knows it by}.

    A string names the one model the server runs, Z-Image-Turbo (what SGLang and vLLM-Omni serve as
    `Z-Image-Turbo`); a mapping (or its JSON text) names several, keyed by AIR id or alias.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ZImageValidationError(f"connection extra served_model is not valid JSON: {exc}") from None
    if isinstance(value, str):
        return {"runware:z-image@turbo": value.strip()}
    if isinstance(value, Mapping):
        served = {}
        for key, name in value.items():
            if not isinstance(name, str) or not name.strip():
                raise ZImageValidationError(
                    f"connection extra served_model[{key!r}] must be the model name the server knows"
                )
            served[resolve_model(str(key)).air] = name.strip()
        return served
    raise ZImageValidationError(
        "connection extra served_model must be a model name or a mapping {model: served name} "
        f"(got {type(value).__name__})"
    )


@dataclass(frozen=True)
class ImageCall:
    """One `POST /v1/images/generations`: image `offset` of a request, made with `seed`."""

    offset: int
    seed: int
    body: dict[str, Any]


def _refusals(
    request: ImageInferenceRequest, served: Mapping[str, str], base_seed: int
) -> list[dict[str, Any]]:
    wire = request.to_wire()
    issues = []
    if request.model not in served:
        names = ", ".join(sorted(served)) or "nothing: set the connection extra served_model"
        issues.append(
            issue("model", f"this server is not configured to serve it (it serves {names})", request.model)
        )
    spec = CATALOG[request.model]
    for name, value in (
        ("width", request.width or spec.default_width),
        ("height", request.height or spec.default_height),
    ):
        if value % SIZE_MULTIPLE:
            issues.append(
                issue(
                    name,
                    f"must be a multiple of {SIZE_MULTIPLE} on this backend (the server would round "
                    f"{value} down to {value - value % SIZE_MULTIPLE} without saying so)",
                    value,
                )
            )
    count = request.number_results or 1
    if base_seed + count - 1 > MAX_SEED:
        issues.append(
            issue(
                "seed",
                f"seed + numberResults - 1 must be at most {MAX_SEED} (image i gets seed + i)",
                base_seed,
            )
        )
    scheduler = _scheduler(wire)
    if scheduler is not None:
        issues.append(issue("scheduler", f"not supported by backend {BACKEND}: {_SCHEDULER}", scheduler))
    for name, message, value in refusals(wire, BACKEND):
        issues.append(issue(name, f"not supported by backend {BACKEND}: {message}", value))
    return issues


def check_request(request: ImageInferenceRequest, served: Mapping[str, str], base_seed: int = 0) -> None:
    """Raise one `ZImageValidationError` naming every parameter this backend cannot honour."""
    issues = _refusals(request, served, base_seed)
    if issues:
        detail = "; ".join(f"{i['parameter']}: {i['message']}" for i in issues)
        raise ZImageValidationError(f"The {BACKEND} backend cannot run this request: {detail}", issues)


def plan_calls(request: ImageInferenceRequest, served: Mapping[str, str], base_seed: int) -> list[ImageCall]:
    """Every image of `request` as one call (n=1), refused as a whole before any is sent.

    Steps and guidance are always sent (the catalog's values when the request leaves them out), so the
    picture is a function of the request, not of whatever defaults a server version ships.
    """
    check_request(request, served, base_seed)
    spec = CATALOG[request.model]
    steps = request.steps or spec.local_default_steps or spec.default_steps
    # CFGScale means Runware's scale on every backend: g = CFGScale - 1, no guidance at <= 1 (SGLang's
    # Z-Image guides for any g > 0, as diffusers does); unset: the checkpoint's recommended g.
    cfg = request.cfg_scale
    guidance = guidance_for_cfg(cfg) if cfg is not None else spec.local_guidance_scale
    width = request.width or spec.default_width
    height = request.height or spec.default_height
    common: dict[str, Any] = {
        "model": served[request.model],
        "prompt": request.positive_prompt,
        "n": 1,
        "size": f"{width}x{height}",
        "response_format": "b64_json",
        "output_format": "png",
    }
    if steps is not None:
        common["num_inference_steps"] = int(steps)
    if guidance is not None:
        common["guidance_scale"] = float(guidance)
    if request.negative_prompt and guidance:  # ignored without guidance, as on Runware
        common["negative_prompt"] = request.negative_prompt
    count = request.number_results or 1
    return [ImageCall(i, base_seed + i, {**common, "seed": base_seed + i}) for i in range(count)]


def generations_url(base_url: str) -> str:
    """The endpoint under the connection's host: `http://router:30000` and `.../v1` both work."""
    base = base_url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + GENERATIONS_PATH


@dataclass(frozen=True)
class ImageAnswer:
    """The one image of an answer: its bytes (b64_json) or where to fetch them (url)."""

    data: bytes | None = None
    url: str | None = None


def _message(content: bytes) -> str:
    try:
        body = json.loads(content)
    except ValueError:
        return content[:200].decode("utf-8", "replace").strip()
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        if error is not None:
            return str(error)[:300]
        if "detail" in body:  # FastAPI's shape (SGLang, vLLM)
            return str(body["detail"])[:300]
    return str(body)[:300]


def error_for_answer(status_code: int, content: bytes, headers: Mapping[str, str]) -> ZImageAPIError:
    """An HTTP error answer as the typed error the retry policy reads: 429/5xx (and 408/409/425) are
    transient and honour Retry-After; 401/403 are the key; anything else is the request."""
    message = f"the image server answered HTTP {status_code}: {_message(content) or 'no detail'}"
    retry_after = parse_retry_after(headers)
    if status_code in (401, 403):
        return ZImageAuthError(message, status_code=status_code)
    if status_code in _TRANSIENT_STATUSES or status_code >= 500:
        return ZImageTransientError(message, status_code=status_code, retry_after=retry_after)
    return ZImagePermanentError(message, status_code=status_code)


def parse_answer(status_code: int, content: bytes, headers: Mapping[str, str]) -> ImageAnswer:
    """The image of a 2xx answer; anything malformed is transient (a proxy's page, a cut body), so the
    same call is made again rather than the task failing on one bad answer."""
    if status_code >= 300:
        raise error_for_answer(status_code, content, headers)
    try:
        body = json.loads(content)
        item = body["data"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ZImageTransientError(
            "the image server's answer has no data[0] (not an OpenAI images answer)"
        ) from None
    if not isinstance(item, dict):
        raise ZImageTransientError("the image server's data[0] is not an object")
    if isinstance(item.get("b64_json"), str) and item["b64_json"]:
        try:
            return ImageAnswer(data=base64.b64decode(item["b64_json"], validate=True))
        except (binascii.Error, ValueError):
            raise ZImageTransientError("the image server's b64_json is not base64") from None
    if isinstance(item.get("url"), str) and item["url"]:
        return ImageAnswer(url=item["url"])
    raise ZImageTransientError("the image server's data[0] has neither b64_json nor url")


def encode_result(data: bytes, request: ImageInferenceRequest, *, width: int, height: int) -> bytes:
    """The stored file: the server's pixels in the requested format and quality.

    A PNG asked for PNG is kept byte for byte; anything else is decoded and encoded here. An answer that
    is not an image, or not the size asked for, is refused: storing it would record a picture the
    request did not describe.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.width * probe.height > _MAX_ANSWER_PIXELS:
                raise ZImagePermanentError(f"the image server answered a {probe.width}x{probe.height} image")
            probe.load()
            image = probe.copy()
            source_format = probe.format
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ZImageTransientError("the image server's answer is not a decodable image") from None
    if (image.width, image.height) != (width, height):
        raise ZImagePermanentError(
            f"the image server answered {image.width}x{image.height} for a {width}x{height} request"
        )
    fmt = (request.output_format or DEFAULT_FORMAT).upper()
    if fmt == "PNG" and source_format == "PNG":
        return data
    quality = request.output_quality or DEFAULT_QUALITY
    buffer = io.BytesIO()
    if fmt == "PNG":
        image.save(buffer, format="PNG")
    else:
        rgb = image.convert("RGB")
        rgb.save(buffer, format="WEBP" if fmt == "WEBP" else "JPEG", quality=quality)
    return buffer.getvalue()
