"""In-process local backend vs the zimage-executor in a real Airflow deployment, same model, one run.

One e2e deployment (`tests/e2e/harness.py`: api-server, scheduler with the LocalExecutor,
dag-processor and triggerer as separate processes, SQLite, `--parallel` task instances at once) runs
three DAGs of N mapped tasks each, triggered through the REST API one after the other:

(0) no-op floor: N mapped `@task`s that return None. What Airflow itself costs per task instance on
    this machine (a task process, its start-up and the scheduler's rounds), with no image at all.
(a) in-process: N mapped `ZImageGenerateOperator`s on a connection with `backend: local` (diffusers in
    the task process): every task process imports torch and diffusers and loads the checkpoint.
(b) executor: the same N tasks, `deferrable=True`, on the `zimage_executor` connection: one
    `zimage-executor` (started by the harness with `--max-batch 1`, one CPU thread) loaded the
    checkpoint once, before the run; each task submits, polls, downloads and stores, as with Runware.
    With `--compare-poll-interval S` (default 1.0, the Runware poll interval) the same DAG runs once
    more with `poll_interval=S`, to show what the operator's default poll interval costs.

Measured for each: wall time (trigger to the DAG run's `success`, polled through the REST API every
0.25 s), model loads ((a): "Loaded Z-Image" lines in the task logs; (b): the executor's /health
`loads`, its start-up load included), CPU seconds per component (process-tree deltas; task processes
count under the scheduler, whose LocalExecutor workers start them), tries and deferrals. Timed in this
process, one thread, before the deployment starts: the bare pipeline call (median of 5 warm calls) and
one cold load (`from_pretrained` after the checkpoint's pages were dropped from the page cache; torch
and diffusers already imported). Printed per backend: wall / (N x bare + one load), the target's
figure, and (wall - no-op wall) / (N x bare + one load), the backend's share with Airflow's own
per-task cost taken out. Also printed, for scale: what a fresh process pays to import torch + diffusers
and load, the part of an in-process task that the executor removes.

Then the executor alone, outside Airflow: N requests in one POST, batching on (`--max-batch`, default
4) vs `--max-batch 1`, images per second.

    python bench/executor_throughput.py [--tasks 20] [--parallel 4] [--size 128] [--steps 2]
                                        [--model-scale 1] [--max-batch 4] [--compare-poll-interval 1.0]
    python bench/executor_throughput.py --smoke   # 1 task, tiny model (make bench-smoke)

The smoke runs the deployment part at tiny sizes (no warm-up DAG run, no poll-interval comparison)
and leaves out the fresh-process import and the executor-alone batching (each a process importing
torch; `gpu_check.sh --smoke` covers batching through the hook): on a busy 2-core machine those
doubled its time. It exits non-zero when a run fails, the executor loaded the model more than once,
or the in-process tasks' "Loaded Z-Image in" lines it counts are gone.

`--model-scale S` builds a larger random checkpoint (transformer width 32*S, 8 layers; S=24: ~300 MB,
S=32: ~520 MB of float32 weights) so that loading has a share of a task closer to a real checkpoint's.
The compute of a pipeline call grows faster than the weights (128 px, 2 steps, one thread: S=24 ~4.7 s
per image), while a load from the page cache stays well under a second at any of these sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TURBO = "runware:z-image@turbo"
LOCAL_CONN = "zimage_local"
NOOP, IN_PROCESS, EXECUTOR, EXECUTOR_POLL = (
    "bench_noop",
    "bench_in_process",
    "bench_executor",
    "bench_executor_poll",
)
WARMUP = "bench_warmup"

HEADER = """
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
# Retries cover Airflow 3.3's deferral race on a loaded machine; the bench reports the tries.
ARGS = {"retries": 2, "retry_delay": timedelta(seconds=1)}
"""

NOOP_DAG = """
with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False, default_args=ARGS):
    @task
    def generate(prompt, seed):
        return None

    generate.expand_kwargs({rows!r})
"""

IMAGE_DAG = """
with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False, default_args=ARGS):
    ZImageGenerateOperator.partial(
        task_id="generate",
        model={model!r},
        width={size},
        height={size},
        steps={steps},
        output_format="PNG",
        **{kwargs!r},
    ).expand_kwargs({rows!r})
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


