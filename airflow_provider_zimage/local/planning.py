"""Request planning: a Runware `imageInference` request -> the validated arguments of one diffusers run.

Built without torch, so a request the local pipelines cannot honour (TwinFlow, ultralytics, a ControlNet
nobody mapped, a Runware image UUID, a scheduler with no flow-matching equivalent...) is refused before
any model is loaded (~20 GB and tens of seconds for Z-Image), with every offending wire parameter named.
The in-process backend and the executor service plan with this one function; only the service, which
answers over HTTP, can honour `webhookURL` and `uploadEndpoint` (`delivery_supported=True`).
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from PIL import Image

from airflow_provider_zimage.local.caching import StepCache, plan_step_cache
from airflow_provider_zimage.local.controlnet import ControlNetPlan, pending_controlnets
from airflow_provider_zimage.local.images import DEFAULT_QUALITY, load_image
from airflow_provider_zimage.local.refusals import issue, raise_issues
from airflow_provider_zimage.local.regions import Region, mask_margin_region, outpaint_region
from airflow_provider_zimage.local.safety import safety_issues
from airflow_provider_zimage.local.schedulers import (
    DEFAULT_SCHEDULER,
    SUPPORTED_SCHEDULERS,
    SchedulerChoice,
    lookup_scheduler,
)
from airflow_provider_zimage.origins import ImageOrigin
from airflow_provider_zimage.runware.catalog import guidance_for_cfg
from airflow_provider_zimage.runware.models import CATALOG, ModelSpec, resolve_model
from airflow_provider_zimage.runware.support import Backend, refusals

if TYPE_CHECKING:
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

__all__ = ["LoraPlan", "PipelineKind", "Plan", "batch_key", "guidance_for_cfg", "model_spec", "plan_request"]

PipelineKind = Literal["text-to-image", "image-to-image", "inpainting"]
SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2 of the published checkpoints
MAX_SIDE = 2048  # the API's largest width/height
DEFAULT_STRENGTH = 0.8  # Runware's default for seedImage and maskImage
DEFAULT_FORMAT = "JPG"  # Runware's default outputFormat
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class LoraPlan:
    parameter: str
    source: str
    weight: float
    weight_name: str | None


@dataclass(frozen=True)
class Plan:
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
    loras: tuple[LoraPlan, ...]
    output_format: str
    output_quality: int
    task_uuid: str
    region: Region | None = None  # outpaint / maskMargin: what the call gets, how it is pasted back
    controlnet: ControlNetPlan | None = None
    check_content: bool = False  # safety asks for a check: local/safety.py
    step_cache: StepCache | None = None  # acceleratorOptions: local/caching.py

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Arguments of the diffusers call shared by every image (generator and callback are per call)."""
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
        if self.region is not None:
            kwargs.update(self.region.pipeline_inputs())
        if self.controlnet is not None:
            kwargs["control_image"] = self.controlnet.guide_image
            kwargs["controlnet_conditioning_scale"] = self.controlnet.weight
        return kwargs


def batch_key(plan: Plan) -> Hashable | None:
    """What two plans must share to be denoised in one pipeline call; None when a plan runs alone.

    diffusers takes a list of prompts and one generator per image, so seeds stay per image. Everything
    else of the call is shared: model, size, steps, guidance, scheduler, LoRAs and the negative prompt.
    Image inputs and stochastic schedulers (which draw noise from one bound generator) run alone.
    """
    if plan.kind != "text-to-image" or plan.scheduler.stochastic or plan.controlnet is not None:
        return None  # a ControlNet's guide image is one per call
    return (
        plan.spec.air,
        plan.width,
        plan.height,
        plan.steps,
        plan.guidance_scale,
        plan.scheduler,
        plan.loras,
        plan.negative_prompt,
        plan.step_cache,  # one cache-dit setting per pipeline call
    )


