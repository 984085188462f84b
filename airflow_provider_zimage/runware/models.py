"""Request and result models of the Runware `imageInference` task for the Z-Image model family.

Everything a request can get wrong is caught here, before a network call, because a refused request at
Runware costs a round trip and a paid-for request with a wrong parameter costs money. Python names are
snake_case and wire names camelCase (`cfg_scale` <-> `CFGScale`); both spellings are accepted on input,
and `to_wire()` always emits the wire spelling.

Sources: the Runware model pages and the OpenAPI schema of Z-Image-Turbo (see `shared/seeds/`). Where
the pages disagree, the choice is noted next to the value.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import types
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import CoreSchema, PydanticCustomError, core_schema
from typing_extensions import Self

from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.redaction import redact_urls
from airflow_provider_zimage.runware.catalog import (
    _DEFAULT_SIZE,
    _MODEL_CHOICES,
    _MODEL_NAMES,
    _TWINFLOW,
    _WRITTEN_IN,
    CATALOG,
    RUNWARE_DEFAULTS,
    UNDOCUMENTED_DEFAULTS,
    Capability,
    ModelSpec,
    _check_model,
    _default,
    estimate_cost,
)

__all__ = [
    "CATALOG",
    "RUNWARE_DEFAULTS",
    "UNDOCUMENTED_DEFAULTS",
    "SCHEDULERS",
    "AcceleratorOptions",
    "ApiErrorDetail",
    "Capability",
    "ControlNet",
    "ImageInferenceRequest",
    "ImageResult",
    "Inputs",
    "Lora",
    "ModelSpec",
    "OldFingerprint",
    "Outpaint",
    "Safety",
    "Ultralytics",
    "estimate_cost",
    "resolve_model",
]

# The model catalogue, Runware's defaults and the prices live in catalog.py (re-imported above, so
# `models.CATALOG` still works); resolve_model answers in a validation error's words, so it stays here.


def resolve_model(name: str) -> ModelSpec:
    """Accept the AIR id or an alias: DAG authors write `turbo`, not `runware:z-image@turbo`."""
    problem = _check_model(name) if isinstance(name, str) else f"must be {_MODEL_CHOICES}"
    if problem is not None:
        entry = _entry("model", problem, name)
        raise ZImageValidationError(f"Invalid Z-Image model: {entry['text']}", [_public(entry)])
    return CATALOG[_MODEL_NAMES[name.strip().lower()]]


# --------------------------------------------------------------------------------------------------
# Value rules: each one validates and also says, in words, what it accepts (for error messages)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """A check whose description is reused for type errors too, so every message names what is allowed.

    `check` returns None when the value is fine, else the problem in words.
    """

    check: Callable[[Any], str | None]
    allowed: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        def validate(value: Any) -> Any:
            problem = self.check(value)
            if problem is not None:
                raise PydanticCustomError("zimage_rule", "{problem}", {"problem": problem})
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))


@dataclass(frozen=True)
class _Step:
    """`multipleOf` that tolerates binary floats: 0.07 is a multiple of 0.01 to a human and to Runware."""

    step: float

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        def validate(value: float) -> float:
            if not _is_multiple(value, self.step):
                raise PydanticCustomError("multiple_of", "not a multiple of {step}", {"step": self.step})
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))


def _is_multiple(value: float, step: float) -> bool:
    quotient = value / step
    return abs(quotient - round(quotient)) <= 1e-9 * max(1.0, abs(quotient))


_UUID_V4 = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-4[0-9a-fA-F]{3}-[89abAB][0-9a-fA-F]{3}-[0-9a-fA-F]{12}$"
)
_UUID_ANY = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# RFC 3986 characters only: what the schema's `format: uri` accepts.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})+$")
_HTTP_URL = re.compile(r"^https?://[^/?#\s]+", re.IGNORECASE)
_DATA_URI = re.compile(r"^data:image/[a-zA-Z]+;base64,[a-zA-Z0-9+/=]+$")
_BASE64 = re.compile(r"^[a-zA-Z0-9+/=]+$")
_MODEL_ID_PATTERN = r"^[a-zA-Z0-9._-]+(:[a-zA-Z0-9._/@-]+)?$"


def _check_uuid4(value: str) -> str | None:
    return (
        None
        if _UUID_V4.match(value)
        else "must be a UUID v4 string like 'xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx'"
    )


def _check_http_url(value: str) -> str | None:
    if _URI.match(value) and _HTTP_URL.match(value):
        return None
    return "must be an absolute http(s) URL"


def _check_image(value: str) -> str | None:
    if any(p.match(value) for p in (_UUID_ANY, _DATA_URI, _URI, _BASE64)):
        return None
    return "must be an image UUID, a URI, a data URI (data:image/<type>;base64,...) or base64 data"


SCHEDULERS: tuple[str, ...] = (
    "DDIM", "DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "Default", "DPM++", "DPM++ 2M",
    "DPM++ 2M Beta", "DPM++ 2M Exponential", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Beta",
    "DPM++ 2M SDE Exponential", "DPM++ 2M SDE Karras", "DPM++ 2M SDE Uniform", "DPM++ 2M Uniform",
    "DPM++ 3M", "DPM++ 3M Beta", "DPM++ 3M Exponential", "DPM++ 3M Karras", "DPM++ 3M SDE Uniform",
    "DPM++ 3M Uniform", "DPM++ Beta", "DPM++ Exponential", "DPM++ Karras", "DPM++ SDE", "DPM++ SDE Beta",
    "DPM++ SDE Exponential", "DPM++ SDE Karras", "DPM++ Uniform", "DPM++ Uniform Beta",
    "DPM++ Uniform Exponential", "DPM++ Uniform Karras", "DPMSolverMultistepInverse",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler", "Euler", "Euler a", "Euler Beta", "Euler DiscreteScheduler", "Euler Exponential",
    "Euler Karras", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "Heun",
    "HeunDiscreteScheduler", "Heun Karras", "IPNDMScheduler", "IPNDM Uniform", "IPNDM Uniform Beta",
    "IPNDM Uniform Exponential", "IPNDM Uniform Karras", "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler", "LCM", "LCMScheduler", "LMS", "LMSDiscreteScheduler", "LMS Karras",
    "PNDMScheduler", "TCDScheduler", "UniPC", "UniPC 2M", "UniPC 2M Karras", "UniPC 2M Uniform", "UniPC 3M",
    "UniPC 3M Karras", "UniPC 3M Uniform", "UniPC Karras", "UniPC Uniform", "UniPC Uniform Beta",
    "UniPC Uniform Exponential", "UniPC Uniform Karras",
)  # fmt: skip
_SCHEDULER_TEXT = f"a Runware scheduler name ({len(SCHEDULERS)} in models.SCHEDULERS)"


def _check_scheduler(value: str) -> str | None:
    """Name the closest valid schedulers: a typo'd name is the usual mistake, and 75 names help nobody."""
    if value in SCHEDULERS:
        return None
    by_lower = {name.lower(): name for name in SCHEDULERS}
    if value.lower() in by_lower:
        return f"must be spelled {by_lower[value.lower()]!r} (scheduler names are case-sensitive)"
    close = [by_lower[c] for c in difflib.get_close_matches(value.lower(), by_lower, n=3, cutoff=0.5)]
    if not close:
        close = ["Default", "FlowMatchEulerDiscreteScheduler", "Euler"]
    return f"must be {_SCHEDULER_TEXT}; the closest are " + ", ".join(repr(c) for c in close)