def drop_from_page_cache(folder: Path) -> None:
    """Make the next read of the checkpoint come from the disk (written pages are flushed first: the
    kernel drops only clean ones). Only these files; no privileges needed."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prompt(index: int) -> str:
    return f"bench image number {index}, a lighthouse at dusk"


def wire(args: argparse.Namespace, index: int) -> dict:
    return {
        "model": TURBO,
        "positivePrompt": prompt(index),
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "seed": index,
        "outputFormat": "PNG",
        "taskUUID": str(uuid.uuid4()),
    }


def bare_timings(model: Path, args: argparse.Namespace) -> tuple[float, float]:
    """One cold load and the median warm bare pipeline call, in this process, one thread."""
    import torch
    from diffusers import ZImagePipeline

    torch.set_num_threads(1)
    drop_from_page_cache(model)
    started = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - started
    calls = []
    for seed in range(6):
        started = time.perf_counter()
        pipe(
            prompt=prompt(seed),
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        calls.append(time.perf_counter() - started)
    return load, statistics.median(calls[1:])


FRESH_PROCESS = """
import sys, time
started = time.perf_counter()
import torch
torch.set_num_threads(1)
from diffusers import ZImagePipeline
ZImagePipeline.from_pretrained(sys.argv[1], local_files_only=True)
print(time.perf_counter() - started)
"""


def fresh_process_load(model: Path, env: dict[str, str]) -> float:
    """Seconds a new Python process needs to import torch + diffusers and load (page cache warm)."""
    out = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(model)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def dag_files(args: argparse.Namespace, compare_poll: float | None) -> dict[str, str]:
    rows = [{"prompt": prompt(i), "seed": i} for i in range(args.tasks)]
    image = {"dag_id": "", "model": TURBO, "size": args.size, "steps": args.steps, "rows": rows}
    sources = {
        WARMUP: NOOP_DAG.format(dag_id=WARMUP, rows=rows[:2]),
        NOOP: NOOP_DAG.format(dag_id=NOOP, rows=rows),
        IN_PROCESS: IMAGE_DAG.format(
            **{**image, "dag_id": IN_PROCESS}, kwargs={"zimage_conn_id": LOCAL_CONN}
        ),
        # No poll_interval: the operator's default for the connection's backend is what is measured.
        EXECUTOR: IMAGE_DAG.format(
            **{**image, "dag_id": EXECUTOR}, kwargs={"zimage_conn_id": "zimage_executor", "deferrable": True}
        ),
    }
    if compare_poll is not None:
        sources[EXECUTOR_POLL] = IMAGE_DAG.format(
            **{**image, "dag_id": EXECUTOR_POLL},
            kwargs={"zimage_conn_id": "zimage_executor", "deferrable": True, "poll_interval": compare_poll},
        )
    return {name: HEADER + textwrap.dedent(source) for name, source in sources.items()}


def run_dag(deployment: Any, dag_id: str, timeout: float) -> dict[str, Any]:
    """Trigger, wait for the end (0.25 s polls), and gather what the run cost."""
    api = deployment.api
    run_id = f"bench_{uuid.uuid4().hex[:8]}"
    cpu0 = deployment.cpu_seconds()
    started = time.monotonic()
    api.trigger(dag_id, run_id)
    deadline = started + timeout
    while True:
        state = api.dag_run(dag_id, run_id)["state"]
        if state in ("success", "failed"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(
                f"{dag_id} still {state} after {timeout:.0f}s: {api.state_counts(dag_id, run_id)}"
            )
        time.sleep(0.25)
    wall = time.monotonic() - started
    cpu1 = deployment.cpu_seconds()
    if state != "success":
        raise SystemExit(f"{dag_id} ended {state}: {api.state_counts(dag_id, run_id)}")
    tis = api.task_instances(dag_id, run_id)
    logs = [
        deployment.task_log_text(dag_id, run_id, ti["task_id"], int(ti["map_index"]))
        for ti in tis
        if ti["task_id"] == "generate"
    ]
    return {
        "wall": wall,
        "cpu": {name: round(cpu1.get(name, 0.0) - cpu0.get(name, 0.0), 1) for name in cpu1},
        "loads": sum(log.count("Loaded Z-Image in") for log in logs),
        "deferred": sum(1 for log in logs if ": deferring" in log),
        "retried": sum(1 for ti in tis if int(ti.get("try_number") or 1) > 1),
    }


def batching(model: Path, args: argparse.Namespace, env: dict[str, str], work: Path) -> dict[int, float]:
    """Images per second of the executor alone: N requests submitted at once, batched or not."""
    from airflow_provider_zimage.executor.process import ExecutorProcess
    from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

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
    parser.add_argument("--parallel", type=int, default=4, help="task instances at once (parallelism)")
    parser.add_argument("--size", type=int, default=128, help="pixels (the API allows 128-2048)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model-scale", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument(
        "--compare-poll-interval",
        type=float,
        default=1.0,
        help="run (b) again with this poll_interval (<= 0: skip)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per DAG run at most")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "zimage-executor-bench"))
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (make bench-smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        # Each thing left out costs a DAG run or a process importing torch; the smoke checks paths.
        args.tasks, args.parallel, args.model_scale = 1, 2, 1
        args.compare_poll_interval, args.timeout = 0.0, 180.0
    compare_poll = args.compare_poll_interval if args.compare_poll_interval > 0 else None

    from tests.e2e.harness import Deployment, DeploymentConfig

    work = Path(args.work_dir)
    model = build_model(work / f"model-x{args.model_scale}", args.model_scale)
    size_mb = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**20
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env = {**os.environ, **threads, "PYTHONPATH": str(ROOT)}
    load, bare = bare_timings(model, args)
    fresh = float("nan") if args.smoke else fresh_process_load(model, env)
    ideal = args.tasks * bare + load
    print(
        f"checkpoint {model} (scale {args.model_scale}, {size_mb:.0f} MB), {args.size}x{args.size}, "
        f"{args.steps} steps, {args.tasks} mapped tasks, {args.parallel} at once, {os.cpu_count()} CPUs"
    )
    print(
        f"one cold load {load:.2f}s, bare pipeline call {bare * 1000:.0f} ms -> "
        f"N x bare + one load = {ideal:.2f}s; a fresh process's import torch+diffusers + load {fresh:.2f}s"
    )

    local_conn = {
        "conn_type": "zimage",
        "extra": {"backend": "local", "model_path": str(model), "device": "cpu"},
    }
    config = DeploymentConfig(
        parallelism=args.parallel,
        # One thread per task process, like the executor and the bare call: no oversubscription.
        extra_env={**threads, f"AIRFLOW_CONN_{LOCAL_CONN.upper()}": json.dumps(local_conn)},
    )
    results: dict[str, dict[str, Any]] = {}
    with Deployment(dag_files(args, compare_poll), config) as deployment:
        dags = [WARMUP, NOOP, IN_PROCESS, EXECUTOR] + ([EXECUTOR_POLL] if compare_poll else [])
        deployment.wait_for_dags(dags)
        print(f"deployment up in {deployment.startup_seconds:.1f}s")
        if not args.smoke:
            run_dag(deployment, WARMUP, args.timeout)  # first-run costs (imports, DB pages) kept out
        results["no-op"] = run_dag(deployment, NOOP, args.timeout)
        results["in-process"] = run_dag(deployment, IN_PROCESS, args.timeout)
        deployment.start_executor(model, "--max-batch", "1")
        results["executor"] = run_dag(deployment, EXECUTOR, args.timeout)
        results["executor"]["loads"] = int(deployment.executor_health()["loads"])
        if compare_poll is not None:
            label = f"exec poll {compare_poll:g}s"
            results[label] = run_dag(deployment, EXECUTOR_POLL, args.timeout)
            results[label]["loads"] = int(deployment.executor_health()["loads"])

    floor = results["no-op"]["wall"]
    print(
        f"{'DAG (N mapped)':<17} {'loads':>5} {'wall s':>7} {'wall/(Nxbare+load)':>19} "
        f"{'(wall-no-op)/(Nxbare+load)':>27} {'deferred':>8} {'retried':>7}  CPU s by component"
    )
    for label, r in results.items():
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["cpu"].items()) if v)
        net = "" if label == "no-op" else f"{(r['wall'] - floor) / ideal:.2f}"
        print(
            f"{label:<17} {r['loads']:>5} {r['wall']:>7.1f} {r['wall'] / ideal:>19.2f} {net:>27} "
            f"{r['deferred']:>8} {r['retried']:>7}  {cpu}"
        )
    print(f"in-process / executor wall: {results['in-process']['wall'] / results['executor']['wall']:.2f}x")

    rates = {} if args.smoke else batching(model, args, env, work)
    if rates:
        line = ", ".join(f"--max-batch {b}: {r:.2f} images/s" for b, r in rates.items())
        gain = rates[args.max_batch] / rates[1] if args.max_batch != 1 else 1.0
        print(f"executor alone, {args.tasks} requests at once: {line} (batching gain {gain:.2f}x)")
    loads = results["executor"]["loads"]
    print(
        json.dumps(
            {
                "bare": bare,
                "load": load,
                "fresh_process_load": fresh,
                "ideal": ideal,
                "runs": results,
                "rates": rates,
            }
        )
    )
    if loads != 1:
        raise SystemExit(f"the executor loaded the model {loads} times, not once")
    if results["in-process"]["loads"] < args.tasks:
        # Counted from "Loaded Z-Image in" task-log lines: fewer means the line changed, not the backend.
        raise SystemExit(f"{results['in-process']['loads']} 'Loaded Z-Image in' lines for {args.tasks} tasks")


if __name__ == "__main__":
    main()
