"""Pipeline cache and loading: diffusers Z-Image pipelines, loaded once per process and device.

* Pipelines are cached per process, keyed by (source, device, dtype, offload), so every request of one
  process (the mapped tasks of a worker, or every request an executor service takes) uses one copy of the
  weights. Image-to-image and inpainting pipelines are built from the text-to-image pipeline's
  components: same weights, no second load. (`from_pipe` is avoided on purpose: it casts the shared
  modules to float32 unless told otherwise.)
* One lock per device: two callers of one process never denoise on the same GPU at once (that would
  double peak memory and OOM on the GPUs this is meant for). Loading happens under the same lock.
* Progress bars are off everywhere (loading and denoising): tqdm writes to stderr, which Airflow shows as
  red ERROR lines in a successful task's log; callers log their own per-step lines instead.
* torch and diffusers are imported lazily: the provider installs and imports without the `[local]` extra.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_zimage.exceptions import ZImageError
from airflow_provider_zimage.local.results import LocalBackendUnavailable

if TYPE_CHECKING:
    from airflow_provider_zimage.local.planning import PipelineKind

log = logging.getLogger(__name__)

__all__ = [
    "PipelineCache",
    "cached_pipelines",
    "clear_pipeline_cache",
    "device_lock",
    "import_runtime",
    "load_count",
    "normalise_dtype",
    "resolve_device",
]

PIPELINE_CLASSES: dict[str, str] = {
    "text-to-image": "ZImagePipeline",
    "image-to-image": "ZImageImg2ImgPipeline",
    "inpainting": "ZImageInpaintPipeline",
}
INSTALL_HINT = "pip install 'airflow-provider-zimage[local]'"


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
    """How many times this process called `from_pretrained` (tests and /health assert the cache works)."""
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


def device_lock(device: str) -> threading.Lock:
    with _STATE_LOCK:
        return _DEVICE_LOCKS.setdefault(device, threading.Lock())


class PipelineCache:
    """Loads and caches the pipelines of one source; the caller holds `device_lock(device)`."""

    def __init__(
        self,
        *,
        cpu_offload: bool,
        local_files_only: bool,
        max_models_per_device: int,
        from_pretrained_kwargs: Mapping[str, Any],
    ) -> None:
        self.cpu_offload = cpu_offload
        self.local_files_only = local_files_only
        self.max_models_per_device = max(1, max_models_per_device)
        self.from_pretrained_kwargs = dict(from_pretrained_kwargs)

    def pipeline(self, source: str, kind: PipelineKind, device: str, dtype: str) -> Any:
        """The cached pipeline of `kind`, loading the checkpoint first if this process has not."""
        offload = self.cpu_offload and device != "cpu"
        key = (source, device, dtype, offload)
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
            pipe = getattr(diffusers, PIPELINE_CLASSES[kind])(**base.components)
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
        quiet_progress_bars()
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
        pipe.set_progress_bar_config(disable=True)  # per-step progress is logged by the caller instead
        log.info("Loaded Z-Image in %.1fs", time.perf_counter() - started)
        return _Loaded(
            {"text-to-image": pipe},
            base_scheduler=pipe.scheduler,
            offload_owner="text-to-image" if offload else None,
        )


def quiet_progress_bars() -> None:
    """No tqdm bars from diffusers, transformers or the hub while loading (they print to stderr)."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a dependency of diffusers' Z-Image pipelines
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars  # type: ignore[attr-defined]

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def normalise_dtype(dtype: str, allow_fp16: bool) -> str:
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


def resolve_device(torch: Any, requested: str) -> str:
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


def import_runtime() -> Any:
    """torch, after checking the `[local]` extra is installed and recent enough."""
    try:
        import diffusers
        import torch
    except ImportError as exc:
        raise LocalBackendUnavailable(
            f"The local Z-Image backend needs torch and diffusers ({exc.name} is missing): {INSTALL_HINT}"
        ) from exc
    if not all(hasattr(diffusers, name) for name in PIPELINE_CLASSES.values()):
        raise LocalBackendUnavailable(
            f"diffusers {diffusers.__version__} has no Z-Image pipelines (needs >= 0.42): {INSTALL_HINT}"
        )
    return torch
