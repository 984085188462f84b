"""ControlNet on the local backends: `controlNet[]` -> diffusers' `ZImageControlNetPipeline`.

ControlNet weights are the user's (e.g. Z-Image-Turbo Fun ControlNet Union, converted to a diffusers
folder), named in requests by the AIR id Runware knows them by and mapped to a folder by whoever runs the
backend: `controlnet_paths={AIR: folder}` in-process, `--controlnet AIR=FOLDER` on the executor. A
request never names a path: an unknown id is refused before anything loads.

What diffusers 0.42's pipeline can and cannot do decides what is accepted:

* one ControlNet per call (no multi-ControlNet wrapper for Z-Image): a second entry is refused;
* `weight` is `controlnet_conditioning_scale` (Runware's default 1, not diffusers' 0.75);
* step windows (`startStep`/`endStep` and their percentages) are not pipeline arguments; they are
  served by a forward pre-hook on the ControlNet that sets the scale to 0 outside the window (the
  pipeline calls the ControlNet exactly once per step, CFG batched into that call), which adds exact
  zeros to the transformer's blocks: the same as no ControlNet on those steps;
* `controlMode` other than `balanced` has no equivalent (no prompt/ControlNet priority switch): refused;
* with `inputs.seedImage` it is refused: diffusers' ControlNet inpaint pipeline ignores `strength` and
  needs a 2.0 (33-channel) ControlNet, and there is no ControlNet image-to-image pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.local.refusals import issue
from airflow_provider_zimage.local.weights import weights_id

__all__ = ["ControlNetPlan", "PendingControlNet", "controlnet_pipeline", "pending_controlnets", "step_window"]

log = logging.getLogger(__name__)

DEFAULT_WEIGHT = 1.0  # Runware's default controlNet weight
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_MAP_HINT = (
    "map this AIR id to a diffusers ControlNet folder with controlnet_paths={...} (in-process) or "
    "--controlnet AIR=FOLDER (executor)"
)


@dataclass(frozen=True)
class PendingControlNet:
    """A checked `controlNet[]` entry before its guide image is decoded and the steps are known."""

    parameter: str
    air: str
    source: str
    weight: float
    guide_ref: str = field(repr=False)
    entry: Any = field(repr=False, compare=False)

    def resolve(self, guide_image: Image.Image, steps: int) -> ControlNetPlan:
        start, end = step_range(self.entry, steps)
        return ControlNetPlan(self.parameter, self.air, self.source, self.weight, start, end, guide_image)


@dataclass(frozen=True, eq=False)
class ControlNetPlan:
    """:param start_step: / :param end_step: active on 0-based steps start <= i < end."""

    parameter: str
    air: str
    source: str
    weight: float
    start_step: int
    end_step: int
    guide_image: Image.Image = field(repr=False)


def pending_controlnets(
    entries: Sequence[Any],
    controlnet_paths: Mapping[str, str],
    *,
    has_seed_image: bool,
    issues: list[dict[str, Any]],
) -> PendingControlNet | None:
    """The one ControlNet a request may use, checked without reading a file; refusals go to `issues`."""
    if not entries:
        return None
    before = len(issues)
    if has_seed_image:
        issues.append(
            issue(
                "controlNet",
                "cannot be combined with inputs.seedImage on the local backends (diffusers has no Z-Image "
                "ControlNet image-to-image pipeline); use it for text-to-image",
                len(entries),
            )
        )
    if len(entries) > 1:
        issues.append(
            issue(
                "controlNet[1]",
                f"the local backends run at most 1 ControlNet per request (diffusers' Z-Image ControlNet "
                f"pipeline takes one); got {len(entries)}",
                getattr(entries[1], "model", None),
            )
        )
    entry = entries[0]
    name = str(entry.model)
    source = controlnet_paths.get(name)
    if source is None:
        issues.append(issue("controlNet[0].model", f"cannot be resolved locally: {_MAP_HINT}", name))
    elif not os.path.isfile(os.path.join(source, "config.json")):
        issues.append(
            issue(
                "controlNet[0].model",
                "is mapped to a ControlNet folder that does not exist or has no config.json "
                "(a folder written by ZImageControlNetModel.save_pretrained)",
                name,
            )
        )
    mode = getattr(entry, "control_mode", None)
    if mode not in (None, "balanced"):
        issues.append(
            issue(
                "controlNet[0].controlMode",
                "must be 'balanced' on the local backends: diffusers' Z-Image ControlNet has no "
                "prompt/ControlNet priority switch",
                mode,
            )
        )
    guide = str(entry.guide_image)
    if _UUID.match(guide.strip()):
        issues.append(
            issue(
                "controlNet[0].guideImage",
                "is a Runware image UUID, which only Runware can resolve; pass the image itself "
                "(base64, data URI, http(s) URL on an allowed origin, or file:// URI)",
                guide,
            )
        )
    if len(issues) > before or source is None:
        return None
    weight = float(entry.weight) if getattr(entry, "weight", None) is not None else DEFAULT_WEIGHT
    return PendingControlNet("controlNet[0]", name, os.path.abspath(source), weight, guide, entry)


def step_range(entry: Any, steps: int) -> tuple[int, int]:
    """Runware's window as 0-based steps [start, end): absolute steps as given, percentages of `steps`
    with the start rounded down and the end up (so a window never comes out empty)."""
    start = getattr(entry, "start_step", None)
    end = getattr(entry, "end_step", None)
    start_pct = getattr(entry, "start_step_percentage", None)
    end_pct = getattr(entry, "end_step_percentage", None)
    first = int(start) if start is not None else math.floor(steps * start_pct / 100) if start_pct else 0
    last = int(end) if end is not None else math.ceil(steps * end_pct / 100) if end_pct else steps
    first = min(first, steps - 1)
    return first, min(steps, max(last, first + 1))


# One ControlNet pipeline per base pipeline, dropped with it when the checkpoint is evicted.
_PIPELINES: weakref.WeakKeyDictionary[Any, tuple[str, Any]] = weakref.WeakKeyDictionary()


def controlnet_pipeline(base: Any, plan: ControlNetPlan, device: str, dtype: str) -> Any:
    """`ZImageControlNetPipeline` over `base`'s components and `plan`'s ControlNet (loaded once; the
    caller holds the device lock). Only the last ControlNet used stays loaded per checkpoint."""
    import diffusers
    import torch

    # Keyed by the weights, not the path: a folder swapped under a long-lived process is reloaded.
    key = weights_id(plan.source)
    cached = _PIPELINES.get(base)
    if cached is not None and cached[0] == key:
        return cached[1]
    # diffusers' classes are untyped; Any keeps mypy --strict from checking calls it cannot see into.
    model_class: Any = diffusers.ZImageControlNetModel
    pipeline_class: Any = diffusers.ZImageControlNetPipeline
    try:
        controlnet = model_class.from_pretrained(
            plan.source, dtype=getattr(torch, dtype), local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ZImageValidationError(
            f"{plan.parameter}.model: could not load ControlNet {plan.air!r}: {exc}",
            [issue(f"{plan.parameter}.model", f"could not be loaded: {exc}", plan.air)],
        ) from exc
    transformer_dim = base.transformer.config.get("dim")
    if controlnet.config.get("dim") != transformer_dim:
        message = (
            f"is a ControlNet for another model (hidden size {controlnet.config.get('dim')}, this "
            f"checkpoint's is {transformer_dim})"
        )
        raise ZImageValidationError(
            f"{plan.parameter}.model: {message}", [issue(f"{plan.parameter}.model", message, plan.air)]
        )
    controlnet.to(device)
    pipe = pipeline_class(controlnet=controlnet, **base.components)
    pipe.set_progress_bar_config(disable=True)
    _PIPELINES[base] = (key, pipe)
    log.info("Loaded ControlNet %s from %s", plan.air, plan.source)
    return pipe


@contextlib.contextmanager
def step_window(pipe: Any, plan: ControlNetPlan, steps: int) -> Iterator[None]:
    """Scale the ControlNet by `plan.weight` on steps inside its window and by 0 outside it."""
    if plan.start_step <= 0 and plan.end_step >= steps:
        yield
        return
    calls = 0

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        nonlocal calls
        active = plan.start_step <= calls < plan.end_step
        calls += 1
        return args, {**kwargs, "conditioning_scale": plan.weight if active else 0.0}

    handle = pipe.controlnet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
