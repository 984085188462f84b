"""In-process local backend vs the zimage-executor, N tasks, same model, same machine, one run.

Airflow 3 runs every task instance in a new process, so each task here is a fresh Python process
(`python -c ...`), as a LocalExecutor worker would start it; `--parallel` of them run at once (a pool's
slots). (a) in-process: each task imports torch, loads the checkpoint and makes its image. (b) executor:
one `zimage-executor` loaded the checkpoint once; each task submits through `ZImageHook` (the same
call the operator makes), polls and downloads, as with Runware. This is not the e2e Airflow deployment
(no scheduler or triggerer in the loop): it measures what the backend choice changes per task.

Printed: model loads (N vs 1), wall time, and wall / (N x bare pipeline call + one load), with the bare
call and the load timed in this process. Then the executor's own throughput with batching on
(`--max-batch`, default 4) vs `--max-batch 1`: N requests at once, images per second.

    python bench/executor_throughput.py [--tasks 20] [--parallel 2] [--size 128] [--steps 2]
                                        [--model-scale 1] [--max-batch 4]

`--model-scale S` builds a larger random checkpoint (transformer width 32*S, more layers) so that loading
takes a realistic share of a task on a CPU (S=24: ~110 MB, S=32: ~400 MB of float32 weights).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TURBO = "runware:z-image@turbo"

IN_PROCESS_TASK = """
import sys, json
from airflow_provider_zimage.local import LocalZImageExecutor, load_count
from airflow_provider_zimage.models import ImageInferenceRequest
req = ImageInferenceRequest.build(**json.loads(sys.argv[1]))
LocalZImageExecutor(sys.argv[2], local_files_only=True, device="cpu").generate(req)
print(load_count())
"""

EXECUTOR_TASK = """
import sys, json
from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
from airflow_provider_zimage.models import ImageInferenceRequest
req = ImageInferenceRequest.build(**json.loads(sys.argv[1]))
hook = ZImageHook("bench", settings=ConnectionSettings(base_url=sys.argv[2], api_key=sys.argv[3]))
hook.submit([req])
status = hook.wait_for_task(req.task_uuid, 1, poll_interval=0.05, max_poll_interval=0.2)
assert len(hook.download(status.results[0])) > 0
print(0)
"""


def build_model(path: Path, scale: int) -> Path:
    from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

    if scale <= 1:
        return build_tiny_zimage(path)
    if (path / ".scaled").exists():
        return path
    import torch
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    from airflow_provider_zimage.testing import tiny_model

    config = dict(tiny_model.TINY_TRANSFORMER_CONFIG)
    config.update(dim=32 * scale, n_layers=8, axes_dims=[8 * scale, 4 * scale, 4 * scale])
    components = tiny_model.tiny_components()
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**config)
    with torch.no_grad():
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    components["transformer"] = transformer.eval()
    ZImagePipeline(**components).save_pretrained(path, safe_serialization=True)
    (path / ".scaled").write_text(str(scale))
    return path


def wire(args: argparse.Namespace, index: int) -> dict:
    return {
        "model": TURBO,
        "positivePrompt": f"bench image number {index}, a lighthouse at dusk",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "seed": index,
        "outputFormat": "PNG",
        "taskUUID": str(uuid.uuid4()),
    }


def run_tasks(
    args: argparse.Namespace, code: str, extra: list[str], env: dict[str, str]
) -> tuple[float, list[int]]:
    def one(index: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(wire(args, index)), *extra],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            raise SystemExit(f"task {index} failed:\n{out.stderr[-3000:]}")
        return int(out.stdout.strip().splitlines()[-1])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        loads = list(pool.map(one, range(args.tasks)))
    return time.perf_counter() - started, loads


def bare_timings(model: Path, args: argparse.Namespace) -> tuple[float, float]:
    """One cold load and the median warm bare pipeline call, in this process, one thread."""
    import torch
    from diffusers import ZImagePipeline

    torch.set_num_threads(1)
    started = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - started
    calls = []
    for seed in range(6):
        started = time.perf_counter()
        pipe(
            prompt="a lighthouse at dusk",
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        calls.append(time.perf_counter() - started)
    return load, statistics.median(calls[1:])


def batching(model: Path, args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[int, float]:
    """Images per second of the executor alone: N requests submitted at once, batched or not."""
    from airflow_provider_zimage.executor.process import ExecutorProcess
    from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
    from airflow_provider_zimage.models import ImageInferenceRequest

    rates = {}
    for max_batch in sorted({args.max_batch, 1}, reverse=True):
        with ExecutorProcess(
            {TURBO: str(model)},
            work / f"batch{max_batch}",
            "--devices",
            "cpu",
            "--max-batch",
            str(max_batch),
            env=env,
        ) as process:
            hook = ZImageHook(
                "bench", settings=ConnectionSettings(base_url=process.url, api_key=process.token)
            )
            requests = [ImageInferenceRequest.build(**wire(args, i)) for i in range(args.tasks)]
            started = time.perf_counter()
            hook.submit(requests)  # one POST: the queue holds them all
            for r in requests:
                hook.wait_for_task(r.task_uuid, 1, poll_interval=0.02, max_poll_interval=0.1)
            rates[max_batch] = args.tasks / (time.perf_counter() - started)
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=2, help="tasks running at once (pool slots)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model-scale", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "zimage-executor-bench"))
    args = parser.parse_args(argv)

    work = Path(args.work_dir)
    model = build_model(work / f"model-x{args.model_scale}", args.model_scale)
    size_mb = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**20
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    load, bare = bare_timings(model, args)
    ideal = args.tasks * bare + load
    print(
        f"checkpoint {model} ({size_mb:.0f} MB), {args.size}x{args.size}, {args.steps} steps, "
        f"{args.tasks} tasks, {args.parallel} at once"
    )
    print(
        f"one load {load:.2f}s, bare pipeline call {bare * 1000:.0f} ms -> N x bare + one load = {ideal:.2f}s"
    )

    from airflow_provider_zimage.executor.process import ExecutorProcess

    wall_a, loads_a = run_tasks(args, IN_PROCESS_TASK, [str(model)], env)
    with ExecutorProcess(
        {TURBO: str(model)}, work / "executor", "--devices", "cpu", "--max-batch", "1", env=env
    ) as process:
        wall_b, _ = run_tasks(args, EXECUTOR_TASK, [process.url, process.token], env)
        loads_b = process.health()["loads"]
    print(f"{'backend':<12} {'model loads':>11} {'wall s':>8} {'wall / (N x bare + load)':>26}")
    print(f"{'in-process':<12} {sum(loads_a):>11} {wall_a:>8.2f} {wall_a / ideal:>26.2f}")
    print(f"{'executor':<12} {loads_b:>11} {wall_b:>8.2f} {wall_b / ideal:>26.2f}")
    print(f"in-process / executor wall: {wall_a / wall_b:.2f}x")

    rates = batching(model, args, env, work)
    line = ", ".join(f"--max-batch {b}: {r:.2f} images/s" for b, r in rates.items())
    gain = rates[args.max_batch] / rates[1] if args.max_batch != 1 else 1.0
    print(f"executor alone, {args.tasks} requests at once: {line} (batching gain {gain:.2f}x)")
    print(
        json.dumps(
            {"loads": [sum(loads_a), loads_b], "wall": [wall_a, wall_b], "ideal": ideal, "rates": rates}
        )
    )


if __name__ == "__main__":
    main()
