"""`zimage-executor serve ...`: the console script of the executor service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from pathlib import Path

from airflow_provider_zimage.executor.config import ExecutorConfig
from airflow_provider_zimage.executor.server import ExecutorServer
from airflow_provider_zimage.runware.models import resolve_model

__all__ = ["main", "parse_args"]


def _model(text: str) -> tuple[str, str]:
    air, sep, source = text.partition("=")
    if not sep or not air.strip() or not source.strip():
        raise argparse.ArgumentTypeError(f"--model must be AIR=PATH_OR_HF_ID (got {text!r})")
    try:
        return resolve_model(air.strip()).air, source.strip()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _controlnet(text: str) -> tuple[str, str]:
    air, sep, folder = text.partition("=")
    if not sep or not air.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"--controlnet must be AIR=FOLDER (got {text!r})")
    return air.strip(), os.path.abspath(folder.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zimage-executor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="load the models once and serve Runware's protocol over HTTP")
    serve.add_argument("--model", action="append", type=_model, required=True, metavar="AIR=PATH_OR_HF_ID")
    serve.add_argument(
        "--devices", default="auto", help="auto (every CUDA GPU, else cpu) or cuda:0,cuda:1 or cpu"
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument(
        "--token-file", type=Path, help="file holding the bearer token (else $ZIMAGE_EXECUTOR_TOKEN)"
    )
    serve.add_argument("--max-batch", type=int, default=4, help="images per pipeline call, at most")
    serve.add_argument("--output-dir", type=Path, help="keep tasks and images here, across restarts")
    serve.add_argument("--result-ttl", type=float, default=24 * 3600.0, help="seconds results are kept")
    serve.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds SIGTERM waits for queued work"
    )
    serve.add_argument(
        "--fetch-grace",
        type=float,
        default=30.0,
        help="without --output-dir: seconds SIGTERM keeps an unfetched result available (within "
        "--drain-timeout)",
    )
    serve.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32"
    )
    serve.add_argument(
        "--input-root", action="append", default=[], help="folder seedImage/maskImage files may be in"
    )
    serve.add_argument(
        "--lora-root",
        action="append",
        default=[],
        help="folder file: LoRAs may be in (default: the --input-root folders)",
    )
    serve.add_argument(
        "--input-url-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="origin (https://host, http://host:port) seedImage/maskImage URLs may be fetched from, "
        "redirects included (default: none, URL inputs are refused)",
    )
    serve.add_argument(
        "--controlnet",
        action="append",
        type=_controlnet,
        default=[],
        metavar="AIR=FOLDER",
        help="a ControlNet requests may name by AIR id (controlNet[].model): a diffusers folder "
        "(ZImageControlNetModel.save_pretrained); repeat for more",
    )
    serve.add_argument("--public-url", help="base URL clients reach this executor at (for image URLs)")
    serve.add_argument("--allow-downloads", action="store_true", help="let from_pretrained use the HF hub")
    serve.add_argument("--no-preload", dest="preload", action="store_false", help="load on first request")
    serve.add_argument("--log-level", default="INFO")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[ExecutorConfig, str]:
    args = _parser().parse_args(argv)
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    else:
        token = os.environ.get("ZIMAGE_EXECUTOR_TOKEN", "").strip()
    if not token:
        raise SystemExit(
            "zimage-executor: give the bearer token with --token-file FILE or $ZIMAGE_EXECUTOR_TOKEN"
        )
    try:
        config = ExecutorConfig(
            models=dict(args.model),
            token=token,
            devices=tuple(d.strip() for d in args.devices.split(",") if d.strip()),
            host=args.host,
            port=args.port,
            max_batch=args.max_batch,
            output_dir=args.output_dir,
            result_ttl=args.result_ttl,
            drain_timeout=args.drain_timeout,
            fetch_grace=args.fetch_grace,
            dtype=args.dtype,
            local_files_only=not args.allow_downloads,
            preload=args.preload,
            input_roots=tuple(args.input_root),
            lora_roots=tuple(args.lora_root) if args.lora_root else None,
            input_url_origins=tuple(args.input_url_origin),
            public_url=args.public_url,
            controlnets=dict(args.controlnet),
        )
    except ValueError as exc:
        raise SystemExit(f"zimage-executor: {exc}") from None
    return config, args.log_level


def main(argv: list[str] | None = None) -> int:
    config, level = parse_args(argv)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request's full URL at INFO: presigned upload URLs and input image URLs carry
    # credentials in their query. The executor logs what it fetched itself, by origin.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    asyncio.run(ExecutorServer(config).serve())
    if any(t.name.startswith("zimage-") and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        os._exit(0)  # a pipeline call still running would abort the interpreter's exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