def model_spec(model: str) -> ModelSpec:
    """The catalog entry of `model`, refused (naming `model`) when diffusers cannot run it."""
    spec = CATALOG.get(model) or resolve_model(model)
    if spec.hf_repo is None:
        raise_issues(
            [
                issue(
                    "model",
                    f"{spec.air} ({spec.name}) runs only on Runware: it needs a patched transformer that "
                    "diffusers does not ship; use runware:z-image@turbo locally or the Runware backend",
                    model,
                )
            ]
        )
    return spec


def plan_request(
    request: ImageInferenceRequest,
    *,
    lora_paths: Mapping[str, str],
    input_roots: Sequence[str],
    lora_roots: Sequence[str] | None = None,
    input_origins: frozenset[ImageOrigin] = frozenset(),
    delivery_supported: bool = False,
    controlnet_paths: Mapping[str, str] | None = None,
) -> Plan:
    """Validate `request` for the local pipelines and decode its image inputs; loads no model.

    LoRA files a request names (`file:...`) must be inside `lora_roots` (None: the `input_roots`);
    the targets of `lora_paths`, set by whoever deploys the backend, are trusted. Image inputs given as
    URLs are fetched only from `input_origins` (default: none). ControlNets are named by AIR ids that
    `controlnet_paths` maps to diffusers folders (configuration, never request data).
    """
    spec = model_spec(request.model)
    issues = unsupported_features(request, delivery_supported=delivery_supported)
    steps = getattr(request, "steps", None) or spec.local_default_steps or 8
    step_cache, cache_issues = plan_step_cache(getattr(request, "accelerator_options", None), int(steps))
    check_content, content_issues = safety_issues(request)
    issues += cache_issues + content_issues

    scheduler_name = getattr(request, "scheduler", None) or "Default"
    choice = lookup_scheduler(scheduler_name)
    if choice is None:
        issues.append(
            issue(
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
        issues.append(issue("inputs.maskImage", "requires inputs.seedImage (the image to edit)"))
    # The request model checks these too; a request built another way (model_copy) must not slip by.
    if getattr(request, "mask_margin", None) is not None and mask_ref is None:
        issues.append(issue("maskMargin", "only applies with inputs.maskImage (between 32 and 128)"))
    if getattr(request, "outpaint", None) is not None and seed_ref is None:
        issues.append(issue("outpaint", "requires inputs.seedImage (the image to extend)"))
    for parameter, ref in (("inputs.seedImage", seed_ref), ("inputs.maskImage", mask_ref)):
        if ref is not None and _UUID.match(ref.strip()):
            issues.append(
                issue(
                    parameter,
                    "is a Runware image UUID, which only Runware can resolve; pass the image itself "
                    "(base64, data URI, http(s) URL on an allowed origin, or a file:// URI under the "
                    "allowed folders) to the local backend",
                    ref,
                )
            )

    width, height = getattr(request, "width", None), getattr(request, "height", None)
    for parameter, value in (("width", width), ("height", height)):
        if value is not None and (value < SIZE_MULTIPLE or value % SIZE_MULTIPLE):
            issues.append(issue(parameter, f"must be a positive multiple of {SIZE_MULTIPLE}", value))

    loras = _lora_plans(
        getattr(request, "lora", None) or [],
        lora_paths,
        input_roots if lora_roots is None else lora_roots,
        issues,
    )
    pending_controlnet = pending_controlnets(
        getattr(request, "control_net", None) or [],
        controlnet_paths or {},
        has_seed_image=seed_ref is not None,
        issues=issues,
    )
    raise_issues(issues)  # everything cheap is checked before any download or decode

    seed_image = (
        load_image(seed_ref, "inputs.seedImage", "RGB", input_roots, input_origins) if seed_ref else None
    )
    mask_image = (
        load_image(mask_ref, "inputs.maskImage", "L", input_roots, input_origins) if mask_ref else None
    )
    outpaint = getattr(request, "outpaint", None)
    region: Region | None = None
    if seed_image is not None and outpaint is not None:
        region = outpaint_region(outpaint, seed_image, mask_image, width, height, issues)
        raise_issues(issues)
        assert region is not None
        seed_image, mask_image = region.image, region.mask_image
        width, height = region.size
    if seed_image is not None and (width is None or height is None):
        # Without an explicit size the output keeps the seed image's size, shrunk to the API's largest
        # side if needed and rounded down to the 16-pixel grid.
        scale = min(1.0, MAX_SIDE / max(seed_image.size))
        width, height = (
            max(SIZE_MULTIPLE, int(side * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE) for side in seed_image.size
        )
    width = width or spec.default_width
    height = height or spec.default_height
    if seed_image is not None and seed_image.size != (width, height):
        seed_image = seed_image.resize((width, height), Image.Resampling.LANCZOS)
    if mask_image is not None and mask_image.size != (width, height):
        mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)
    margin = getattr(request, "mask_margin", None)
    if seed_image is not None and mask_image is not None and margin is not None and region is None:
        region = mask_margin_region(int(margin), seed_image, mask_image, issues)
        raise_issues(issues)

    cfg = getattr(request, "cfg_scale", None)
    # Unset: the checkpoint's recommended diffusers scale (0 for Turbo, 4 for Z-Image).
    guidance = guidance_for_cfg(cfg) if cfg is not None else float(spec.local_guidance_scale or 0.0)

    strength: float | None = None
    kind: PipelineKind = "text-to-image"
    if seed_image is not None:
        kind = "inpainting" if mask_image is not None else "image-to-image"
        raw_strength = getattr(request, "strength", None)
        strength = float(raw_strength) if raw_strength is not None else DEFAULT_STRENGTH
        # Same arithmetic as the pipelines' get_timesteps: refuse what they would reject mid-load.
        if steps - int(max(steps - min(steps * strength, steps), 0)) < 1:
            raise_issues(
                [
                    issue(
                        "strength",
                        f"leaves no denoising step with steps={steps} (use a strength above 0)",
                        strength,
                    )
                ]
            )

    controlnet = None
    if pending_controlnet is not None:
        guide = load_image(
            pending_controlnet.guide_ref, "controlNet[0].guideImage", "RGB", input_roots, input_origins
        )
        if guide.size != (width, height):
            guide = guide.resize((int(width), int(height)), Image.Resampling.LANCZOS)
        controlnet = pending_controlnet.resolve(guide, int(steps))

    count = getattr(request, "number_results", None) or 1
    seed = getattr(request, "seed", None)
    base_seed = int(seed) if seed is not None else secrets.randbelow(2**32)
    output_format = (getattr(request, "output_format", None) or DEFAULT_FORMAT).upper()
    if output_format == "JPEG":
        output_format = "JPG"
    if output_format not in ("JPG", "PNG", "WEBP"):
        raise_issues([issue("outputFormat", "must be JPG, PNG or WEBP", output_format)])
    return Plan(
        spec=spec,
        kind=kind,
        prompt=request.positive_prompt,
        # Guidance off: the negative prompt is never encoded (and two plans differing only there batch).
        negative_prompt=getattr(request, "negative_prompt", None) if guidance > 0 else None,
        width=int(width),
        height=int(height),
        steps=int(steps),
        guidance_scale=guidance,
        strength=strength,
        seeds=tuple(base_seed + i for i in range(count)),
        scheduler_name=scheduler_name,
        scheduler=choice or DEFAULT_SCHEDULER,
        seed_image=seed_image,
        mask_image=mask_image,
        loras=tuple(loras),
        output_format=output_format,
        output_quality=getattr(request, "output_quality", None) or DEFAULT_QUALITY,
        task_uuid=str(getattr(request, "task_uuid", None) or uuid.uuid4()),
        region=region,
        controlnet=controlnet,
        check_content=check_content,
        step_cache=step_cache,
    )


def _lora_plans(
    loras: Sequence[Any],
    lora_paths: Mapping[str, str],
    lora_roots: Sequence[str],
    issues: list[dict[str, Any]],
) -> list[LoraPlan]:
    plans = []
    for index, lora in enumerate(loras):
        parameter = f"lora[{index}].model"
        name = str(lora.model)
        weight = float(lora.weight) if getattr(lora, "weight", None) is not None else 1.0
        resolved: tuple[str, str | None] | str | None
        if name in lora_paths:
            resolved = _resolve_mapped_lora(lora_paths[name])
        else:
            resolved = _resolve_requested_lora(name, lora_roots)
        if resolved is None:
            issues.append(
                issue(
                    parameter,
                    "cannot be resolved locally: map this AIR id with lora_paths={...} or name the "
                    "LoRA as 'file:/path/to/lora.safetensors' or 'hf:owner/repo'",
                    name,
                )
            )
        elif isinstance(resolved, str):
            issues.append(issue(parameter, resolved, name))
        else:
            plans.append(LoraPlan(parameter, resolved[0], weight, resolved[1]))
    return plans


def unsupported_features(request: Any, *, delivery_supported: bool = False) -> list[dict[str, Any]]:
    """Parameters that change what Runware would return and that the local pipelines cannot reproduce:
    the rows runware/support.py marks refused for this backend, with its words."""
    backend: Backend = "executor" if delivery_supported else "in-process"
    return [issue(name, message, value) for name, message, value in refusals(request.to_wire(), backend)]


# Hugging Face's rule for an owner or repo name: no path step ("..", "."), nothing a folder could be.
_HF_NAME = re.compile(r"^(?!.*(?:\.\.|--))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_HF_FORM = "must be hf:owner/repo or hf:owner/repo/file.safetensors (Hugging Face names, no path steps)"
# One answer for "outside the allowed folders", "missing" and "not a file or folder": a request is data
# from whoever holds the token, and must learn nothing about which files exist on the host.
LORA_FILE_REFUSAL = (
    "names no LoRA file this backend may read: LoRA files must exist inside the allowed folders "
    "([zimage] local_input_roots in-process; --lora-root, else --input-root, on the executor), "
    "or be mapped with lora_paths"
)


def _resolve_hf(target: str) -> tuple[str, str | None] | str:
    parts = target.split(":", 1)[1].strip("/").split("/")
    if len(parts) < 2 or not all(_HF_NAME.match(p) for p in parts[:2]):
        return _HF_FORM
    if any(p in ("", ".", "..") for p in parts[2:]):
        return _HF_FORM
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def _file_path(target: str) -> str | None:
    if target.startswith("file://"):
        return unquote(urlparse(target).path)
    if target.startswith("file:"):
        return target[5:]
    return None


def _resolve_requested_lora(name: str, roots: Sequence[str]) -> tuple[str, str | None] | str | None:
    """A LoRA the request names: `hf:` ids, or `file:` paths that resolve (symlinks followed) inside
    `roots`; bare names are AIR ids that only `lora_paths` can map, never paths."""
    if name.startswith(("hf:", "huggingface:")):
        return _resolve_hf(name)
    path = _file_path(name)
    if path is None:
        return None
    resolved = Path(path).resolve()
    allowed = [Path(root).resolve() for root in roots]
    if not any(resolved.is_relative_to(root) for root in allowed) or not resolved.exists():
        return LORA_FILE_REFUSAL
    return str(resolved), None


def _resolve_mapped_lora(target: str) -> tuple[str, str | None] | str:
    """A `lora_paths` target: configuration, not request data, so it may point anywhere."""
    if target.startswith(("hf:", "huggingface:")):
        return _resolve_hf(target)
    path = _file_path(target) or target
    if not os.path.exists(path):
        return f"is mapped by lora_paths to a local LoRA that does not exist: {path}"
    return path, None