Uuid4 = Annotated[str, _Rule(_check_uuid4, "a UUID v4 string")]
HttpUrl = Annotated[str, _Rule(_check_http_url, "an absolute http(s) URL")]
ImageRef = Annotated[str, _Rule(_check_image, "an image UUID, URI, data URI or base64 string")]
SchedulerName = Annotated[str, _Rule(_check_scheduler, _SCHEDULER_TEXT)]
ModelName = Annotated[str, _Rule(_check_model, _MODEL_CHOICES)]
ModelId = Annotated[str, Field(pattern=_MODEL_ID_PATTERN)]
# Page 000 allows 10000 characters for runware:z-image@0, but its markdown page (001) and the OpenAPI
# schema say 3000: the smaller bound is the one every source agrees Runware accepts.
Prompt = Annotated[str, Field(min_length=2, max_length=3000)]
Weight = Annotated[float, Field(ge=-4, le=4), _Step(0.01)]
Unit = Annotated[float, Field(ge=0, le=1), _Step(0.01)]
ImageSide = Annotated[int, Field(ge=128, le=2048), _Step(16)]

# --------------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------------


class _Issue(NamedTuple):
    """A broken cross-field rule, named relative to the model that found it ("" for the model itself)."""

    parameter: str
    message: str
    value: Any = None


def _raise_issues(issues: list[_Issue]) -> None:
    """Report every broken rule at once: fixing one per round trip through Airflow is slow."""
    if issues:
        summary = "; ".join(_join(i.parameter, i.message, ": ") for i in issues)
        ctx = {"summary": summary, "issues": tuple(i._asdict() for i in issues)}
        raise PydanticCustomError("zimage_rules", "{summary}", ctx)


