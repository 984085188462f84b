"""The executor on this machine's GPU: seconds per 1024x1024 Z-Image-Turbo image at 8 steps, batch 1 and 4.

Speed does not depend on weight values, so this writes the published Z-Image-Turbo architecture with
random bf16 weights (built on the GPU by `gpu_latency.real_components`, ~20 GB on disk), starts
`zimage-executor` on it, and times real requests through the provider's hook: batch 1 (sync requests one
after the other) and batch 4 (four requests in one POST, denoised in one pipeline call). Prints seconds
per image, images per minute and the executor's peak GPU memory (from its /metrics).

    bash bench/gpu_check.sh            # real size, one NVIDIA GPU with ~40 GB free, < 8 minutes
    bash bench/gpu_check.sh --tiny     # the tiny model on the CPU, 128x128, 2 steps (CI)
    bash bench/gpu_check.sh --smoke    # --tiny with one timed run; exits non-zero unless batch 4 batched
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TURBO = "runware:z-image@turbo"


def build_real(path: Path) -> Path:
    if (path / "model_index.json").exists():
        return path
    import torch
    from diffusers import ZImagePipeline
    from gpu_latency import real_components

    started = time.perf_counter()
    pipe = ZImagePipeline(**real_components("cuda", torch.bfloat16))
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe
    torch.cuda.empty_cache()
    print(f"wrote random-weight Z-Image-Turbo to {path} in {time.perf_counter() - started:.0f}s", flush=True)
    return path


def peak_memory(metrics: str) -> float:
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("zimage_executor_peak_gpu_memory_bytes{")
    ]
    return max(values, default=0.0) / 2**30


def pipeline_calls(metrics: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("zimage_executor_pipeline_calls_total{")
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (CI smoke test)")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "zimage-gpu-check"))
    parser.add_argument("--runs", type=int, default=3, help="timed batch-1 requests")
    parser.add_argument("--smoke", action="store_true", help="--tiny, 1 run (make bench-smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny, args.runs = True, 1

    from airflow_provider_zimage.executor.process import ExecutorProcess
    from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

    work = Path(args.work_dir)
    if args.tiny:
        from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

        model, size, steps, devices, dtype = build_tiny_zimage(work / "tiny"), 128, 2, "cpu", "float32"
    else:
        model, size, steps, devices, dtype = (
            build_real(work / "turbo-random-bf16"),
            1024,
            8,
            "cuda:0",
            "bfloat16",
        )

    def request(seed: int) -> ImageInferenceRequest:
        return ImageInferenceRequest.build(
            model=TURBO,
            positivePrompt="a lighthouse at dusk",
            width=size,
            height=size,
            steps=steps,
            seed=seed,
        )

    started = time.perf_counter()
    with ExecutorProcess(
        {TURBO: str(model)},
        work / "executor",
        *("--devices", devices, "--dtype", dtype, "--max-batch", "4"),
        *("--fetch-grace", "0"),  # timed results are not all downloaded: exit without waiting for them
    ) as process:
        print(f"executor up in {time.perf_counter() - started:.0f}s at {process.url}", flush=True)
        settings = ConnectionSettings(base_url=process.url, api_key=process.token, timeout=600)
        hook = ZImageHook("gpu_check", settings=settings)
        hook.infer([request(0)])  # warm-up: first call allocates and autotunes
        single = []
        for seed in range(1, args.runs + 1):
            t0 = time.perf_counter()
            [result] = hook.infer([request(seed)])
            single.append(time.perf_counter() - t0)
            assert hook.download(result)
        batch = [request(100 + i) for i in range(4)]
        calls_before = pipeline_calls(process.metrics())
        t0 = time.perf_counter()
        hook.submit(batch)
        for r in batch:
            hook.wait_for_task(r.task_uuid, 1, timeout=600, poll_interval=0.05, max_poll_interval=0.2)
        batch_wall = time.perf_counter() - t0
        metrics = process.metrics()
        batched = pipeline_calls(metrics) - calls_before == 1
    per_image_1 = statistics.median(single)
    per_image_4 = batch_wall / 4
    report = {
        "mode": "tiny" if args.tiny else "real",
        "size": size,
        "steps": steps,
        "seconds_per_image_batch1": round(per_image_1, 3),
        "seconds_per_image_batch4": round(per_image_4, 3),
        "images_per_minute_batch1": round(60 / per_image_1, 1),
        "images_per_minute_batch4": round(60 / per_image_4, 1),
        "peak_gpu_memory_gib": round(peak_memory(metrics), 2),
        "batched": batched,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"{size}x{size}, {steps} steps on {devices} ({dtype}), through the executor and the provider's hook:"
    )
    print(f"  batch 1: {per_image_1:.3f} s/image, {60 / per_image_1:.1f} images/min (median of {args.runs})")
    how = "one pipeline call" if batched else "NOT batched"
    print(f"  batch 4: {per_image_4:.3f} s/image, {60 / per_image_4:.1f} images/min ({how})")
    print(
        f"  peak GPU memory: {report['peak_gpu_memory_gib']:.2f} GiB"
        + ("" if not args.tiny else " (CPU run)")
    )
    print(json.dumps(report))
    if args.smoke and not batched:
        raise SystemExit("the batch of 4 took more than one pipeline call: the executor stopped batching")
    return report


if __name__ == "__main__":
    main()
