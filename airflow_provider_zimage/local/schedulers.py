"""Runware scheduler names -> diffusers schedulers that can drive Z-Image, a flow-matching model.

Separate from planning because planning only needs the names (no torch), while `adapt_scheduler` builds
the scheduler for one pipeline call and imports diffusers lazily.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DEFAULT_SCHEDULER",
    "SCHEDULER_MAP",
    "SUPPORTED_SCHEDULERS",
    "SchedulerChoice",
    "adapt_scheduler",
    "lookup_scheduler",
]


@dataclass(frozen=True)
class SchedulerChoice:
    """How one Runware scheduler name runs on Z-Image.

    Z-Image is a flow-matching model and its pipelines call `set_timesteps(sigmas=..., mu=...)` and, for
    image-to-image and inpainting, `scale_noise(...)`. Only FlowMatch* schedulers speak that natively;
    UniPC and DPM-Solver++ have a flow-matching mode (`prediction_type="flow_prediction"`,
    `use_flow_sigmas=True`) and get thin adapters (see `adapt_scheduler`). Every entry here was run on the
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
DEFAULT_SCHEDULER = _EULER


def lookup_scheduler(name: str) -> SchedulerChoice | None:
    """The choice for a Runware scheduler name, case-insensitively; None when there is no equivalent."""
    return _SCHEDULER_LOOKUP.get(name.casefold())


def adapt_scheduler(choice: SchedulerChoice, base_config: Mapping[str, Any], generator: Any) -> Any:
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
