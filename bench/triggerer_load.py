"""1,000 concurrent ZImageTaskTriggers in one event loop, as one triggerer process would run them.

Prints wall time as a ratio to the server's fixed delay, RSS growth and CPU seconds.
Targets (issue 3): ratio under 1.2 plus one poll interval, under 100 MB growth, under 10 CPU seconds.

    .venv/bin/python bench/triggerer_load.py [--triggers 1000 --delay 10 --poll-interval 1 --max-poll 2]
    .venv/bin/python bench/triggerer_load.py --smoke   # 20 triggers, 0.5 s delay (make bench-smoke)

Every event is read as the operators read it (`TaskEvent`), and the run exits non-zero unless every
trigger ended with `store`: a changed event shape fails here, not in the next measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="zimage-bench-"))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def run(args: argparse.Namespace, url: str) -> dict[str, float]:
    from airflow_provider_zimage.hooks.runware import ZImageHook
    from airflow_provider_zimage.runware.models import ImageInferenceRequest
    from airflow_provider_zimage.triggers.task import TaskEvent, ZImageTaskTrigger

    hook = ZImageHook()
    requests = [
        ImageInferenceRequest.build(
            model="runware:z-image@turbo",
            positive_prompt=f"load {i}",
            width=128,
            height=128,
            output_type="URL",
        )
        for i in range(args.triggers)
    ]
    rss0 = rss_mb()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for start in range(0, len(requests), 100):  # several tasks per POST, as a batch submitter would
        await hook.asubmit(requests[start : start + 100])
    submitted = time.perf_counter() - t0

    deadline = time.time() + args.delay * 10
    triggers = [
        ZImageTaskTrigger(
            task_uuid=r.task_uuid,
            deadline=deadline,
            poll_interval=args.poll_interval,
            max_poll_interval=args.max_poll,
        )
        for r in requests
    ]

    async def first_event(trigger: ZImageTaskTrigger) -> str:
        async for event in trigger.run():
            # The operators' own reading of the event: an unknown or missing field raises here.
            return TaskEvent.model_validate(event.payload).outcome
        return "none"

    outcomes = await asyncio.gather(*(first_event(t) for t in triggers))
    wall = time.perf_counter() - t0
    return {
        "submitted_s": submitted,
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "rss_growth_mb": rss_mb() - rss0,
        "stored": sum(o == "store" for o in outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--triggers", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=10.0, help="server-side seconds before results")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--max-poll", type=float, default=2.0)
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (make bench-smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.triggers, args.delay, args.poll_interval, args.max_poll = 20, 0.5, 0.1, 0.2
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536)) if resource.getrlimit(resource.RLIMIT_NOFILE)[
        1
    ] >= 65536 else None

    from bench._server import server_process

    with server_process("--api-key", "bench-key", "--delay", str(args.delay)) as url:
        os.environ["AIRFLOW_CONN_ZIMAGE_DEFAULT"] = json.dumps(
            {"conn_type": "zimage", "host": url, "password": "bench-key", "extra": {"timeout": 60}}
        )
        figures = asyncio.run(run(args, url))

    ratio = figures["wall_s"] / args.delay
    target = 1.2 + args.max_poll / args.delay
    print(f"triggers            {args.triggers} ({figures['stored']:.0f} stored)")
    print(f"server delay        {args.delay:.1f} s; poll interval {args.poll_interval}-{args.max_poll} s")
    print(f"submit time         {figures['submitted_s']:.2f} s")
    print(f"wall time           {figures['wall_s']:.2f} s  -> ratio {ratio:.3f} (target < {target:.2f})")
    print(f"RSS growth          {figures['rss_growth_mb']:.1f} MB (target < 100)")
    print(f"CPU                 {figures['cpu_s']:.2f} s (target < 10)")
    if figures["stored"] != args.triggers:
        raise SystemExit(f"only {figures['stored']:.0f} of {args.triggers} triggers ended with 'store'")


if __name__ == "__main__":
    main()
