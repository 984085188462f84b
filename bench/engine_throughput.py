"""Images per minute through a router with 1 vs 2 SGLang workers, and the provider's overhead per image.

Two figures, each measured side by side in one run:

(a) throughput: N images (`n=1` each, seeds 0..N-1, as the provider sends them) through a router in front
    of 1 worker, then through a router in front of 2 workers, with 2 requests in flight per worker (a
    worker runs its requests one after another; the second one in flight keeps it busy while the first
    answer travels). Printed: images per minute for each and the ratio 2-worker / 1-worker.
(b) overhead: the same images one at a time through the 2-worker router, alternating a bare httpx client
    (POST, decode the b64 answer) with the provider's own path for one image (`ZImageGenerateOperator`
    on an openai_images connection: validation, the ledger, the call, the answer decoded and checked,
    the atomic write with its sha256, the manifest), the median of each and their difference: what the
    provider adds per image to the engine's own time.

On this machine (2 CPU cores, the tiny random checkpoint) the workers share the cores, so (a) shows the
router and the protocol, not GPU scaling; on a machine with GPUs point it at real workers:

    python bench/engine_throughput.py                      # starts 2 workers on the tiny model (CPU)
    python bench/engine_throughput.py --smoke              # 4 images a phase at 128x128 (make test-sglang)
    python bench/engine_throughput.py --worker-urls http://gpu1:30000 http://gpu2:30000 \\
        --model Z-Image-Turbo --size 1024x1024 --steps 8 --images 64

With `--worker-urls` the bench starts only its routers (needs `sglang-router`, from `make install-sglang`
or `pip install sglang-router`); without it, it starts the workers too (`--model-path`: a Z-Image folder,
default the tiny checkpoint built in a temporary folder).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airflow_provider_zimage.testing.sglang_cluster import (  # noqa: E402
    MODEL_ID,
    NginxRouter,
    SGLangCluster,
    sglang_venv,
)


def body(model: str, seed: int, size: str, steps: int) -> dict[str, Any]:
    """One image, the body the provider sends for it (n=1, its own seed, steps and Turbo's guidance 0
    always sent, lossless pixels in the answer), so the two clients ask the engine for the same work."""
    return {
        "model": model,
        "prompt": "a lighthouse at dusk, oil painting",
        "n": 1,
        "size": size,
        "response_format": "b64_json",
        "output_format": "png",
        "num_inference_steps": steps,
        "guidance_scale": 0.0,
        "seed": seed,
    }


def bare_image(client: httpx.Client, url: str, payload: dict[str, Any]) -> bytes:
    response = client.post(f"{url}/v1/images/generations", json=payload, timeout=600)
    response.raise_for_status()
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def throughput(url: str, images: int, in_flight: int, make: Callable[[int], dict[str, Any]]) -> float:
    """Images per minute, `in_flight` requests at a time; every answer must hold an image."""
    with httpx.Client() as client, ThreadPoolExecutor(in_flight) as pool:
        bare_image(client, url, make(10_000))  # the router's first connection, outside the clock
        start = time.perf_counter()
        sizes = list(pool.map(lambda seed: len(bare_image(client, url, make(seed))), range(images)))
        elapsed = time.perf_counter() - start
    assert all(sizes), "an answer without an image"
    return images / elapsed * 60


class _TaskInstance:
    """What the operator reads from a task instance when it runs outside a scheduler."""

    def __init__(self, run_id: str) -> None:
        self.dag_id, self.task_id, self.run_id, self.map_index = "engine_bench", "hero", run_id, -1

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def provider_path(url: str, args: argparse.Namespace, workdir: Path) -> Callable[[dict[str, Any]], Any]:
    """One `ZImageGenerateOperator.execute` per image on an openai_images connection to `url`: request
    validation, the ledger's intent and stored records, the call, decoding and checking the answer,
    the atomic write with its sha256 and the manifest. What a DAG task does per image."""
    os.environ.setdefault("AIRFLOW_HOME", str(workdir / "airflow"))
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")  # the figures, not a log per image
    os.environ["AIRFLOW__ZIMAGE__OUTPUT_PATH"] = (workdir / "images").as_uri()
    extra = {"backend": "openai_images", "served_model": args.model, "timeout": 600}
    connection = {"conn_type": "zimage", "host": url, "extra": extra}
    if args.api_key:
        connection["password"] = args.api_key
    os.environ["AIRFLOW_CONN_ZIMAGE_ENGINE_BENCH"] = json.dumps(connection)
    # why: Airflow reads AIRFLOW_HOME when it is imported, set just above
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    width, height = (int(v) for v in args.size.split("x"))
    runs = itertools.count()

    def call(payload: dict[str, Any]) -> Any:
        op = ZImageGenerateOperator(
            task_id="hero",
            zimage_conn_id="zimage_engine_bench",
            prompt=payload["prompt"],
            width=width,
            height=height,
            steps=payload["num_inference_steps"],
            seed=payload["seed"],
            output_format="PNG",
        )
        context: Any = {"ti": _TaskInstance(f"manual__bench_{next(runs)}")}
        return op.execute(context)

    return call


def overhead(
    url: str, images: int, make: Callable[[int], dict[str, Any]], provider: Callable[[dict[str, Any]], Any]
) -> tuple[float, float]:
    """Median seconds per image: bare client, provider (alternating, same seeds, same router)."""
    bare: list[float] = []
    ours: list[float] = []
    with httpx.Client() as client:
        for seed in range(images):
            # Which client goes first alternates, so a slower first (or second) call is shared out.
            for turn in (0, 1) if seed % 2 == 0 else (1, 0):
                start = time.perf_counter()
                if turn == 0:
                    bare_image(client, url, make(seed))
                else:
                    provider(make(seed))
                (bare if turn == 0 else ours).append(time.perf_counter() - start)
    return statistics.median(bare), statistics.median(ours)


def run(args: argparse.Namespace) -> int:
    venv = sglang_venv(args.venv)
    workdir = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    cluster: SGLangCluster | None = None
    routers: list[NginxRouter] = []
    started = time.perf_counter()
    try:
        if args.worker_urls:
            worker_urls: Sequence[str] = args.worker_urls
        else:
            model_path = args.model_path or _tiny_model(workdir)
            cluster = SGLangCluster(model_path, workdir, workers=2, venv=venv, router=None).start()
            worker_urls = [w.url for w in cluster.workers]
            starts = ", ".join(f"{w.started_seconds:.0f} s" for w in cluster.workers)
            print(f"workers: 2 started side by side in {time.perf_counter() - started:.0f} s ({starts})")

        def make(seed: int) -> dict[str, Any]:
            return body(args.model, seed, args.size, args.steps)

        rates: dict[int, float] = {}
        for count in (1, 2):
            router = NginxRouter(worker_urls[:count], workdir)
            routers.append(router)
            router.start()
            rates[count] = throughput(router.url, args.images, 2 * count, make)
            print(
                f"{count} worker(s) behind the router: {rates[count]:.1f} images/min ({args.images} images)"
            )
        print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")

        provider = provider_path(routers[-1].url, args, workdir)
        bare, ours = overhead(routers[-1].url, args.overhead_images, make, provider)
        print(
            f"one image at a time, bare httpx client: {bare * 1000:.0f} ms (median of {args.overhead_images})"
        )
        print(f"one image at a time, ZImageGenerateOperator (openai_images): {ours * 1000:.0f} ms")
        print(
            f"provider overhead per image: {(ours - bare) * 1000:+.1f} ms ({(ours / bare - 1) * 100:+.1f}%)"
        )
    finally:
        for router in routers:
            router.stop(10)
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def _tiny_model(workdir: Path) -> Path:
    # why: torch and diffusers (the local extra) are needed only to build the default checkpoint
    from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage

    return build_tiny_zimage(workdir / "tiny-zimage")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="4 images a phase, 128x128, 2 steps")
    parser.add_argument("--images", type=int, default=16, help="images per throughput phase")
    parser.add_argument("--overhead-images", type=int, default=8, help="images for the overhead comparison")
    parser.add_argument("--size", default="128x128", help="WIDTHxHEIGHT (multiples of 16)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default=MODEL_ID, help="the model name the workers serve")
    parser.add_argument("--worker-urls", nargs="+", help="existing workers (2); default: start them here")
    parser.add_argument("--model-path", help="Z-Image folder for workers started here (default: tiny)")
    parser.add_argument("--api-key", help="the workers' API key, if they need one")
    parser.add_argument("--venv", help="venv with sglang and sglang-router (default: .venv-sglang)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.overhead_images, args.size, args.steps = 4, 3, "128x128", 2
    if args.worker_urls is not None and len(args.worker_urls) < 2:
        parser.error("--worker-urls: give 2 workers (the bench compares 1 with 2)")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
