"""`LocalZImageExecutor`: plan, denoise and encode Z-Image requests in this process with diffusers.

The in-process backend of the operator (`backend="local"`, for `dag.test()` and one-off use) and the
engine of the executor service (`airflow_provider_zimage.executor`), which keeps one of these per model
and device and feeds it batches. Every image is generated with its own `torch.Generator` seeded
`seed + i`, so any single result is reproducible from the seed recorded in it, whatever `numberResults`
was and whichever images it shared a pipeline call with.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.local import safety
from airflow_provider_zimage.local.caching import step_cache
from airflow_provider_zimage.local.controlnet import controlnet_pipeline, step_window
from airflow_provider_zimage.local.images import default_input_origins, default_input_roots, encode_image
from airflow_provider_zimage.local.pipelines import (
    PipelineCache,
    device_lock,
    import_runtime,
    normalise_dtype,
    resolve_device,
)
from airflow_provider_zimage.local.planning import PipelineKind, Plan, model_spec, plan_request
from airflow_provider_zimage.local.prompts import check_prompt_lengths, load_tokenizer
from airflow_provider_zimage.local.refusals import issue
from airflow_provider_zimage.local.regions import paste_back
from airflow_provider_zimage.local.results import GeneratedImage, LocalGenerationError
from airflow_provider_zimage.local.schedulers import adapt_scheduler
from airflow_provider_zimage.origins import ImageOrigin, parse_origins

if TYPE_CHECKING:
    import numpy as np

    from airflow_provider_zimage.runware.models import ImageInferenceRequest, ModelSpec

log = logging.getLogger(__name__)

__all__ = ["LocalZImageExecutor", "Unit"]

PROGRESS_LINES = 10
Unit = tuple[Plan, int]  # one image: the plan it belongs to and its seed


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
        The targets here are configuration and may be anywhere; a `file:` path in a request must be inside
        `lora_roots`.
    :param max_models_per_device: checkpoints kept per device; loading another evicts the oldest, because
        two Z-Image checkpoints (~20 GB each) do not fit most GPUs.
    :param from_pretrained_kwargs: passed to `from_pretrained` (revision, cache_dir, token...).
    :param input_roots: folders `seedImage`/`maskImage` file paths may point into; None reads
        `[zimage] local_input_roots` (default: the output path and the DAGs folder).
    :param lora_roots: folders `file:` LoRAs named by a request may be in; None: the `input_roots`. A
        path elsewhere is refused with the same words as a missing file, and never opened.
    :param input_origins: origins (`https://host`, `http://host:port`) `seedImage`/`maskImage` URLs may
        be fetched from, every redirect hop included; None reads `[zimage] local_input_origins`
        (default: none, so URL inputs are refused).
    :param controlnet_paths: ControlNet AIR ids (`controlNet[].model`) -> diffusers ControlNet folders
        (`ZImageControlNetModel.save_pretrained`); an id not here is refused before anything loads.
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
        input_roots: Sequence[str | os.PathLike[str]] | None = None,
        lora_roots: Sequence[str | os.PathLike[str]] | None = None,
        input_origins: Sequence[str] | None = None,
        controlnet_paths: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> None:
        self.model_path = os.fspath(model_path) if model_path is not None else None
        self.device = device or "auto"
        self.dtype = normalise_dtype(dtype or "auto", allow_fp16)
        self.cpu_offload = cpu_offload
        self.local_files_only = local_files_only
        self.lora_paths = dict(lora_paths or {})
        self.controlnet_paths = {air: os.fspath(path) for air, path in (controlnet_paths or {}).items()}
        self.max_models_per_device = max(1, max_models_per_device)
        self.from_pretrained_kwargs = dict(from_pretrained_kwargs or {})
        self._input_roots = None if input_roots is None else [os.fspath(r) for r in input_roots]
        self.lora_roots = None if lora_roots is None else [os.fspath(r) for r in lora_roots]
        self._input_origins = None if input_origins is None else parse_origins(input_origins, "input_origins")
        self._cache = PipelineCache(
            cpu_offload=cpu_offload,
            local_files_only=local_files_only,
            max_models_per_device=max_models_per_device,
            from_pretrained_kwargs=self.from_pretrained_kwargs,
        )
        self._resolved: tuple[str, str] | None = None

    # -- public API --------------------------------------------------------------------------------

    @property
    def input_roots(self) -> list[str]:
        if self._input_roots is None:
            self._input_roots = default_input_roots()
        return self._input_roots

    @property
    def input_origins(self) -> frozenset[ImageOrigin]:
        if self._input_origins is None:
            self._input_origins = default_input_origins()
        return self._input_origins

    def validate(self, request: ImageInferenceRequest) -> None:
        """Raise `ZImageValidationError` if this backend cannot honour `request` (loads nothing)."""
        self.plan(request)

    def plan(self, request: ImageInferenceRequest, *, delivery_supported: bool = False) -> Plan:
        """The validated plan of `request` (image inputs decoded); loads nothing."""
        return plan_request(
            request,
            lora_paths=self.lora_paths,
            input_roots=self.input_roots,
            lora_roots=self.lora_roots,
            input_origins=self.input_origins,
            delivery_supported=delivery_supported,
            controlnet_paths=self.controlnet_paths,
        )

    _plan = plan  # the name tests and benches used before the split

    def check_prompts(self, plan: Plan) -> None:
        """Refuse prompts the text encoder would cut (local/prompts.py); loads the tokenizer only."""
        import_runtime()  # a missing `[local]` extra is named before the tokenizer is looked for
        tokenizer = load_tokenizer(
            self.source(plan.spec),
            local_files_only=self.local_files_only,
            from_pretrained_kwargs=self.from_pretrained_kwargs,
        )
        check_prompt_lengths(tokenizer, plan)

    def generate(self, request: ImageInferenceRequest) -> list[GeneratedImage]:
        """Run `request` and return `numberResults` encoded images with Runware-shaped result items.

        One pipeline call per image, in seed order: the in-process backend has nothing to batch with.
        """
        plan = self.plan(request)
        self.check_prompts(plan)
        started = time.perf_counter()
        images = []
        for seed in plan.seeds:
            images += self.generate_batch([(plan, seed)])
        if getattr(request, "include_cost", None):
            # As Runware's answers (and the executor's): `cost` only when includeCost asked for it.
            for image in images:
                image.result["cost"] = 0.0
        log.info(
            "Generated %d image(s) %dx%d in %.2fs (task %s)",
            len(images),
            plan.width,
            plan.height,
            time.perf_counter() - started,
            plan.task_uuid,
        )
        return images

    def generate_batch(self, units: Sequence[Unit]) -> list[GeneratedImage]:
        """Denoise `units` (plans sharing one `batch_key`, or a single unit) in ONE pipeline call.

        Each image gets its own generator, so its bytes depend on its seed alone.
        """
        plan = units[0][0]
        torch = import_runtime()
        device, dtype = self._resolve(torch)
        started = time.perf_counter()
        with device_lock(device):
            waited = time.perf_counter() - started
            if waited > 1.0:
                log.info("Waited %.1fs for %s (another caller of this process was using it)", waited, device)
            pipe = self._cache.pipeline(self.source(plan.spec), plan.kind, device, dtype)
            if plan.controlnet is not None:
                pipe = controlnet_pipeline(pipe, plan.controlnet, device, dtype)
            arrays = self._run(pipe, units, device, dtype)
        # outpaint / maskMargin: the source pixels go back where the mask is 0 (a region runs alone).
        if plan.region is not None:
            arrays = [paste_back(plan.region, array) for array in arrays]
        # Checking and encoding need no GPU: done outside the lock so the next call can start denoising.
        checked = [a for (p, _), a in zip(units, arrays, strict=True) if p.check_content]
        verdicts = iter(safety.classify(checked) if checked else [])
        return [
            self._encode(p, seed, array, next(verdicts) if p.check_content else None)
            for (p, seed), array in zip(units, arrays, strict=True)
        ]

    def pipeline(self, model: str = "runware:z-image@turbo", kind: PipelineKind = "text-to-image") -> Any:
        """The cached pipeline this executor would use (loaded if needed): warm-up, benchmarks, tests."""
        spec = model_spec(model)
        torch = import_runtime()
        device, dtype = self._resolve(torch)
        with device_lock(device):
            return self._cache.pipeline(self.source(spec), kind, device, dtype)

    @property
    def resolved_device(self) -> str:
        """The concrete device ("cuda:0", "mps", "cpu") after resolving "auto"."""
        return self._resolve(import_runtime())[0]

    @property
    def resolved_dtype(self) -> str:
        return self._resolve(import_runtime())[1]

    def source(self, spec: ModelSpec) -> str:
        """Where the weights of `spec` come from: the configured path, else the catalog's HF repo."""
        return self.model_path or str(spec.hf_repo)

    # -- running -----------------------------------------------------------------------------------

    def _resolve(self, torch: Any) -> tuple[str, str]:
        if self._resolved is None:
            device = resolve_device(torch, self.device)
            dtype = self.dtype
            if dtype == "auto":
                dtype = "float32" if device == "cpu" else "bfloat16"
            self._resolved = (device, dtype)
        return self._resolved

    def _run(self, pipe: Any, units: Sequence[Unit], device: str, dtype: str) -> list[np.ndarray]:
        import numpy as np
        import torch

        plan = units[0][0]
        seeds = [seed for _, seed in units]
        base_scheduler = pipe.scheduler
        generator_device = "cpu" if device in ("cpu", "mps") else device  # MPS generators are unreliable
        cuda = device.startswith("cuda")
        log.info(
            "%s: %d image(s) %dx%d in one call, %d steps, guidance %g, scheduler %s, %d LoRA(s), %s %s",
            plan.kind,
            len(units),
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
        try:
            generators = [torch.Generator(generator_device).manual_seed(seed) for seed in seeds]
            pipe.scheduler = adapt_scheduler(plan.scheduler, base_scheduler.config, generators[0])
            kwargs = plan.pipeline_kwargs()
            if len(units) > 1:
                kwargs["prompt"] = [p.prompt for p, _ in units]
                if plan.negative_prompt is not None:
                    kwargs["negative_prompt"] = [plan.negative_prompt] * len(units)
                label = f"batch of {len(units)} (seeds {', '.join(map(str, seeds))})"
            else:
                label = f"image (seed {seeds[0]}, task {plan.task_uuid})"
            started = time.perf_counter()
            with contextlib.ExitStack() as stack:
                if plan.controlnet is not None:
                    stack.enter_context(step_window(pipe, plan.controlnet, plan.steps))
                # Off again afterwards: the pipeline is shared with the next request.
                stack.enter_context(step_cache(pipe, plan.step_cache))
                output = pipe(
                    **kwargs,
                    generator=generators if len(units) > 1 else generators[0],
                    output_type="np",
                    callback_on_step_end=_progress(label, started),
                )
            images = np.asarray(output.images)
            log.info("%s done in %.2fs", label, time.perf_counter() - started)
            arrays = []
            for (unit_plan, seed), array in zip(units, images, strict=True):
                nan = bool(np.isnan(array).any())
                if nan or not array.any():
                    raise LocalGenerationError(
                        f"image of seed {seed} (task {unit_plan.task_uuid}) came out "
                        f"{'NaN' if nan else 'all black'} with dtype {dtype} on {device}. "
                        "Z-Image overflows in float16: use bfloat16 on GPUs (dtype='auto') or float32 on CPU."
                    )
                arrays.append(array)
        finally:
            pipe.scheduler = base_scheduler
            if adapters:
                # The pipeline is shared by the next caller of this process: leave no adapter behind.
                pipe.unload_lora_weights()
            if cuda:
                log.info("Peak GPU memory: %.2f GiB", torch.cuda.max_memory_allocated(device) / 2**30)
        return arrays

    def _apply_loras(self, pipe: Any, plan: Plan) -> list[str]:
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
                        [issue(lora.parameter, f"could not be loaded: {exc}", lora.source)],
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
    def _encode(plan: Plan, seed: int, array: np.ndarray, nsfw: bool | None) -> GeneratedImage:
        data = encode_image(array, plan.output_format, plan.output_quality)
        result: dict[str, Any] = {
            "taskType": "imageInference",
            "taskUUID": plan.task_uuid,
            "imageUUID": str(uuid.uuid4()),
            "seed": seed,
            "status": "success",
        }
        if nsfw is not None:  # only what the classifier said: never a `false` nobody computed
            result["NSFWContent"] = nsfw
        return GeneratedImage(result=result, data=data, format=plan.output_format)


def _progress(label: str, started: float) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A `callback_on_step_end` logging about `PROGRESS_LINES` lines per call, however many steps."""

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or 0) or step + 1
        every = max(1, math.ceil(total / PROGRESS_LINES))
        done = step + 1
        if done % every == 0 or done == total:
            log.info("%s: step %d/%d (%.2fs)", label, done, total, time.perf_counter() - started)
        return tensors

    return callback
