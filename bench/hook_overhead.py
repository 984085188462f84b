"""CPU cost of one hook request: build + validate + send + parse, measured on the calling thread.

Target (issue 2): under 2 ms per request. The server runs in another process, so its work is not counted;
`time.thread_time()` counts only this thread's CPU, not the wait for the network.

    .venv/bin/python bench/hook_overhead.py [--requests 500]
    .venv/bin/python bench/hook_overhead.py --smoke   # 20 requests after 2 warm-up (make bench-smoke)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from bench._server import server_process


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests first")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (make bench-smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.warmup = 20, 2
    with server_process("--api-key", "bench-key") as url:
        hook = ZImageHook(settings=ConnectionSettings(base_url=url, api_key="bench-key"))
        fields = {
            "model": "runware:z-image@turbo",
            "width": 1024,
            "height": 1024,
            "steps": 8,
            "include_cost": True,
        }
        # Warm up: connection pool, imports, pydantic schema caches.
        for i in range(args.warmup):
            hook.submit([ImageInferenceRequest.build(positive_prompt=f"warm {i}", **fields)])

        build, send_parse, total = [], [], []
        wall0 = time.perf_counter()
        for i in range(args.requests):
            t0 = time.thread_time()
            req = ImageInferenceRequest.build(positive_prompt=f"a product photo, variant {i}", **fields)
            payload = protocol.inference_payload([req])
            t1 = time.thread_time()
            hook.submit([req])
            t2 = time.thread_time()
            build.append(t1 - t0)
            send_parse.append(t2 - t1)
            total.append(t2 - t0)
        wall = time.perf_counter() - wall0
        assert payload
        hook.close()

    ms = lambda xs: statistics.median(xs) * 1000  # noqa: E731
    p95 = lambda xs: sorted(xs)[int(len(xs) * 0.95)] * 1000  # noqa: E731
    print(f"requests                  {args.requests}")
    print(f"build + validate (median) {ms(build):.3f} ms CPU")
    print(f"send + parse (median)     {ms(send_parse):.3f} ms CPU")
    print(
        f"total per request         {ms(total):.3f} ms CPU median, {p95(total):.3f} ms p95  (target < 2 ms)"
    )
    print(f"wall per request          {wall / args.requests * 1000:.3f} ms (includes the server's work)")


if __name__ == "__main__":
    main()