class _WireModel(BaseModel):
    """Strict types (a string "1024" is not a width) and no unknown keys, as the API schema says."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", strict=True, allow_inf_nan=False)


def _step_pair_issues(
    start: int | None,
    end: int | None,
    start_name: str,
    end_name: str,
    start_pct: int | None,
    end_pct: int | None,
) -> list[_Issue]:
    """Absolute and percentage step windows are alternatives; mixing them is ambiguous at Runware."""
    issues = []
    if start is not None and start_pct is not None:
        issues.append(_Issue(f"{start_name}Percentage", f"cannot be combined with {start_name}", start_pct))
    if end is not None and end_pct is not None:
        issues.append(_Issue(f"{end_name}Percentage", f"cannot be combined with {end_name}", end_pct))
    if start is not None and end is not None and start >= end:
        issues.append(_Issue(start_name, f"must be less than {end_name} ({end})", start))
    if start_pct is not None and end_pct is not None and start_pct >= end_pct:
        issues.append(
            _Issue(
                f"{start_name}Percentage", f"must be less than {end_name}Percentage ({end_pct})", start_pct
            )
        )
    return issues


class Safety(_WireModel):
    check_content: bool | None = Field(None, alias="checkContent")
    mode: Literal["none", "fast"] | None = None


class Inputs(_WireModel):
    seed_image: ImageRef | None = Field(None, alias="seedImage")
    mask_image: ImageRef | None = Field(None, alias="maskImage")


class AcceleratorOptions(_WireModel):
    cache_start_step: int | None = Field(None, alias="cacheStartStep", ge=0)
    cache_end_step: int | None = Field(None, alias="cacheEndStep", ge=1)
    cache_start_step_percentage: int | None = Field(None, alias="cacheStartStepPercentage", ge=0, le=99)
    cache_end_step_percentage: int | None = Field(None, alias="cacheEndStepPercentage", ge=1, le=100)
    cache_max_consecutive_steps: int | None = Field(None, alias="cacheMaxConsecutiveSteps", ge=1, le=5)
    fb_cache: bool | None = Field(None, alias="fbCache")
    fb_cache_threshold: Unit | None = Field(None, alias="fbCacheThreshold")
    tea_cache: bool | None = Field(None, alias="teaCache")
    tea_cache_distance: Unit | None = Field(None, alias="teaCacheDistance")
    db_cache: bool | None = Field(None, alias="dbCache")
    db_cache_threshold: Unit | None = Field(None, alias="dbCacheThreshold")
    db_cache_skip_interval: int | None = Field(None, alias="dbCacheSkipInterval", ge=1)

    @model_validator(mode="after")
    def _windows(self) -> AcceleratorOptions:
        _raise_issues(
            _step_pair_issues(
                self.cache_start_step,
                self.cache_end_step,
                "cacheStartStep",
                "cacheEndStep",
                self.cache_start_step_percentage,
                self.cache_end_step_percentage,
            )
        )
        return self


class Outpaint(_WireModel):
    top: int | None = Field(None, ge=0)
    bottom: int | None = Field(None, ge=0)
    left: int | None = Field(None, ge=0)
    right: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _some_direction(self) -> Outpaint:
        if not any((self.top, self.bottom, self.left, self.right)):
            # An outpaint of zero pixels everywhere is an image-to-image run billed as outpainting.
            message = "needs at least one of top, bottom, left, right with a pixel count > 0"
            _raise_issues([_Issue("", message, _dump(self))])
        return self


class Lora(_WireModel):
    model: ModelId
    weight: Weight | None = None
    transformer: Literal["high", "low", "both"] | None = None


class ControlNet(_WireModel):
    model: ModelId
    guide_image: ImageRef = Field(alias="guideImage")
    weight: Weight | None = None
    control_mode: Literal["balanced", "controlnet", "prompt"] | None = Field(None, alias="controlMode")
    start_step: int | None = Field(None, alias="startStep", ge=0)
    end_step: int | None = Field(None, alias="endStep", ge=1)
    start_step_percentage: int | None = Field(None, alias="startStepPercentage", ge=0, le=99)
    end_step_percentage: int | None = Field(None, alias="endStepPercentage", ge=1, le=100)

    @model_validator(mode="after")
    def _windows(self) -> ControlNet:
        _raise_issues(
            _step_pair_issues(
                self.start_step,
                self.end_step,
                "startStep",
                "endStep",
                self.start_step_percentage,
                self.end_step_percentage,
            )
        )
        return self


class Ultralytics(_WireModel):
    cfg_scale: Annotated[float, Field(ge=0, le=50), _Step(0.1)] | None = Field(None, alias="CFGScale")
    confidence: Unit | None = None
    inpaint_size: int | None = Field(None, alias="inpaintSize", ge=128, le=2048)
    mask_blur: int | None = Field(None, alias="maskBlur", ge=0, le=100)
    mask_padding: int | None = Field(None, alias="maskPadding", ge=0, le=20)
    negative_prompt: str | None = Field(None, alias="negativePrompt")
    positive_prompt: str | None = Field(None, alias="positivePrompt")
    steps: int | None = Field(None, ge=1, le=100)
    strength: Unit | None = None


# Left out of the fingerprint: they change how the result is delivered, not which image is made.
# Fields that change how the bytes travel or what the answer reports, never which picture is made.
_DELIVERY_PARAMETERS = frozenset(
    {"taskUUID", "webhookURL", "uploadEndpoint", "deliveryMethod", "outputType", "includeCost", "ttl"}
)
# What 0.1.0 left out of its fingerprint: its manifests and ledgers are still found after an upgrade.
_LEGACY_DELIVERY_PARAMETERS = frozenset({"taskUUID", "webhookURL", "uploadEndpoint", "deliveryMethod"})
# 0.2's fingerprint, frozen as it shipped so its manifests and ledgers are still found: one default list
# for every model (acceleration "none" among them: wrong for TwinFlow, the only model that takes it).
_DEFAULTS_0_2: dict[str, Any] = {
    "numberResults": 1,
    "outputFormat": "JPG",
    "outputQuality": 95,
    "acceleration": "none",
    "safety": {"checkContent": False, "mode": "none"},
    "acceleratorOptions": {
        "cacheMaxConsecutiveSteps": 3,
        "fbCache": False,
        "fbCacheThreshold": 0.25,
        "teaCache": False,
        "teaCacheDistance": 0.5,
        "dbCache": False,
        "dbCacheThreshold": 0.25,
        "dbCacheSkipInterval": 5,
    },
    "ultralytics": {
        "CFGScale": 8,
        "confidence": 0.9,
        "maskBlur": 5,
        "maskPadding": 5,
        "steps": 20,
        "strength": 0.3,
    },
}
_ITEM_DEFAULTS_0_2: dict[str, dict[str, Any]] = {
    "lora": {"weight": 1, "transformer": "both"},
    "controlNet": {"weight": 1, "controlMode": "balanced"},
}
# What 0.2 could not tell apart: TwinFlow's acceleration left unset (made at medium) and "none" spelled
# out (made at none) had one fingerprint.
_CONFLATED_0_2: dict[str, tuple[Any, ...]] = {"acceleration": (None, "none")}

_NO_DEFAULT = object()


def _strip_0_2(value: Any, defaults: Any) -> Any:
    if not isinstance(value, dict) or not isinstance(defaults, dict):
        return value
    kept = {}
    for key, item in value.items():
        default = defaults.get(key, _NO_DEFAULT)
        item = _strip_0_2(item, default)
        if item == default or item == {}:
            continue
        kept[key] = item
    return kept


def _fingerprint_0_2(wire: dict[str, Any], spec: ModelSpec) -> str:
    wire = {k: v for k, v in wire.items() if k not in _DELIVERY_PARAMETERS}
    defaults = {**_DEFAULTS_0_2, "width": _DEFAULT_SIZE, "height": _DEFAULT_SIZE}
    if spec.air == _TWINFLOW:
        defaults.update(steps=4, CFGScale=0.0)
    if (wire.get("inputs") or {}).get("seedImage") or "strength" in wire:
        defaults["strength"] = 0.8
    wire = _strip_0_2(wire, defaults)
    for key, item_defaults in _ITEM_DEFAULTS_0_2.items():
        if key in wire:
            wire[key] = [_strip_0_2(item, item_defaults) for item in wire[key]]
    return _digest(wire)


def _is_default(value: Any, default: Any) -> bool:
    """`False == 0` in Python; on the wire a flag and a number are never each other's default."""
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def _normalised(wire: Mapping[str, Any], air: str, prefix: str = "") -> dict[str, Any]:
    """The picture a (partial) wire request makes: delivery fields and documented defaults left out."""
    defaults = RUNWARE_DEFAULTS[air]
    kept: dict[str, Any] = {}
    for key, item in wire.items():
        path = f"{prefix}{key}"
        if not prefix and key in _DELIVERY_PARAMETERS:
            continue
        if isinstance(item, Mapping):
            item = _normalised(item, air, f"{path}.")
            if not item:
                continue
        elif isinstance(item, list):
            item = [_normalised(i, air, f"{path}[].") if isinstance(i, Mapping) else i for i in item]
        if path in defaults and path not in _WRITTEN_IN and _is_default(item, defaults[path]):
            continue
        kept[key] = item
    if not prefix:
        kept.update({k: defaults[k] for k in _WRITTEN_IN if k in defaults and k not in kept})
    return kept


