"""End-to-end latency of webhook delivery versus getResponse polling, for the same Runware delay.

Both modes run the real pieces: the Runware test server (each task takes `delay` seconds, scripted by
a `__delay:X__` prompt marker), `ZImageTaskTrigger` as the triggerer runs it, and for webhooks the
plugin app served by uvicorn on loopback writing to a file inbox. Latency is measured from the submit
POST to the trigger's event, so it includes Runware's work; "overhead" is what waiting added to it.
Polling uses the operator's defaults (first poll after 1 s, growing 1.5x up to 10 s); webhooks use the
defaults too (inbox looked at every 0.25 s, polling only after a 60 s grace period).

    python bench/webhook_latency.py [--delays 0.5 2 5 12] [--tasks 5]
    python bench/webhook_latency.py --smoke   # one 0.2 s delay, 2 tasks per mode (make bench-smoke)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="zimage-bench-"))

SECRET = "bench-webhook-secret"


def serve_webhooks(inbox: str) -> tuple[str, object, threading.Thread]:
    """The plugin's app mounted at /zimage as the API server mounts it, on uvicorn in a thread."""
    import uvicorn
    from fastapi import FastAPI

    from airflow_provider_zimage.webhooks.app import create_app
    from airflow_provider_zimage.webhooks.tokens import ROUTE_PREFIX

    root = FastAPI()
    root.mount(ROUTE_PREFIX, create_app(inbox))
    config = uvicorn.Config(
        root, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, thread


async def one_task(mode: str, delay: float, index: int, api: str, inbox: str) -> float:
    """Seconds from submitting one task to its trigger's event."""
    from airflow_provider_zimage.hooks.runware import ZImageHook
    from airflow_provider_zimage.runware.models import ImageInferenceRequest
    from airflow_provider_zimage.triggers.task import TaskEvent, ZImageTaskTrigger
    from airflow_provider_zimage.webhooks.tokens import token_expiry, webhook_url

    request = ImageInferenceRequest.build(
        model="runware:z-image@turbo",
        positive_prompt=f"bench {mode} {index} __delay:{delay}__",
        width=256,
        height=256,
    )
    webhook = mode == "webhook"
    if webhook:
        request = request.model_copy(
            update={"webhook_url": webhook_url(api, request.task_uuid, SECRET, expires=token_expiry(600))}
        )
    started = time.perf_counter()
    await ZImageHook().asubmit([request])
    trigger = ZImageTaskTrigger(
        task_uuid=request.task_uuid,
        deadline=time.time() + 600,
        webhook_inbox=inbox if webhook else None,
        poll_after=time.time() + 60 if webhook else 0.0,
    )
    event = await anext(trigger.run())
    # Read as the operators read it: a changed event shape fails the bench instead of skewing it.
    outcome = TaskEvent.model_validate(event.payload)
    if outcome.outcome != "store":
        raise RuntimeError(f"{mode} task {request.task_uuid} ended {outcome.outcome}: {outcome.message}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.5, 2.0, 5.0, 12.0])
    parser.add_argument("--tasks", type=int, default=5, help="tasks per mode and delay, run concurrently")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (make bench-smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.delays, args.tasks = [0.2], 2

    from airflow_provider_zimage.testing.runware_server.server import RunwareTestServer

    inbox = f"file://{tempfile.mkdtemp(prefix='zimage-inbox-')}"
    with RunwareTestServer() as runware:
        api, server, thread = serve_webhooks(inbox)
        os.environ["AIRFLOW_CONN_ZIMAGE_DEFAULT"] = json.dumps(
            {
                "conn_type": "zimage",
                "host": runware.url,
                "password": runware.api_key,
                "extra": {"webhook_secret": SECRET, "webhook_base_url": api},
            }
        )
        for mode in ("polling", "webhook"):  # warm-up: imports, connection pools, first inbox look
            asyncio.run(_gather(mode, 0.0, 1, api, inbox))
        runware.reset()
        print(f"{args.tasks} concurrent tasks per row; latency = submit to trigger event, seconds (mean)")
        print(
            f"{'delay':>6} | {'polling':>8} {'overhead':>8} {'polls':>5} | {'webhook':>8} {'overhead':>8} "
            f"{'polls':>5} | {'ratio':>5}"
        )
        for delay in args.delays:
            row = {}
            for mode in ("polling", "webhook"):
                polls = runware.stats["get_response_polls"]
                latencies = asyncio.run(_gather(mode, delay, args.tasks, api, inbox))
                polls = (runware.stats["get_response_polls"] - polls) / args.tasks
                row[mode] = (statistics.mean(latencies), polls)
            (poll_s, poll_n), (hook_s, hook_n) = row["polling"], row["webhook"]
            print(
                f"{delay:>6.1f} | {poll_s:>8.3f} {poll_s - delay:>8.3f} {poll_n:>5.1f} | "
                f"{hook_s:>8.3f} {hook_s - delay:>8.3f} {hook_n:>5.1f} | {poll_s / hook_s:>5.2f}"
            )
        stats = runware.stats
        print(f"webhooks delivered: {stats['webhook_deliveries']}, dropped: {stats['webhooks_dropped']}")
        if dropped := stats["webhooks_dropped"]:
            raise SystemExit(f"{dropped} webhook(s) dropped: the figures above are polling's")
        server.should_exit = True  # type: ignore[attr-defined]
        thread.join(10)


async def _gather(mode: str, delay: float, tasks: int, api: str, inbox: str) -> list[float]:
    return await asyncio.gather(*(one_task(mode, delay, i, api, inbox) for i in range(tasks)))


if __name__ == "__main__":
    main()
