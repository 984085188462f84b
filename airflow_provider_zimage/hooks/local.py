"""Local backend: run Z-Image with Hugging Face diffusers on this worker's GPU (or CPU) instead of Runware.

Design points, each of which exists because of a failure mode:

* Every request is checked *before* any model is loaded: loading Z-Image costs ~20 GB of memory and tens of
  seconds, so a request the local backend cannot honour (TwinFlow, ControlNet, ultralytics, outpainting,
  webhooks, a Runware image UUID, a scheduler with no flow-matching equivalent...) is refused up front with a
  `ZImageValidationError` naming the wire parameter, never silently ignored.
* Pipelines are cached per process, keyed by (source, device, dtype, offload), so the mapped tasks of one
  worker load the weights once. Image-to-image and inpainting pipelines are built from the text-to-image
  pipeline's components: same weights, no second load. (`from_pipe` is avoided on purpose: it casts the
  shared modules to float32 unless told otherwise.)
* One lock per device: two tasks of one process never denoise on the same GPU at once (that would double
  peak memory and OOM on the GPUs this is meant for). Loading happens under the same lock.
* Every image of a request is generated with its own `torch.Generator` seeded `seed + i`, so any single
  result is reproducible from the seed recorded in its result, whatever `numberResults` was.
* torch and diffusers are imported lazily: the provider installs and imports without the `[local]` extra.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gc
import inspect
import io
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from airflow_provider_zimage.exceptions import ZImageError, ZImageTransientError, ZImageValidationError

if TYPE_CHECKING:
    import numpy as np

    from airflow_provider_zimage.models import ImageInferenceRequest, ModelSpec

log = logging.getLogger(__name__)

__all__ = [
    "SCHEDULER_MAP",
    "SUPPORTED_SCHEDULERS",
    "GeneratedImage",
    "LocalBackendUnavailable",
    "LocalGenerationError",
    "LocalZImageExecutor",
    "SchedulerChoice",
    "cached_pipelines",
    "clear_pipeline_cache",
    "load_count",
]

PipelineKind = Literal["text-to-image", "image-to-image", "inpainting"]
_PIPELINE_CLASSES: dict[str, str] = {
    "text-to-image": "ZImagePipeline",
    "image-to-image": "ZImageImg2ImgPipeline",
    "inpainting": "ZImageInpaintPipeline",
}
_INSTALL_HINT = "pip install 'airflow-provider-zimage[local]'"
_SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2 of the published checkpoints
_MAX_SIDE = 2048  # the API's largest width/height
_DEFAULT_STRENGTH = 0.8  # Runware's default for seedImage and maskImage
_DEFAULT_QUALITY = 95  # Runware's default outputQuality
_DEFAULT_FORMAT = "JPG"  # Runware's default outputFormat
_MAX_DOWNLOAD = 64 * 1024 * 1024
_PROGRESS_LINES = 10
_URL_QUERY = re.compile(r"(?i)\b(https?://[^\s?#'\"]*)\?[^\s#'\"]*")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


# --------------------------------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedImage:
    """One encoded image plus a result item shaped like Runware's, so callers store both backends alike."""

    result: dict[str, Any]
    data: bytes = field(repr=False)
    format: str

    @property
    def seed(self) -> int:
        return int(self.result["seed"])


class LocalBackendUnavailable(ZImageError, ImportError):
    """torch/diffusers are missing or too old; an ImportError so `except ImportError` callers still work."""


class LocalGenerationError(ZImageError):
    """The pipeline ran but produced no usable image (NaN or all-black output). Retrying will not help."""


# --------------------------------------------------------------------------------------------------
# Scheduler map: Runware scheduler names -> diffusers schedulers that can drive a flow-matching model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerChoice:
    """How one Runware scheduler name runs on Z-Image.

    Z-Image is a flow-matching model and its pipelines call `set_timesteps(sigmas=..., mu=...)` and, for
    image-to-image and inpainting, `scale_noise(...)`. Only FlowMatch* schedulers speak that natively;
    UniPC and DPM-Solver++ have a flow-matching mode (`prediction_type="flow_prediction"`,
    `use_flow_sigmas=True`) and get thin adapters (see `_adapt_scheduler`). Every entry here was run on the
    tiny checkpoint for all three pipelines, and the multistep solvers were checked against an analytic
    flow (Gaussian data) to converge faster than Euler.

    `sigmas`: "native" (accepts the pipeline's list), "array" (needs a numpy array: UniPC), "own" (takes
    no sigmas; its own flow schedule equals Z-Image's default to 1e-3: DPM-Solver++).
    `stochastic`: draws fresh noise in `step()`; the image's generator is bound to it so the result stays
    reproducible from the seed.
    """

    class_name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    flow_solver: bool = False
    sigmas: Literal["native", "array", "own"] = "native"
    stochastic: bool = False