def _spelled_out(normal: dict[str, Any], air: str) -> dict[str, Any]:
    """`normal` with every documented default written in: top-level ones, and those of present objects."""
    wire = copy.deepcopy(normal)
    for path, value in RUNWARE_DEFAULTS[air].items():
        top, _, leaf = path.partition(".")
        if path in _DELIVERY_PARAMETERS or path in ("width", "height"):
            continue
        if not leaf:
            wire.setdefault(top, value)
        elif top.endswith("[]") and isinstance(wire.get(top[:-2]), list):
            for item in wire[top[:-2]]:
                item.setdefault(leaf, value)
        elif isinstance(wire.get(top), dict):
            wire[top].setdefault(leaf, value)
    return wire


class OldFingerprint(NamedTuple):
    """A fingerprint an earlier release gave this request, and how far it can be trusted.

    `trust`: "same" (that release gave it to this picture only); "presumed" (it also gave it to another
    picture, but a record that does not say which is read as the one left unset, this one); "recorded"
    (it gave it to this picture only when spelled otherwise: only a manifest's recorded request tells).
    """

    digest: str
    trust: Literal["same", "presumed", "recorded"]


class ImageInferenceRequest(_WireModel):
    """One `imageInference` task. Build it with `build()` to get errors a DAG author can act on."""

    # API options
    task_type: Literal["imageInference"] = Field("imageInference", alias="taskType")
    task_uuid: Uuid4 = Field(default_factory=lambda: str(uuid.uuid4()), alias="taskUUID")
    output_type: Literal["URL", "base64Data", "dataURI"] | None = Field(None, alias="outputType")
    output_format: Literal["JPG", "PNG", "WEBP"] | None = Field(None, alias="outputFormat")
    output_quality: int | None = Field(None, alias="outputQuality", ge=20, le=99)
    webhook_url: HttpUrl | None = Field(None, alias="webhookURL")
    delivery_method: Literal["sync", "async"] | None = Field(None, alias="deliveryMethod")
    upload_endpoint: HttpUrl | None = Field(None, alias="uploadEndpoint")
    safety: Safety | None = None
    ttl: int | None = Field(None, ge=60)
    include_cost: bool | None = Field(None, alias="includeCost")
    number_results: int | None = Field(None, alias="numberResults", ge=1, le=20)
    acceleration: Literal["none", "low", "medium", "high"] | None = None
    accelerator_options: AcceleratorOptions | None = Field(None, alias="acceleratorOptions")
    # Inputs
    inputs: Inputs | None = None
    # Generation parameters
    model: ModelName
    positive_prompt: Prompt = Field(alias="positivePrompt")
    negative_prompt: Prompt | None = Field(None, alias="negativePrompt")
    width: ImageSide | None = None
    height: ImageSide | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    steps: int | None = Field(None, ge=1, le=50)
    scheduler: SchedulerName | None = None
    # The field allows the largest maximum of the catalog; the per-model maximum is checked below.
    cfg_scale: Annotated[float, Field(ge=0, le=50), _Step(0.01)] | None = Field(None, alias="CFGScale")
    strength: Unit | None = None
    mask_margin: int | None = Field(None, alias="maskMargin", ge=32, le=128)
    outpaint: Outpaint | None = None
    lora: list[Lora] | None = Field(None, min_length=1)
    control_net: list[ControlNet] | None = Field(None, alias="controlNet", min_length=1)
    # Features
    ultralytics: Ultralytics | None = None

    @field_validator("model")
    @classmethod
    def _canonical_model(cls, value: str) -> str:
        """Aliases are for people; the wire and the fingerprint always carry the AIR id."""
        return _MODEL_NAMES[value.strip().lower()]

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ImageInferenceRequest:
        spec = self.spec
        issues = self._capability_issues(spec)
        flagged = {i.parameter for i in issues}
        issues += [i for i in self._dependency_issues() if i.parameter not in flagged]
        issues += self._size_issues(spec)
        if self.cfg_scale is not None and self.cfg_scale > spec.cfg_scale_max:
            issues.append(
                _Issue(
                    "CFGScale", f"must be between 0 and {spec.cfg_scale_max:g} for {spec.air}", self.cfg_scale
                )
            )
        issues += self._step_issues(spec)
        _raise_issues(issues)
        return self

    def _capability_issues(self, spec: ModelSpec) -> list[_Issue]:
        inputs = self.inputs or Inputs.model_validate({})
        used: list[tuple[str, Capability, Any]] = [
            ("inputs.seedImage", "image-to-image", inputs.seed_image),
            ("strength", "image-to-image", self.strength),
            ("inputs.maskImage", "inpainting", inputs.mask_image),
            ("maskMargin", "inpainting", self.mask_margin),
            ("outpaint", "outpainting", self.outpaint),
            ("controlNet", "controlnet", self.control_net),
            ("lora", "lora", self.lora),
            ("ultralytics", "ultralytics", self.ultralytics),
            (
                "ultralytics.inpaintSize",
                "ultralytics-inpaint-size",
                self.ultralytics and self.ultralytics.inpaint_size,
            ),
            ("acceleration", "acceleration", self.acceleration),
        ]
        issues: list[_Issue] = []
        for parameter, capability, value in used:
            if value is None or spec.supports(capability):
                continue
            if any(parameter.startswith(f"{i.parameter}.") for i in issues):
                continue  # the whole object is already refused
            others = ", ".join(s.air for s in CATALOG.values() if s.supports(capability)) or "none"
            issues.append(
                _Issue(parameter, f"is not supported by {spec.air} (supported by: {others})", _dump(value))
            )
        return issues

    def _dependency_issues(self) -> list[_Issue]:
        inputs = self.inputs or Inputs.model_validate({})
        issues = []
        if inputs.mask_image is not None and inputs.seed_image is None:
            issues.append(
                _Issue("inputs.maskImage", "requires inputs.seedImage (the image to edit)", inputs.mask_image)
            )
        if self.strength is not None and inputs.seed_image is None:
            issues.append(
                _Issue("strength", "only applies with inputs.seedImage (between 0 and 1)", self.strength)
            )
        if self.mask_margin is not None and inputs.mask_image is None:
            issues.append(
                _Issue(
                    "maskMargin", "only applies with inputs.maskImage (between 32 and 128)", self.mask_margin
                )
            )
        if self.outpaint is not None and inputs.seed_image is None:
            issues.append(
                _Issue("outpaint", "requires inputs.seedImage (the image to extend)", _dump(self.outpaint))
            )
        if self.ttl is not None and self.output_type not in (None, "URL"):
            issues.append(
                _Issue(
                    "ttl", f"only applies when outputType is URL (outputType is {self.output_type})", self.ttl
                )
            )
        return issues

    def _size_issues(self, spec: ModelSpec) -> list[_Issue]:
        if self.width is None and self.height is None:
            if spec.requires_size:
                # Runware requires a size for this model; filling its default keeps DAGs short and makes
                # the fingerprint equal to that of a request spelling the default out.
                self.width, self.height = spec.default_width, spec.default_height
            return []
        if self.height is None:
            return [
                _Issue("height", "is required when width is given (a multiple of 16 between 128 and 2048)")
            ]
        if self.width is None:
            return [
                _Issue("width", "is required when height is given (a multiple of 16 between 128 and 2048)")
            ]
        return []

    def _step_issues(self, spec: ModelSpec) -> list[_Issue]:
        """End steps past the last step are refused by Runware; check them against the effective steps."""
        steps = self.steps if self.steps is not None else spec.default_steps
        if steps is None:
            return []
        where = "steps" if self.steps is not None else f"{spec.air}'s default steps"
        ends = [(f"controlNet[{n}].endStep", c.end_step) for n, c in enumerate(self.control_net or [])]
        if self.accelerator_options is not None:
            ends.append(("acceleratorOptions.cacheEndStep", self.accelerator_options.cache_end_step))
        return [
            _Issue(name, f"must be between 1 and {steps} ({where})", end)
            for name, end in ends
            if end is not None and end > steps
        ]

    @property
    def spec(self) -> ModelSpec:
        """The catalog entry of `model`, which validation has already resolved to an AIR id."""
        return CATALOG[self.model]

    @classmethod
    def build(cls, **kwargs: Any) -> ImageInferenceRequest:
        """Construct from snake_case or camelCase keys; raise one error naming every bad parameter."""
        try:
            return cls.model_validate(kwargs)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def to_wire(self) -> dict[str, Any]:
        """The task object as Runware expects it; unset parameters are left to Runware's defaults."""
        wire: dict[str, Any] = _dump(self)
        return wire

    def fingerprint(self) -> str:
        """Identify the picture this request makes, so a retried or re-run task never pays for it twice.

        Only what changes the picture counts: delivery fields are left out, and a parameter equal to the
        model's documented default (`RUNWARE_DEFAULTS`) is left out too, so spelling a default out is
        the same picture as leaving it unset, and a value other than the default is another picture.
        """
        return _digest(_normalised(self.to_wire(), self.model))

    def legacy_fingerprints(self) -> list[str]:
        """The fingerprints earlier releases computed for this request (0.1.0: every field but four)."""
        return [_digest({k: v for k, v in self.to_wire().items() if k not in _LEGACY_DELIVERY_PARAMETERS})]

    def fingerprints_0_2(self) -> list[OldFingerprint]:
        """What 0.2 called this picture, under each spelling of it (as given, defaults left out, defaults
        written in), each with how far it can be trusted (see `OldFingerprint`)."""
        spec = self.spec
        wire = self.to_wire()
        mine = _normalised(wire, self.model)
        conflated = [k for k in _CONFLATED_0_2 if k in RUNWARE_DEFAULTS[self.model]]
        bare = {
            k: v
            for k, v in mine.items()
            if k not in _WRITTEN_IN or not _is_default(v, _default(self.model, k))
        }
        found: dict[str, OldFingerprint] = {}
        for spelling in (wire, bare, _spelled_out(mine, self.model)):
            digest = _fingerprint_0_2(spelling, spec)
            if digest in found:
                continue
            others = [
                alt
                for key in conflated
                for value in _CONFLATED_0_2[key]
                if _normalised(alt := _with(mine, key, value), self.model) != mine
                and _fingerprint_0_2(alt, spec) == digest
            ]
            if not others:
                found[digest] = OldFingerprint(digest, "same")
                continue
            unset = dict(spelling)
            for key in conflated:
                if key in unset and _fingerprint_0_2(_with(unset, key, None), spec) == digest:
                    unset = _with(unset, key, None)
            trust: Literal["presumed", "recorded"] = (
                "presumed" if _normalised(unset, self.model) == mine else "recorded"
            )
            found[digest] = OldFingerprint(digest, trust)
        return list(found.values())

    def made_as_recorded(self, recorded: Mapping[str, Any]) -> bool:
        """Whether a request recorded by 0.2 (a manifest's `request`) made this picture, on what 0.2's
        fingerprint could not tell apart (TwinFlow's `acceleration`)."""
        if recorded.get("model") != self.model:
            return False
        theirs = _normalised(recorded, self.model)
        mine = _normalised(self.to_wire(), self.model)
        return all(theirs.get(key) == mine.get(key) for key in _CONFLATED_0_2)


