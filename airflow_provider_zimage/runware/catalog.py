"""The Runware model catalogue: what each Z-Image model accepts, Runware's defaults, and the prices.

Split out of `models.py` (which re-imports every name, so `runware.models.CATALOG` still works): the
request models validate against it, the fingerprint reads its defaults and the budgets its prices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

# --------------------------------------------------------------------------------------------------
# Model catalog
# --------------------------------------------------------------------------------------------------

Capability = Literal[
    "text-to-image",
    "image-to-image",
    "inpainting",
    "outpainting",
    "controlnet",
    "lora",
    "ultralytics",
    "ultralytics-inpaint-size",
    "acceleration",
]

# Runware bills per output pixel; prices are per 10^6 pixels so a size change scales the estimate.
_MEGAPIXEL = 1_000_000
_DEFAULT_SIZE = 1024


@dataclass(frozen=True)
class ModelSpec:
    """What one Runware model accepts, so a request is refused locally instead of billed remotely.

    `default_steps`/`default_cfg_scale` are Runware's defaults when the parameter is left out (None when
    the page does not say); `local_*` are the diffusers settings used when running the model on our own
    GPU, where Runware's server-side defaults do not apply.
    """

    air: str
    name: str
    hf_repo: str | None
    capabilities: frozenset[Capability]
    aliases: tuple[str, ...]
    cfg_scale_max: float
    price_per_megapixel: float
    requires_size: bool = False
    # Runware's prices are not linear in pixels: small images cost a per-image minimum, and Z-Image's
    # examples cost more with more steps. The estimate is the largest of the three, so every price the
    # seeds show is covered (tests/test_pricing.py walks them).
    price_floor: float = 0.0
    price_per_megapixel_step: float = 0.0
    pricing_steps: int = 50
    default_width: int = _DEFAULT_SIZE
    default_height: int = _DEFAULT_SIZE
    default_steps: int | None = None
    default_cfg_scale: float | None = None
    local_default_steps: int | None = None
    local_guidance_scale: float | None = None

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities


# What Runware does with a parameter left out, per model, by wire path (`lora[].weight` for each item of a
# list): the one place a default lives. The fingerprint reads it (unset and the default spelled out are one
# picture), and so do the catalogue's size, steps and CFG defaults. tests/test_documented_defaults.py
# checks it against the model pages (000/001 Z-Image, 002/003 Turbo, 004 TwinFlow), both ways.
_Z_IMAGE, _TURBO, _TWINFLOW = "runware:z-image@0", "runware:z-image@turbo", "runware:twinflow-z-image-turbo@0"
_PLATFORM_DEFAULTS: dict[str, Any] = {
    "outputType": "URL",
    "outputFormat": "JPG",
    "outputQuality": 95,
    "deliveryMethod": "sync",
    "safety.checkContent": False,
    "safety.mode": "none",
    "includeCost": False,
    "numberResults": 1,
    "acceleratorOptions.cacheMaxConsecutiveSteps": 3,
    "acceleratorOptions.fbCache": False,
    "acceleratorOptions.fbCacheThreshold": 0.25,
    "acceleratorOptions.teaCache": False,
    "acceleratorOptions.teaCacheDistance": 0.5,
    "acceleratorOptions.dbCache": False,
    "acceleratorOptions.dbCacheThreshold": 0.25,
    "acceleratorOptions.dbCacheSkipInterval": 5,
    "lora[].weight": 1,
    "lora[].transformer": "both",
}
_EDITING_DEFAULTS: dict[str, Any] = {
    "strength": 0.8,
    "controlNet[].weight": 1,
    "controlNet[].controlMode": "balanced",
    "ultralytics.CFGScale": 8,
    "ultralytics.confidence": 0.9,
    "ultralytics.maskBlur": 5,
    "ultralytics.maskPadding": 5,
    "ultralytics.steps": 20,
    "ultralytics.strength": 0.3,
}
RUNWARE_DEFAULTS: dict[str, dict[str, Any]] = {
    _Z_IMAGE: {
        **_PLATFORM_DEFAULTS,
        **_EDITING_DEFAULTS,
        "ultralytics.inpaintSize": 1024,  # page 000 only
        "width": _DEFAULT_SIZE,
        "height": _DEFAULT_SIZE,
    },
    _TURBO: {**_PLATFORM_DEFAULTS, **_EDITING_DEFAULTS, "width": _DEFAULT_SIZE, "height": _DEFAULT_SIZE},
    _TWINFLOW: {
        **_PLATFORM_DEFAULTS,
        # Page 004. 0.2 read unset as "none" and so paid again for "medium" spelled out, and gave "none"
        # spelled out the fingerprint of a picture made at medium.
        "acceleration": "medium",
        "width": _DEFAULT_SIZE,
        "height": _DEFAULT_SIZE,
        "steps": 4,
        "CFGScale": 0,
    },
}
# Entries of RUNWARE_DEFAULTS that no page states, and why each is there all the same.
UNDOCUMENTED_DEFAULTS: dict[str, dict[str, str]] = {
    _Z_IMAGE: {
        "width": "the page requires a size; this provider sends 1024x1024 when none is given",
        "height": "the page requires a size; this provider sends 1024x1024 when none is given",
    },
    _TURBO: {
        "width": "not on the page: the size the estimate, the local backend and the test server assume",
        "height": "not on the page: the size the estimate, the local backend and the test server assume",
    },
}
# Defaults the fingerprint writes in instead of leaving out: 0.2 left `acceleration` out when it was
# "none", so a fingerprint without it may name a picture made at none; with the default written in, no
# fingerprint of today equals one 0.2 gave another picture.
_WRITTEN_IN = ("acceleration",)


def _default(air: str, path: str) -> Any:
    return RUNWARE_DEFAULTS[air].get(path)


_FULL_FEATURES: frozenset[Capability] = frozenset(
    {"text-to-image", "image-to-image", "inpainting", "outpainting", "controlnet", "lora", "ultralytics"}
)

CATALOG: dict[str, ModelSpec] = {
    spec.air: spec
    for spec in (
        ModelSpec(
            air=_Z_IMAGE,
            name="Z-Image",
            hf_repo="Tongyi-MAI/Z-Image",
            # Only page 000 lists ultralytics.inpaintSize, and only for this model.
            capabilities=_FULL_FEATURES | {"ultralytics-inpaint-size"},
            aliases=("z-image", "zimage"),
            cfg_scale_max=20.0,
            # $0.0045 per 1024x1024 image.
            price_per_megapixel=0.0045 / (_DEFAULT_SIZE * _DEFAULT_SIZE / _MEGAPIXEL),
            # Page 001's examples: 1024x768 at 36 steps $0.0045, at 32 steps $0.0038, 1344x768 at 32
            # steps $0.0051: the highest rate per megapixel-step, rounded up. Runware's default steps
            # are not documented; 28 (the model card's lower bound) covers the $0.0045 list price.
            price_per_megapixel_step=0.00016,
            pricing_steps=28,
            # Page 000 marks width and height as required; sending 1024x1024 when absent is what the
            # price above assumes.
            requires_size=True,
            default_width=_default(_Z_IMAGE, "width"),
            default_height=_default(_Z_IMAGE, "height"),
            local_default_steps=30,  # the model card recommends 28-50 steps
            local_guidance_scale=4.0,
        ),
        ModelSpec(
            air=_TURBO,
            name="Z-Image-Turbo",
            hf_repo="Tongyi-MAI/Z-Image-Turbo",
            capabilities=_FULL_FEATURES,
            aliases=("z-image-turbo", "zimage-turbo", "turbo"),
            cfg_scale_max=20.0,
            # "about $0.0034 per megapixel" (512x512 $0.0013, 1024x1024 $0.0032): the upper figure.
            price_per_megapixel=0.0034,
            # 512x512 and every 4-step example on page 002 cost $0.0013 whatever the size: a per-image
            # minimum. The 4-step 1024x768 rate per megapixel-step, rounded up, covers more steps; 8
            # (the Turbo's documented step count) stands in when steps are left to Runware.
            price_floor=0.0013,
            price_per_megapixel_step=0.00042,
            pricing_steps=8,
            default_width=_default(_TURBO, "width"),
            default_height=_default(_TURBO, "height"),
            local_default_steps=8,
            local_guidance_scale=0.0,
        ),
        ModelSpec(
            air=_TWINFLOW,
            name="TwinFlow Z-Image-Turbo",
            hf_repo=None,  # no diffusers pipeline exists: Runware only
            capabilities=frozenset({"text-to-image", "lora", "acceleration"}),
            aliases=("twinflow", "twinflow-z-image-turbo", "twinflow-turbo"),
            cfg_scale_max=50.0,
            # The page's 1024x768 examples cost $0.0006 to $0.0013: the upper figure, per megapixel.
            price_per_megapixel=0.0013 / (1024 * 768 / _MEGAPIXEL),
            # Page 004: $0.0006 to $0.0013 per 4-step image; the upper figure is also the floor.
            price_floor=0.0013,
            price_per_megapixel_step=0.00042,
            pricing_steps=4,
            requires_size=True,
            default_width=_default(_TWINFLOW, "width"),
            default_height=_default(_TWINFLOW, "height"),
            default_steps=_default(_TWINFLOW, "steps"),
            default_cfg_scale=_default(_TWINFLOW, "CFGScale"),
        ),
    )
}

_MODEL_NAMES: dict[str, str] = {
    name.lower(): spec.air for spec in CATALOG.values() for name in (spec.air, *spec.aliases)
}


_MODEL_CHOICES = "one of {} (or an alias: {})".format(
    ", ".join(CATALOG), ", ".join(a for spec in CATALOG.values() for a in spec.aliases)
)


def _check_model(value: str) -> str | None:
    return None if value.strip().lower() in _MODEL_NAMES else f"must be {_MODEL_CHOICES}"


def estimate_cost(request: ImageInferenceRequest) -> float:
    """Upper bound in USD of all results of `request`, for budgets checked before anything is paid.

    Rounded up, never down: a budget is only a promise if no request the seeds price gets past it.
    """
    spec = request.spec
    megapixels = (request.width or spec.default_width) * (request.height or spec.default_height) / _MEGAPIXEL
    steps = request.steps or spec.default_steps or spec.pricing_steps
    per_image = max(
        spec.price_floor,
        spec.price_per_megapixel * megapixels,
        spec.price_per_megapixel_step * megapixels * steps,
    )
    return math.ceil(per_image * (request.number_results or 1) * 1e6 - 1e-6) / 1e6


def guidance_for_cfg(cfg_scale: float) -> float:
    """Runware's CFGScale -> the `guidance_scale` of diffusers' Z-Image pipelines and SGLang's
    (both compute pos + g * (pos - neg); SGLang: configs/pipeline_configs/zimage.py).

    Runware's scale is the usual one, neg + w * (pos - neg), with guidance off at w <= 1 (its page:
    "negativePrompt ... Ignored when guidance is disabled (CFGScale <= 1)"). diffusers' Z-Image
    pipelines compute pos + g * (pos - neg) and run guidance for any g > 0: the same formula with
    g = w - 1. So CFGScale 1 (or less) is g = 0, no second pass and no negative prompt.
    """
    return max(0.0, float(cfg_scale) - 1.0)