_EULER = SchedulerChoice("FlowMatchEulerDiscreteScheduler")
_UNIPC = functools.partial(SchedulerChoice, "UniPCMultistepScheduler", flow_solver=True, sigmas="array")
_DPM = functools.partial(SchedulerChoice, "DPMSolverMultistepScheduler", flow_solver=True, sigmas="own")

SCHEDULER_MAP: dict[str, SchedulerChoice] = {
    "Default": _EULER,
    "FlowMatchEulerDiscreteScheduler": _EULER,
    "Euler": _EULER,
    "Euler DiscreteScheduler": _EULER,
    "Euler Karras": SchedulerChoice("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler Exponential": SchedulerChoice("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    # Ancestral Euler's flow-matching analogue: predict x0, re-noise to the next sigma with fresh noise.
    "Euler a": SchedulerChoice(
        "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, stochastic=True
    ),
    "EulerAncestralDiscreteScheduler": SchedulerChoice(
        "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, stochastic=True
    ),
    "LCM": SchedulerChoice("FlowMatchLCMScheduler", stochastic=True),
    "LCMScheduler": SchedulerChoice("FlowMatchLCMScheduler", stochastic=True),
    "UniPC": _UNIPC({"solver_order": 2}),
    "UniPC 2M": _UNIPC({"solver_order": 2}),
    "UniPC 3M": _UNIPC({"solver_order": 3}),
    "DPM++": _DPM({"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M": _DPM({"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    "DPM++ 3M": _DPM({"solver_order": 3, "algorithm_type": "dpmsolver++"}),
    "DPMSolverMultistepScheduler": _DPM({"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M SDE": _DPM({"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}, stochastic=True),
}
SUPPORTED_SCHEDULERS: tuple[str, ...] = tuple(SCHEDULER_MAP)
_SCHEDULER_LOOKUP = {name.casefold(): choice for name, choice in SCHEDULER_MAP.items()}


def _adapt_scheduler(choice: SchedulerChoice, base_config: Mapping[str, Any], generator: Any) -> Any:
    """A fresh scheduler for one image, configured from the checkpoint's own scheduler config.

    Fresh per image because schedulers are stateful (step index, multistep history) and the pipeline is
    shared by every task of the process.
    """
    import diffusers
    import numpy as np
    import torch

    cls = getattr(diffusers, choice.class_name)
    if choice.flow_solver:
        scheduler = cls(
            num_train_timesteps=base_config.get("num_train_timesteps", 1000),
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=base_config.get("shift", 1.0),
            use_dynamic_shifting=base_config.get("use_dynamic_shifting", False),
            **choice.options,
        )
    else:
        scheduler = cls.from_config(dict(base_config), **choice.options)

    original = scheduler.set_timesteps
    if choice.sigmas == "array":
        # diffusers' UniPC multiplies the sigmas by a float, which fails on the list the pipeline passes.
        def set_timesteps(
            num_inference_steps: int | None = None,
            device: Any = None,
            sigmas: Sequence[float] | None = None,
            mu: float | None = None,
        ) -> None:
            array = None if sigmas is None else np.asarray(sigmas, dtype=np.float64)
            original(num_inference_steps=num_inference_steps, device=device, sigmas=array, mu=mu)

        scheduler.set_timesteps = set_timesteps
    elif choice.sigmas == "own":
        # DPM-Solver asserts when given `mu` without dynamic shifting; the pipeline always passes one.
        takes_mu = "mu" in inspect.signature(original).parameters and scheduler.config.use_dynamic_shifting

        # The pipeline always passes its default sigmas (linspace(1, 1/n, n)); this scheduler's flow
        # schedule is the same curve, so only the step count is forwarded.
        def set_timesteps(
            num_inference_steps: int | None = None,
            device: Any = None,
            sigmas: Sequence[float] | None = None,
            mu: float | None = None,
        ) -> None:
            steps = len(sigmas) if sigmas is not None else num_inference_steps
            original(steps, device=device, **({"mu": mu} if takes_mu else {}))

        scheduler.set_timesteps = set_timesteps

    if not hasattr(scheduler, "scale_noise"):
        # Image-to-image and inpainting noise the input with the flow-matching interpolation.
        def scale_noise(sample: Any, timestep: Any, noise: Any = None) -> Any:
            timesteps = scheduler.timesteps.to(sample.device)
            wanted = torch.as_tensor(timestep, device=sample.device).reshape(-1)
            index = [int((timesteps.float() - t.float()).abs().argmin()) for t in wanted]
            sigma = scheduler.sigmas.to(device=sample.device, dtype=sample.dtype)[index]
            sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
            return sigma * noise + (1.0 - sigma) * sample

        scheduler.scale_noise = scale_noise

    if choice.stochastic:
        scheduler.step = functools.partial(scheduler.step, generator=generator)
    return scheduler


# --------------------------------------------------------------------------------------------------
# Process-level state: pipeline cache, device locks, load counter
# --------------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    """One loaded checkpoint on one device and the pipelines built over its components."""

    pipelines: dict[str, Any]
    base_scheduler: Any
    offload_owner: str | None = None


_CACHE: dict[tuple[str, str, str, bool], _Loaded] = {}
_STATE_LOCK = threading.Lock()
_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_LOADS = 0


def load_count() -> int:
    """How many times this process called `from_pretrained` (tests assert the cache works)."""
    return _LOADS


def cached_pipelines() -> list[tuple[str, str, str, str]]:
    """(source, device, dtype, pipeline kind) of every cached pipeline."""
    with _STATE_LOCK:
        return [(s, d, t, kind) for (s, d, t, _), entry in _CACHE.items() for kind in entry.pipelines]


def clear_pipeline_cache() -> None:
    """Drop every cached pipeline and give the memory back (tests, or a worker switching models)."""
    with _STATE_LOCK:
        devices = {key[1] for key in _CACHE}
        _CACHE.clear()
    _release_memory(devices)


def _release_memory(devices: set[str]) -> None:
    gc.collect()
    if any(d.startswith("cuda") for d in devices):
        import torch

        torch.cuda.empty_cache()


def _device_lock(device: str) -> threading.Lock:
    with _STATE_LOCK:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


# --------------------------------------------------------------------------------------------------
# The validated plan of one request (built without torch)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LoraPlan:
    parameter: str
    source: str
    weight: float
    weight_name: str | None


@dataclass(frozen=True)
class _Plan:
    spec: ModelSpec
    kind: PipelineKind
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float | None
    seeds: tuple[int, ...]
    scheduler_name: str
    scheduler: SchedulerChoice
    seed_image: Image.Image | None
    mask_image: Image.Image | None
    loras: tuple[_LoraPlan, ...]
    output_format: str
    output_quality: int
    task_uuid: str

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Arguments of the diffusers call shared by every image (generator and callback are per image)."""
        kwargs: dict[str, Any] = {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.seed_image is not None:
            kwargs["image"] = self.seed_image
            kwargs["strength"] = self.strength
        if self.mask_image is not None:
            kwargs["mask_image"] = self.mask_image
        return kwargs


def _issue(parameter: str, message: str, value: Any = None) -> dict[str, Any]:
    """One entry of `ZImageValidationError.errors`, safe to log: URL queries (presigned URLs and webhook
    tokens carry secrets there) are dropped and long values (base64 images) cut short."""
    if value is not None and not isinstance(value, (str, int, float, bool)):
        value = json.dumps(_plain(value), default=repr)
    if isinstance(value, str):
        value = _URL_QUERY.sub(r"\1?<redacted>", value)
        if len(value) > 80:
            value = f"{value[:60]}... ({len(value)} characters)"
    return {"parameter": parameter, "message": message, "value": value}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    return dump(by_alias=True, exclude_none=True, mode="json") if dump else value


def _raise(issues: list[dict[str, Any]]) -> None:
    if issues:
        detail = "; ".join(f"{i['parameter']}: {i['message']}" for i in issues)
        raise ZImageValidationError(f"The local Z-Image backend cannot run this request: {detail}", issues)


# --------------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------------


class LocalZImageExecutor:
    """Generate Z-Image images in this process with diffusers.

    :param model_path: a Hugging Face repo id or a local diffusers folder; when None, the catalog's
        `hf_repo` of the request's model (`Tongyi-MAI/Z-Image-Turbo`, `Tongyi-MAI/Z-Image`).
    :param device: "auto" (cuda, then mps, then cpu) or a torch device string ("cuda:1").
    :param dtype: "auto" (bfloat16 on GPU, float32 on CPU), "bfloat16", "float32" or "float16".
        float16 overflows inside Z-Image (NaN, black images) and is refused unless `allow_fp16`.
    :param cpu_offload: keep weights in CPU memory and move one model at a time to the GPU
        (`enable_model_cpu_offload`): slower, but fits 16-24 GB GPUs.
    :param local_files_only: never touch the Hugging Face hub (weights must be in the cache or folder).
    :param lora_paths: where LoRAs named by Runware AIR ids (`civitai:123@4`) live locally: a file, a folder
        or `hf:owner/repo`. Requests may also name `file:/path/lora.safetensors` or `hf:owner/repo` directly.
    :param max_models_per_device: checkpoints kept per device; loading another evicts the oldest, because
        two Z-Image checkpoints (~20 GB each) do not fit most GPUs.
    :param from_pretrained_kwargs: passed to `from_pretrained` (revision, cache_dir, token...).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        cpu_offload: bool = False,
        local_files_only: bool = False,
        allow_fp16: bool = False,
        lora_paths: Mapping[str, str] | None = None,
        max_models_per_device: int = 1,
        from_pretrained_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.model_path = os.fspath(model_path) if model_path is not None else None
        self.device = device or "auto"
        self.dtype = _normalise_dtype(dtype or "auto", allow_fp16)
        self.cpu_offload = cpu_offload
        self.local_files_only = local_files_only
        self.lora_paths = dict(lora_paths or {})
        self.max_models_per_device = max(1, max_models_per_device)
        self.from_pretrained_kwargs = dict(from_pretrained_kwargs or {})
        self._resolved: tuple[str, str] | None = None

    # -- public API --------------------------------------------------------------------------------

    def validate(self, request: ImageInferenceRequest) -> None:
        """Raise `ZImageValidationError` if this backend cannot honour `request` (loads nothing)."""
        self._plan(request)

    def generate(self, request: ImageInferenceRequest) -> list[GeneratedImage]:
        """Run `request` and return `numberResults` encoded images with Runware-shaped result items."""
        plan = self._plan(request)
        torch = _import_runtime()
        device, dtype = self._resolve(torch)
        started = time.perf_counter()
        with _device_lock(device):
            waited = time.perf_counter() - started
            if waited > 1.0:
                log.info("Waited %.1fs for %s (another task of this process was using it)", waited, device)
            pipe = self._pipeline(plan.spec, plan.kind, device, dtype)
            arrays = self._run(pipe, plan, device, dtype)
        # Encoding needs no GPU: done outside the lock so the next task can start denoising.
        images = [self._encode(plan, seed, array) for seed, array in zip(plan.seeds, arrays, strict=True)]
        log.info(
            "Generated %d image(s) %dx%d in %.2fs (task %s)",
            len(images),
            plan.width,
            plan.height,
            time.perf_counter() - started,
            plan.task_uuid,
        )
        return images

    def pipeline(self, model: str = "runware:z-image@turbo", kind: PipelineKind = "text-to-image") -> Any:
        """The cached pipeline this executor would use (loaded if needed): warm-up, benchmarks, tests."""
        spec = self._spec(model)
        torch = _import_runtime()
        device, dtype = self._resolve(torch)
        with _device_lock(device):
            return self._pipeline(spec, kind, device, dtype)

    @property
    def resolved_device(self) -> str:
        """The concrete device ("cuda:0", "mps", "cpu") after resolving "auto"."""
        return self._resolve(_import_runtime())[0]

    # -- planning (no torch) -----------------------------------------------------------------------

    def _spec(self, model: str) -> ModelSpec:
        from airflow_provider_zimage.models import CATALOG, resolve_model

        spec = CATALOG.get(model) or resolve_model(model)
        if spec.hf_repo is None:
            _raise(
                [
                    _issue(
                        "model",
                        f"{spec.air} ({spec.name}) runs only on Runware: it needs a patched transformer that "
                        "diffusers does not ship; use runware:z-image@turbo locally or the Runware backend",
                        model,
                    )
                ]
            )
        return spec

    def _plan(self, request: ImageInferenceRequest) -> _Plan:
        spec = self._spec(request.model)
        issues = _unsupported_features(request)

        scheduler_name = getattr(request, "scheduler", None) or "Default"
        choice = _SCHEDULER_LOOKUP.get(scheduler_name.casefold())
        if choice is None:
            issues.append(
                _issue(
                    "scheduler",
                    "has no flow-matching equivalent in diffusers for Z-Image; the local backend supports "
                    + ", ".join(SUPPORTED_SCHEDULERS),
                    scheduler_name,
                )
            )

        inputs = getattr(request, "inputs", None)
        seed_ref = getattr(inputs, "seed_image", None) if inputs is not None else None
        mask_ref = getattr(inputs, "mask_image", None) if inputs is not None else None
        if mask_ref is not None and seed_ref is None:
            issues.append(_issue("inputs.maskImage", "requires inputs.seedImage (the image to edit)"))
        for parameter, ref in (("inputs.seedImage", seed_ref), ("inputs.maskImage", mask_ref)):
            if ref is not None and _UUID.match(ref.strip()):
                issues.append(
                    _issue(
                        parameter,
                        "is a Runware image UUID, which only Runware can resolve; pass the image itself "
                        "(base64, data URI, http(s) URL or file path) to the local backend",
                        ref,
                    )
                )

        width, height = getattr(request, "width", None), getattr(request, "height", None)
        for parameter, value in (("width", width), ("height", height)):
            if value is not None and (value < _SIZE_MULTIPLE or value % _SIZE_MULTIPLE):
                issues.append(_issue(parameter, f"must be a positive multiple of {_SIZE_MULTIPLE}", value))

        loras = self._lora_plans(getattr(request, "lora", None) or [], issues)
        _raise(issues)  # everything cheap is checked before any download or decode

        seed_image = _load_image(seed_ref, "inputs.seedImage", "RGB") if seed_ref is not None else None
        mask_image = _load_image(mask_ref, "inputs.maskImage", "L") if mask_ref is not None else None
        if seed_image is not None and (width is None or height is None):
            # Without an explicit size the output keeps the seed image's size, shrunk to the API's largest
            # side if needed and rounded down to the 16-pixel grid.
            scale = min(1.0, _MAX_SIDE / max(seed_image.size))
            width, height = (
                max(_SIZE_MULTIPLE, int(side * scale) // _SIZE_MULTIPLE * _SIZE_MULTIPLE)
                for side in seed_image.size
            )
        width = width or spec.default_width
        height = height or spec.default_height
        if seed_image is not None and seed_image.size != (width, height):
            seed_image = seed_image.resize((width, height), Image.Resampling.LANCZOS)
        if mask_image is not None and mask_image.size != (width, height):
            mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)

        steps = getattr(request, "steps", None) or spec.local_default_steps or 8
        cfg = getattr(request, "cfg_scale", None)
        guidance = float(cfg) if cfg is not None else float(spec.local_guidance_scale or 0.0)

        strength: float | None = None
        kind: PipelineKind = "text-to-image"
        if seed_image is not None:
            kind = "inpainting" if mask_image is not None else "image-to-image"
            raw_strength = getattr(request, "strength", None)
            strength = float(raw_strength) if raw_strength is not None else _DEFAULT_STRENGTH
            # Same arithmetic as the pipelines' get_timesteps: refuse what they would reject mid-load.
            if steps - int(max(steps - min(steps * strength, steps), 0)) < 1:
                _raise(
                    [
                        _issue(
                            "strength",
                            f"leaves no denoising step with steps={steps} (use a strength above 0)",
                            strength,
                        )
                    ]
                )

        count = getattr(request, "number_results", None) or 1
        seed = getattr(request, "seed", None)
        base_seed = int(seed) if seed is not None else secrets.randbelow(2**32)
        output_format = (getattr(request, "output_format", None) or _DEFAULT_FORMAT).upper()
        if output_format == "JPEG":
            output_format = "JPG"
        if output_format not in ("JPG", "PNG", "WEBP"):
            _raise([_issue("outputFormat", "must be JPG, PNG or WEBP", output_format)])
        return _Plan(
            spec=spec,
            kind=kind,
            prompt=request.positive_prompt,
            negative_prompt=getattr(request, "negative_prompt", None),
            width=int(width),
            height=int(height),
            steps=int(steps),
            guidance_scale=guidance,
            strength=strength,
            seeds=tuple(base_seed + i for i in range(count)),
            scheduler_name=scheduler_name,
            scheduler=choice or _EULER,
            seed_image=seed_image,
            mask_image=mask_image,
            loras=tuple(loras),
            output_format=output_format,
            output_quality=getattr(request, "output_quality", None) or _DEFAULT_QUALITY,
            task_uuid=str(getattr(request, "task_uuid", None) or uuid.uuid4()),
        )

    def _lora_plans(self, loras: Sequence[Any], issues: list[dict[str, Any]]) -> list[_LoraPlan]:
        plans = []
        for index, lora in enumerate(loras):
            parameter = f"lora[{index}].model"
            name = str(lora.model)
            target = self.lora_paths.get(name, name)
            weight = float(lora.weight) if getattr(lora, "weight", None) is not None else 1.0
            resolved = _resolve_lora(target)
            if resolved is None:
                issues.append(
                    _issue(
                        parameter,
                        "cannot be resolved locally: map this AIR id with lora_paths={...} or name the "
                        "LoRA as 'file:/path/to/lora.safetensors' or 'hf:owner/repo'",
                        name,
                    )
                )
            elif isinstance(resolved, str):
                issues.append(_issue(parameter, resolved, name))
            else:
                plans.append(_LoraPlan(parameter, resolved[0], weight, resolved[1]))
        return plans

    # -- loading -----------------------------------------------------------------------------------

    def _resolve(self, torch: Any) -> tuple[str, str]:
        if self._resolved is None:
            device = _resolve_device(torch, self.device)
            dtype = self.dtype
            if dtype == "auto":
                dtype = "float32" if device == "cpu" else "bfloat16"
            self._resolved = (device, dtype)
        return self._resolved

    def _source(self, spec: ModelSpec) -> str:
        return self.model_path or str(spec.hf_repo)

    def _pipeline(self, spec: ModelSpec, kind: PipelineKind, device: str, dtype: str) -> Any:
        """The cached pipeline of `kind`; caller holds the device lock."""
        offload = self.cpu_offload and device != "cpu"
        key = (self._source(spec), device, dtype, offload)
        with _STATE_LOCK:
            entry = _CACHE.get(key)
        if entry is None:
            self._evict_for(device)
            entry = self._load(key)
            with _STATE_LOCK:
                _CACHE[key] = entry
        pipe = entry.pipelines.get(kind)
        if pipe is None:
            import diffusers

            base = entry.pipelines["text-to-image"]
            pipe = getattr(diffusers, _PIPELINE_CLASSES[kind])(**base.components)
            pipe.set_progress_bar_config(disable=True)
            entry.pipelines[kind] = pipe
        if offload and entry.offload_owner != kind:
            # Offload hooks live on the shared modules and chain text encoder -> transformer -> VAE for the
            # pipeline that installed them; re-install them for the pipeline about to run.
            pipe.enable_model_cpu_offload(device=device)
            entry.offload_owner = kind
        return pipe

    def _evict_for(self, device: str) -> None:
        with _STATE_LOCK:
            same_device = [k for k in _CACHE if k[1] == device]
            evicted = same_device[: max(0, len(same_device) - self.max_models_per_device + 1)]
            for key in evicted:
                del _CACHE[key]
        if evicted:
            log.info(
                "Evicting %s from %s to make room for another checkpoint", [k[0] for k in evicted], device
            )
            _release_memory({device})

    def _load(self, key: tuple[str, str, str, bool]) -> _Loaded:
        global _LOADS
        import diffusers
        import torch

        source, device, dtype, offload = key
        started = time.perf_counter()
        log.info(
            "Loading Z-Image from %s (device=%s, dtype=%s, cpu_offload=%s)", source, device, dtype, offload
        )
        try:
            pipe = diffusers.ZImagePipeline.from_pretrained(
                source,
                dtype=getattr(torch, dtype),
                local_files_only=self.local_files_only,
                **self.from_pretrained_kwargs,
            )
        except (OSError, ValueError) as exc:
            hint = (
                " (local_files_only: the weights must already be in the HF cache)"
                if self.local_files_only
                else ""
            )
            raise ZImageError(f"Could not load Z-Image from {source!r}{hint}: {exc}") from exc
        finally:
            _LOADS += 1
        if offload:
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        pipe.set_progress_bar_config(disable=True)  # per-step progress is logged by `_progress` instead
        log.info("Loaded Z-Image in %.1fs", time.perf_counter() - started)
        return _Loaded(
            {"text-to-image": pipe},
            base_scheduler=pipe.scheduler,
            offload_owner="text-to-image" if offload else None,
        )

    # -- running -----------------------------------------------------------------------------------

    def _run(self, pipe: Any, plan: _Plan, device: str, dtype: str) -> list[np.ndarray]:
        import numpy as np
        import torch

        base_scheduler = pipe.scheduler
        generator_device = "cpu" if device in ("cpu", "mps") else device  # MPS generators are unreliable
        cuda = device.startswith("cuda")
        log.info(
            "%s: %d image(s) %dx%d, %d steps, guidance %g, scheduler %s, %d LoRA(s), %s %s",
            plan.kind,
            len(plan.seeds),
            plan.width,
            plan.height,
            plan.steps,
            plan.guidance_scale,
            plan.scheduler_name,
            len(plan.loras),
            device,
            dtype,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        adapters = self._apply_loras(pipe, plan)
        arrays = []
        try:
            for index, seed in enumerate(plan.seeds):
                generator = torch.Generator(generator_device).manual_seed(seed)
                pipe.scheduler = _adapt_scheduler(plan.scheduler, base_scheduler.config, generator)
                label = f"image {index + 1}/{len(plan.seeds)} (seed {seed})"
                started = time.perf_counter()
                output = pipe(
                    **plan.pipeline_kwargs(),
                    generator=generator,
                    output_type="np",
                    callback_on_step_end=_progress(label, started),
                )
                array = np.asarray(output.images[0])
                log.info("%s done in %.2fs", label, time.perf_counter() - started)
                nan = bool(np.isnan(array).any())
                if nan or not array.any():
                    raise LocalGenerationError(
                        f"{label} came out {'NaN' if nan else 'all black'} with dtype {dtype} on {device}. "
                        "Z-Image overflows in float16: use bfloat16 on GPUs (dtype='auto') or float32 on CPU."
                    )
                arrays.append(array)
        finally:
            pipe.scheduler = base_scheduler
            if adapters:
                # The pipeline is shared by the next task of this process: leave no adapter behind.
                pipe.unload_lora_weights()
            if cuda:
                log.info("Peak GPU memory: %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
        return arrays

    def _apply_loras(self, pipe: Any, plan: _Plan) -> list[str]:
        names: list[str] = []
        try:
            for index, lora in enumerate(plan.loras):
                name = f"zimage_lora_{index}"
                kwargs: dict[str, Any] = {"adapter_name": name, "local_files_only": self.local_files_only}
                if lora.weight_name:
                    kwargs["weight_name"] = lora.weight_name
                try:
                    pipe.load_lora_weights(lora.source, **kwargs)
                except (OSError, ValueError, KeyError, RuntimeError) as exc:
                    raise ZImageValidationError(
                        f"{lora.parameter}: could not load LoRA {lora.source!r}: {exc}",
                        [_issue(lora.parameter, f"could not be loaded: {exc}", lora.source)],
                    ) from exc
                names.append(name)
            if names:
                pipe.set_adapters(names, adapter_weights=[lora.weight for lora in plan.loras])
        except BaseException:
            if names:
                pipe.unload_lora_weights()
            raise
        return names

    @staticmethod
    def _encode(plan: _Plan, seed: int, array: np.ndarray) -> GeneratedImage:
        data = encode_image(array, plan.output_format, plan.output_quality)
        result = {
            "taskType": "imageInference",
            "taskUUID": plan.task_uuid,
            "imageUUID": str(uuid.uuid4()),
            "seed": seed,
            "NSFWContent": False,
            "cost": 0.0,
            "status": "success",
        }
        return GeneratedImage(result=result, data=data, format=plan.output_format)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def encode_image(array: np.ndarray, output_format: str, quality: int = _DEFAULT_QUALITY) -> bytes:
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


def _unsupported_features(request: Any) -> list[dict[str, Any]]:
    """Parameters that change what Runware would return and that this backend cannot reproduce."""
    issues = []
    refusals = [
        (
            "controlNet",
            "control_net",
            "needs a Z-Image ControlNet model, which the local backend does not load",
        ),
        ("ultralytics", "ultralytics", "(face/hand detailing) is a Runware-side post-process"),
        ("outpaint", "outpaint", "is not available locally (diffusers has no Z-Image outpainting pipeline)"),
        ("maskMargin", "mask_margin", "(crop-and-zoom inpainting) is not implemented by the local backend"),
        (
            "acceleratorOptions",
            "accelerator_options",
            "(step caching) is Runware-side; remove it for local runs",
        ),
        ("webhookURL", "webhook_url", "is a Runware delivery option; local results are returned directly"),
        (
            "uploadEndpoint",
            "upload_endpoint",
            "is a Runware delivery option; local results are returned directly",
        ),
    ]
    for wire, attribute, message in refusals:
        value = getattr(request, attribute, None)
        if value not in (None, [], {}):
            issues.append(_issue(wire, message, value))
    acceleration = getattr(request, "acceleration", None)
    if acceleration not in (None, "none"):
        issues.append(
            _issue(
                "acceleration",
                "is Runware-side caching; the local backend runs every step (use 'none')",
                acceleration,
            )
        )
    safety = getattr(request, "safety", None)
    if safety is not None and getattr(safety, "check_content", None):
        issues.append(
            _issue("safety.checkContent", "needs Runware's NSFW classifier; the local backend has none", True)
        )
    return issues


def _resolve_lora(target: str) -> tuple[str, str | None] | str | None:
    """(source for load_lora_weights, weight_name) | problem text | None when it names nothing local."""
    if target.startswith(("hf:", "huggingface:")):
        repo = target.split(":", 1)[1].strip("/")
        parts = repo.split("/")
        if len(parts) < 2:
            return "must be hf:owner/repo or hf:owner/repo/file.safetensors"
        return "/".join(parts[:2]), ("/".join(parts[2:]) or None)
    path: str | None = None
    if target.startswith("file:"):
        path = unquote(urlparse(target).path) if target.startswith("file://") else target[5:]
    elif os.path.isabs(target) or os.path.exists(target):
        path = target
    if path is None:
        return None
    if not os.path.exists(path):
        return f"names a local LoRA that does not exist: {path}"
    return path, None


def _load_image(reference: str, parameter: str, mode: str) -> Image.Image:
    """Decode an image given as a data URI, base64, http(s) URL, file:// URL or local path."""
    reference = reference.strip()
    data: bytes | None = None
    if reference.startswith("data:"):
        data = _b64(reference.partition(",")[2], parameter)
    elif reference.lower().startswith(("http://", "https://")):
        data = _download(reference, parameter)
    elif reference.startswith("file:"):
        path = unquote(urlparse(reference).path) if reference.startswith("file://") else reference[5:]
        data = _read_file(path, parameter)
    elif len(reference) < 4096 and (os.path.isabs(reference) or os.path.isfile(reference)):
        data = _read_file(reference, parameter)
    else:
        data = _b64(reference, parameter)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ZImageValidationError(
            f"{parameter}: is not a readable image ({exc})",
            [_issue(parameter, "is not a readable image", reference)],
        ) from None


def _b64(text: str, parameter: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ZImageValidationError(
            f"{parameter}: is neither base64 image data, a data URI, a URL nor an existing file",
            [_issue(parameter, "is neither base64 image data, a data URI, a URL nor an existing file", text)],
        ) from None


def _read_file(path: str, parameter: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ZImageValidationError(
            f"{parameter}: cannot read {path}: {exc.strerror}", [_issue(parameter, "cannot be read", path)]
        ) from None


def _download(url: str, parameter: str) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=60.0, follow_redirects=True) as response:
            if 400 <= response.status_code < 500:
                raise ZImageValidationError(
                    f"{parameter}: download failed with HTTP {response.status_code}",
                    [
                        _issue(
                            parameter, f"download failed with HTTP {response.status_code}", url.split("?")[0]
                        )
                    ],
                )
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > _MAX_DOWNLOAD:
                    raise ZImageValidationError(
                        f"{parameter}: image is larger than {_MAX_DOWNLOAD // 2**20} MiB",
                        [_issue(parameter, "is too large", url.split("?")[0])],
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
        raise ZImageTransientError(
            f"{parameter}: could not download {url.split('?')[0]}: {exc}", status_code=status
        ) from exc


def _progress(label: str, started: float) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A `callback_on_step_end` logging about `_PROGRESS_LINES` lines per image, however many steps."""

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or 0) or step + 1
        every = max(1, math.ceil(total / _PROGRESS_LINES))
        done = step + 1
        if done % every == 0 or done == total:
            log.info("%s: step %d/%d (%.2fs)", label, done, total, time.perf_counter() - started)
        return tensors

    return callback


def _normalise_dtype(dtype: str, allow_fp16: bool) -> str:
    names = {
        "auto": "auto",
        "bfloat16": "bfloat16",
        "bf16": "bfloat16",
        "float32": "float32",
        "fp32": "float32",
        "float": "float32",
        "float16": "float16",
        "fp16": "float16",
        "half": "float16",
    }
    name = names.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"dtype must be one of auto, bfloat16, float32, float16 (got {dtype!r})")
    if name == "float16" and not allow_fp16:
        raise ValueError(
            "dtype float16 is refused: Z-Image's activations overflow float16 and the images come out NaN "
            "(black). Use bfloat16 (GPU) or float32, or pass allow_fp16=True to try anyway."
        )
    return name


def _resolve_device(torch: Any, requested: str) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()}"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ZImageError(f"device {requested!r} requested but torch sees no CUDA GPU")
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _import_runtime() -> Any:
    """torch, after checking the `[local]` extra is installed and recent enough."""
    try:
        import diffusers
        import torch
    except ImportError as exc:
        raise LocalBackendUnavailable(
            f"The local Z-Image backend needs torch and diffusers ({exc.name} is missing): {_INSTALL_HINT}"
        ) from exc
    if not all(hasattr(diffusers, name) for name in _PIPELINE_CLASSES.values()):
        raise LocalBackendUnavailable(
            f"diffusers {diffusers.__version__} has no Z-Image pipelines (needs >= 0.42): {_INSTALL_HINT}"
        )
    return torch