def _with(wire: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    changed = {k: v for k, v in wire.items() if k != key}
    if value is not None:
        changed[key] = value
    return changed


def _digest(wire: dict[str, Any]) -> str:
    canonical = json.dumps(wire, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _dump(value: Any) -> Any:
    """Wire form of a (nested) model, for the request itself and for values quoted in errors."""
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# From pydantic's errors to ZImageValidationError
# --------------------------------------------------------------------------------------------------

_MAX_SHOWN = 80


def _safe_value(value: Any) -> Any:
    """The offending value, fit to be logged: URL secrets removed, prompts and image data cut short."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = redact_urls(value if isinstance(value, str) else json.dumps(value, default=str))
    return text if len(text) <= _MAX_SHOWN else f"{text[: _MAX_SHOWN - 20]}... ({len(text)} characters)"


def _entry(parameter: str, message: str, value: Any = None) -> dict[str, Any]:
    safe = _safe_value(value)
    text = f"{parameter}: {message}"
    if value is not None:
        text += f" (got {safe!r})" if isinstance(value, str) else f" (got {safe})"
    return {"parameter": parameter, "message": message, "value": safe, "text": text}


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("parameter", "message", "value", "code") if k in entry}


# Runware's codes for the two mistakes that are not a bad value (the OpenAPI seed's 400s); an entry
# without a `code` is an `invalidParameter`. The executor answers with them, as Runware would.
_ERROR_CODES = {"missing": "missingParameter", "extra_forbidden": "unsupportedParameter"}


def _join(base: str, name: str, sep: str = ".") -> str:
    if not base or not name:
        return base or name
    return f"{base}{name}" if name.startswith("[") else f"{base}{sep}{name}"


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _model_of(annotation: Any) -> type[_WireModel] | None:
    annotation = _strip_optional(annotation)
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, _WireModel) else None


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _describe(info: FieldInfo) -> str:
    """What a field accepts, in words, from the same constraints that validate it."""
    annotation = _strip_optional(info.annotation)
    metadata = list(info.metadata)
    if get_origin(annotation) is Annotated:  # `Alias | None`: the constraints stay inside the Optional
        metadata += annotation.__metadata__
        annotation = get_args(annotation)[0]
    limits: dict[str, Any] = {}
    for meta in metadata:
        if isinstance(meta, _Rule):
            return meta.allowed
        for item in meta.metadata if isinstance(meta, FieldInfo) else [meta]:
            for key in ("ge", "le", "min_length", "max_length", "pattern", "step"):
                if getattr(item, key, None) is not None:
                    limits[key] = getattr(item, key)
    lo: Any = limits.get("ge")
    hi: Any = limits.get("le")
    step: Any = limits.get("step")
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if annotation is bool:
        return "true or false"
    nested = _model_of(annotation)
    if nested is not None:
        keys = ", ".join(f.alias or n for n, f in nested.model_fields.items())
        if get_origin(annotation) is list:
            return f"a non-empty list of objects with keys {keys}"
        return f"an object with keys {keys}"
    if annotation is str:
        if "pattern" in limits:
            return f"a string matching {limits['pattern']}"
        if "max_length" in limits:
            return f"a string of {limits.get('min_length', 0)} to {limits['max_length']} characters"
        return "a string"
    if annotation is int and step is not None:
        return f"a multiple of {_num(step)} between {_num(lo)} and {_num(hi)}"
    kind = "an integer" if annotation is int else "a number"
    if lo is not None and hi is not None:
        kind += f" between {_num(lo)} and {_num(hi)}"
    elif lo is not None:
        kind += f" >= {_num(lo)}"
    return kind + (f" in steps of {_num(step)}" if step is not None else "")


class _Location(NamedTuple):
    path: str  # wire path: "lora[0].weight"
    field: FieldInfo | None  # None for a key no model knows
    parent: type[_WireModel] | None  # the model the last key was looked up in
    key: str  # the last key as the caller spelled it


def _locate(loc: tuple[int | str, ...]) -> _Location:
    """Walk pydantic's error location (Python or wire names) to the wire path and the field."""
    owner: type[_WireModel] | None = ImageInferenceRequest
    parent, path, info, key = owner, "", None, ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
            continue
        parent, key = owner, item
        fields = owner.model_fields if owner is not None else {}
        name = item if item in fields else next((n for n, f in fields.items() if f.alias == item), None)
        if name is None:
            info = None
            path = _join(path, item)
            break
        info = fields[name]
        path = _join(path, info.alias or name)
        owner = _model_of(info.annotation)
    return _Location(path, info, parent, key)


def _unknown_key_message(where: _Location) -> str:
    fields = where.parent.model_fields if where.parent is not None else {}
    alias = fields[where.key].alias if where.key in fields else None
    if alias and alias != where.key:
        return f"is given twice, as {alias} and {where.key}"
    known = [f.alias or n for n, f in fields.items()]
    by_case = {k.lower(): k for k in known}
    close = by_case.get(where.key.lower()) or next(
        iter(difflib.get_close_matches(where.key, known, n=1)), None
    )
    return "is not a known parameter" + (f" (did you mean {close}?)" if close else "")


def _problem(error: Any, where: _Location) -> str:
    kind = error["type"]
    if kind == "missing":
        return f"is required ({_describe(where.field)})" if where.field is not None else "is required"
    if kind == "extra_forbidden":
        return _unknown_key_message(where)
    if kind == "zimage_rule" or where.field is None:
        return str(error["msg"])
    return f"must be {_describe(where.field)}"


def _validation_error(exc: ValidationError) -> ZImageValidationError:
    entries: list[dict[str, Any]] = []
    for error in exc.errors(include_url=False):
        where = _locate(tuple(error["loc"]))
        if error["type"] == "zimage_rules":
            for issue in error["ctx"]["issues"]:
                entries.append(
                    _entry(_join(where.path, issue["parameter"]), issue["message"], issue["value"])
                )
        else:
            value = None if error["type"] == "missing" else error["input"]
            entry = _entry(where.path, _problem(error, where), value)
            if error["type"] in _ERROR_CODES:
                entry["code"] = _ERROR_CODES[error["type"]]
            entries.append(entry)
    count = f"{len(entries)} problem" + ("s" if len(entries) != 1 else "")
    message = f"Invalid Z-Image request ({count}): " + "; ".join(e["text"] for e in entries)
    return ZImageValidationError(message, [_public(e) for e in entries])


# --------------------------------------------------------------------------------------------------
# Result models: tolerant, because Runware adds fields and a result must never be lost to parsing
# --------------------------------------------------------------------------------------------------


class _ResultModel(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Self:
        return cls.model_validate(dict(data))


class ImageResult(_ResultModel):
    """One finished image; unknown fields are kept so a newer API answer still round-trips."""

    task_type: str | None = Field(None, alias="taskType")
    task_uuid: str | None = Field(None, alias="taskUUID")
    image_uuid: str | None = Field(None, alias="imageUUID")
    image_url: str | None = Field(None, alias="imageURL")
    image_base64_data: str | None = Field(None, alias="imageBase64Data")
    image_data_uri: str | None = Field(None, alias="imageDataURI")
    seed: int | None = None
    nsfw_content: bool | None = Field(None, alias="NSFWContent")
    cost: float | None = None
    status: str | None = None


class ApiErrorDetail(_ResultModel):
    """One item of Runware's `errors` array; every field optional because gateways send partial ones."""

    code: str | None = None
    message: str | None = None
    parameter: str | None = None
    task_type: str | None = Field(None, alias="taskType")
    task_uuid: str | None = Field(None, alias="taskUUID")
    documentation: str | None = None
