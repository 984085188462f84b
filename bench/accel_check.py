"""Step caching and ControlNet on the local backend: seconds per image, steps computed, PSNR, side by side.

Runs through the request path (`LocalZImageExecutor.generate` with `acceleratorOptions` / `controlNet`),
so it measures what a DAG gets, not what cache-dit can do on its own. In one run, on one model:

* cache off vs on (`acceleratorOptions: {"fbCache": true}`) at 1024x1024, 8 steps: seconds per image,
  transformer steps computed (counted at the last transformer block: a cached step skips it) and the PSNR
  of the cached image against the uncached one (same seed); then cache off again, which must give the
  uncached bytes (the cache is switched off after the call that asked for it);
* ControlNet off vs on (one random-weight ControlNet, shaped like the Fun ControlNet Union): seconds
  per image and the ratio.

A backend that refuses `acceleratorOptions` or `controlNet` (an older provider, or the optional extra
missing) gets a "not built yet" line for that part, and the rest still runs.

    bash bench/gpu_check.sh            # runs this after gpu_check.py: real size, random bf16 weights, GPU
    python bench/accel_check.py --tiny # the tiny model on the CPU, 128x128
    python bench/accel_check.py --smoke  # --tiny, one timed run each (make bench-smoke)
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TURBO = "runware:z-image@turbo"
CONTROLNET_AIR = "bench:controlnet@1"
# Runware's default threshold (0.25), and a low one (Runware: lower reuses more aggressively).
CACHES = {"default": {"fbCache": True}, "aggressive": {"fbCache": True, "fbCacheThreshold": 0.05}}


def psnr(a: bytes, b: bytes) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def refusal(executor: Any, request: Any, parameter: str) -> str | None:
    """Why the backend refuses `parameter` in `request` (None: it takes it)."""
    from airflow_provider_zimage.exceptions import ZImageValidationError

    try:
        executor.validate(request)
    except ZImageValidationError as exc:
        named = [e for e in exc.errors if str(e.get("parameter", "")).startswith(parameter)]
        if named:
            return "; ".join(f"{e['parameter']}: {e['message']}" for e in named)
        raise
    return None


def timed(run: Callable[[], Any], runs: int) -> tuple[float, Any]:
    """Median seconds of `runs` calls and the last call's result."""
    seconds, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def build_controlnet(model: Path, target: Path) -> Path:
    """A random-weight ControlNet for `model` (the test kit's builder when it has one): one control
    layer, so on the real model the figure is a floor (the Fun ControlNet Union has more)."""
    from airflow_provider_zimage.testing import tiny_model

    builder = getattr(tiny_model, "build_tiny_controlnet", None)
    if builder is not None:
        return Path(builder(model, target))
    raise RuntimeError("no ControlNet builder in this provider (testing.tiny_model.build_tiny_controlnet)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--smoke", action="store_true", help="--tiny, one timed run (make bench-smoke)")
    parser.add_argument("--runs", type=int, default=3, help="timed images per configuration")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "zimage-gpu-check"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny, args.runs = True, 1

    from PIL import Image

    from airflow_provider_zimage.local.inprocess import LocalZImageExecutor
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

    work = Path(args.work_dir)
    if args.tiny:
        import torch

        from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

        torch.set_num_threads(1)  # toy tensors: more threads only fight the other jobs on a CI box

        model, size, device, dtype = build_tiny_zimage(work / "tiny"), 128, "cpu", "float32"
    else:
        from gpu_check import build_real

        model, size, device, dtype = build_real(work / "turbo-random-bf16"), 1024, "cuda:0", "bfloat16"
    steps = 4 if args.smoke else 8  # the smoke checks the path, not the figures
    guide = io.BytesIO()
    Image.new("RGB", (size, size), (20, 20, 20)).save(guide, format="PNG")
    guide_uri = "data:image/png;base64," + base64.b64encode(guide.getvalue()).decode()

    def request(**extra: Any) -> ImageInferenceRequest:
        return ImageInferenceRequest.build(
            model=TURBO,
            positivePrompt="a lighthouse at dusk",
            width=size,
            height=size,
            steps=steps,
            seed=11,
            outputFormat="PNG",
            **extra,
        )

    report: dict[str, Any] = {"mode": "tiny" if args.tiny else "real", "size": size, "steps": steps}
    controlnet_dir: Path | None = None
    try:
        controlnet_dir = build_controlnet(model, work / "controlnet-random")
    except Exception as exc:  # an older provider, or a diffusers without ZImageControlNetModel
        report["controlnet_not_built"] = str(exc)
    try:
        executor = LocalZImageExecutor(
            model,
            device=device,
            dtype=dtype,
            controlnet_paths={CONTROLNET_AIR: str(controlnet_dir)} if controlnet_dir else {},
        )
    except TypeError:  # a provider without controlnet_paths
        executor = LocalZImageExecutor(model, device=device, dtype=dtype)
        report["controlnet_not_built"] = "LocalZImageExecutor takes no controlnet_paths"

    def generate(req: ImageInferenceRequest) -> bytes:
        [image] = executor.generate(req)
        return bytes(image.data)

    plain = request()
    generate(plain)  # warm-up: load, allocate, autotune
    pipe = executor.pipeline(TURBO, "text-to-image")
    computed = [0]
    pipe.transformer.layers[-1].register_forward_hook(lambda *_: computed.__setitem__(0, computed[0] + 1))

    def counted(req: ImageInferenceRequest) -> tuple[bytes, float]:
        computed[0] = 0
        data = generate(req)
        return data, float(computed[0])

    print(f"{size}x{size}, {steps} steps on {device} ({dtype}), in-process, through the request path:")
    off_seconds, _ = timed(lambda: generate(plain), args.runs)
    off_bytes, off_steps = counted(plain)
    report.update(cache_off_seconds_per_image=round(off_seconds, 3), cache_off_steps_computed=off_steps)
    print(f"  cache off: {off_seconds:.3f} s/image, {off_steps:.0f} steps computed")

    why = refusal(executor, request(acceleratorOptions=CACHES["default"]), "acceleratorOptions")
    if why is not None:
        report["cache"] = f"not built yet: the backend refuses it ({why})"
        print(f"  cache on: not built yet (the local backend refuses acceleratorOptions: {why})")
    for name, options in CACHES.items() if why is None else ():
        cached = request(acceleratorOptions=options)
        on_seconds, _ = timed(functools.partial(generate, cached), args.runs)
        on_bytes, on_steps = counted(cached)
        again, _ = counted(plain)
        quality = psnr(off_bytes, on_bytes)
        report[f"cache_{name}"] = {
            "acceleratorOptions": options,
            "seconds_per_image": round(on_seconds, 3),
            "steps_computed": on_steps,
            "psnr_db": round(quality, 2) if math.isfinite(quality) else "identical",
            "speedup": round(off_seconds / on_seconds, 2),
            "cache_off_again_identical": again == off_bytes,
        }
        print(
            f"  cache on, {name} ({json.dumps(options)}): {on_seconds:.3f} s/image, {on_steps:.0f} steps "
            f"computed, PSNR {quality:.2f} dB against cache off, {off_seconds / on_seconds:.2f}x"
        )
        if again != off_bytes:
            raise SystemExit("cache off after cache on gave different bytes: the cache was left switched on")
    if args.smoke and why is None and report["cache_aggressive"]["steps_computed"] >= off_steps:
        raise SystemExit("the aggressive cache computed every step: acceleratorOptions reached no cache")

    with_controlnet = request(controlNet=[{"model": CONTROLNET_AIR, "guideImage": guide_uri, "weight": 0.8}])
    why = report.get("controlnet_not_built") or refusal(executor, with_controlnet, "controlNet")
    if why:
        report["controlnet"] = f"not built yet: {why}"
        print(f"  ControlNet: not built yet ({why})")
    else:
        generate(with_controlnet)  # warm-up: the ControlNet pipeline and weights load here
        cn_seconds, cn_bytes = timed(lambda: generate(with_controlnet), args.runs)
        report.update(
            controlnet_seconds_per_image=round(cn_seconds, 3),
            controlnet_slowdown=round(cn_seconds / off_seconds, 2),
            controlnet_changes_image=cn_bytes != off_bytes,
        )
        print(
            f"  ControlNet on (random weights, one control layer): {cn_seconds:.3f} s/image, "
            f"{cn_seconds / off_seconds:.2f}x the plain image"
        )
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
