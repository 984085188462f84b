"""`python -m airflow_provider_zimage.testing.runware_server --port N`: the server in its own process.

For the e2e harness and for users whose DAG tests run Airflow in other processes.

Prints the API base URL on the first line of stdout (and to --url-file when given) once it accepts
connections, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .server import DEFAULT_API_KEY, RunwareTestServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_zimage.testing.runware_server", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY, help="'' disables the key check")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before a task's first result")
    parser.add_argument("--stagger", type=float, default=0.0, help="seconds between results of one task")
    parser.add_argument("--webhook-envelope", action="store_true", help='POST {"data": [item]} to webhooks')
    parser.add_argument("--public-origin", default=None, help="origin used in image URLs")
    parser.add_argument("--url-file", type=Path, default=None, help="also write the URL to this file")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = RunwareTestServer(
        args.host,
        args.port,
        api_key=args.api_key or None,
        delay=args.delay,
        stagger=args.stagger,
        webhook_envelope=args.webhook_envelope,
        public_origin=args.public_origin,
    )
    with server:
        print(server.url, flush=True)
        if args.url_file is not None:
            tmp = args.url_file.with_name(args.url_file.name + ".tmp")
            tmp.write_text(server.url + "\n")
            tmp.replace(args.url_file)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
