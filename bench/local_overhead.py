"""What the local executor adds on top of a bare diffusers call, measured on the tiny offline checkpoint.

The tiny model makes a denoising call take ~0.1 s on a CPU, so any fixed cost of the executor (request
planning, a fresh scheduler per image, the progress callback, the NaN check, the device lock) shows up
here far larger than it would next to the seconds a real GPU image takes: an upper bound on the overhead.

Reported:
  * warm `generate()` vs a bare `pipe(...)` with the same arguments (same cached pipeline, same seed),
    interleaved so load changes on a shared machine hit both alike; medians and their ratio;
  * the image encoding (PNG/JPEG/WEBP) that `generate()` also does, timed alone, and the ratio without it;
  * cold (first call of the process: load + first run) vs warm task time.

    python bench/local_overhead.py [--runs 40] [--size 128] [--steps 2] [--format PNG] [--threads 1]
    python bench/local_overhead.py --smoke   # 3 runs, 1 warm-up (make bench-smoke)

The provider's own INFO lines (one per denoising step and several per image, as a task log wants them)
are turned down to warnings here, in this process only: at 2 steps they were most of the output.
Exits non-zero when `generate()` does not give the bare call's bytes.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--size", type=int, default=128, help="smallest size the request model accepts")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--format", default="PNG", choices=["PNG", "JPG", "WEBP"])
    # One thread by default: with torch's choice (one per core) on a shared 2-core machine, OpenMP
    # threads spin waiting for each other, and the default run went from 19 s to over 4.5 minutes.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each path first")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "zimage-tiny-bench"))
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (make bench-smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.warmup = 3, 1

    started = time.perf_counter()
    import numpy as np
    import torch

    from airflow_provider_zimage import local
    from airflow_provider_zimage.runware.models import ImageInferenceRequest
    from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

    import_s = time.perf_counter() - started
    # After the imports: Airflow's logging setup, which they run, would otherwise reset the level.
    logging.getLogger("airflow_provider_zimage").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = build_tiny_zimage(args.model_dir)

    def request(seed: int) -> ImageInferenceRequest:
        return ImageInferenceRequest.build(
            model="runware:z-image@turbo",
            positivePrompt="a lighthouse on a cliff at dusk",
            width=args.size,
            height=args.size,
            steps=args.steps,
            seed=seed,
            outputFormat=args.format,
        )

    executor = local.LocalZImageExecutor(model_dir, local_files_only=True)

    # Cold: the first task of a worker process pays the load.
    local.clear_pipeline_cache()
    t0 = time.perf_counter()
    executor.generate(request(1))
    cold = time.perf_counter() - t0

    pipe = executor.pipeline()
    bare_kwargs = {
        "prompt": "a lighthouse on a cliff at dusk",
        "negative_prompt": None,
        "height": args.size,
        "width": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": 0.0,
        "output_type": "np",
    }

    def bare(seed: int) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(**bare_kwargs, generator=generator).images[0]

    # Same image both ways: the executor must not change the numerics.
    same = executor.generate(request(7))[0].data == local.encode_image(bare(7), args.format, 95)

    for seed in range(args.warmup):  # warm-up both paths
        bare(seed)
        executor.generate(request(seed))

    bare_s, exec_s, encode_s, plan_s = [], [], [], []
    for i in range(args.runs):
        seed = 100 + i
        req = request(seed)
        # Alternate which path goes first so neither always runs right after the other's allocations.
        order = ("bare", "exec") if i % 2 == 0 else ("exec", "bare")
        for which in order:
            t = time.perf_counter()
            if which == "bare":
                array = bare(seed)
                bare_s.append(time.perf_counter() - t)
            else:
                executor.generate(req)
                exec_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        local.encode_image(array, args.format, 95)
        encode_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        executor.validate(req)
        plan_s.append(time.perf_counter() - t)

    med = statistics.median
    bare_m, exec_m, enc_m = med(bare_s), med(exec_s), med(encode_s)
    print(
        f"tiny Z-Image, {args.size}x{args.size}, {args.steps} steps, {args.format}, {args.runs} runs, "
        f"torch threads={torch.get_num_threads()}"
    )
    print(f"  import torch/diffusers/provider : {import_s:8.3f} s")
    print(f"  cold task (load + first image)  : {cold:8.3f} s")
    print(f"  warm task (generate, median)    : {exec_m:8.4f} s")
    print(f"  bare pipeline call (median)     : {bare_m:8.4f} s")
    print(f"  image encode alone (median)     : {enc_m:8.4f} s")
    print(f"  request planning alone (median) : {med(plan_s) * 1000:8.3f} ms")
    print(f"  ratio generate / bare           : {exec_m / bare_m:8.3f}")
    print(f"  ratio excluding encode          : {(exec_m - enc_m) / bare_m:8.3f}   (target < 1.05)")
    print(f"  cold / warm                     : {cold / exec_m:8.1f}x")
    print(f"  same bytes as bare call + encode: {same}")
    if not same:
        raise SystemExit("generate() and the bare pipeline call gave different images for the same seed")


if __name__ == "__main__":
    main()
