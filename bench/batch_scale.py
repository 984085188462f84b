"""One `ZImageBatchGenerateOperator` at 1,000, 10,000 (and with `--full` 100,000) images: is the cost flat?

The provider's own cost per image, measured against the packaged Runware test server at zero delay,
128x128 (the server runs in its own process, so its CPU and memory stay out of the figures). Each size
runs in a fresh child process (its peak RSS is its own) that executes the operator as a task instance
does, `execute()` with the task instance's identity (the path tests/test_batch.py uses; dag.test() adds
a fixed scheduling cost per run, not per image). The child counts every atomic write of the storage
layer by kind: ledger (`_zimage_batch*`), content index (`_zimage_content`), manifest, images.

Printed per size: wall, ms per image, peak RSS, bytes written to ledger / index / manifest, the final
ledger's size, files written, and what was paid. Then, at the largest size, a re-run under
`reuse="content"` with 1% of the rows changed: what it paid and its wall against the first run's.

Checked (exit status 1 when one fails; ratios measured side by side in this one run):
  ms per image at the largest size within 1.3x of 1,000's; peak RSS under 1 GB (at 100,000);
  ledger bytes written within 3x the final ledger; the 1% re-run pays exactly 1% and takes under a
  quarter of the first run's wall.

    .venv/bin/python bench/batch_scale.py            # 1,000 and 10,000 (a few minutes on 2 cores)
    .venv/bin/python bench/batch_scale.py --full     # and 100,000 (tens of minutes)
    .venv/bin/python bench/batch_scale.py --smoke    # 100 and 300, seconds (make bench-smoke)
    .venv/bin/python bench/batch_scale.py --sizes 10000 --profile rerun.prof   # cProfile of the re-run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._server import server_process  # noqa: E402

API_KEY = "test-key"
SIZE = 128


def rows(n: int, changed: int = 0) -> list[dict[str, Any]]:
    """A product table of `n` rows with SKU seeds (its own products: the sizes share no picture); the
    first `changed` rows got new packaging."""
    return [
        {
            "prompt": f"studio photo of product {i} of {n}" + (" (new packaging)" if i < changed else ""),
            "seed": i,
        }
        for i in range(n)
    ]


def kind_of(path: str) -> str:
    if "_zimage_batch" in path:
        return "ledger"
    if "_zimage_content" in path:
        return "index"
    if path.endswith("manifest.json"):
        return "manifest"
    if "_zimage_spend" in path:
        return "spend"
    return "images"


def child(args: argparse.Namespace) -> None:
    """One task instance in this process; prints one JSON line of figures."""
    home = Path(args.home)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_ZIMAGE_DEFAULT": json.dumps(
                {
                    "conn_type": "zimage",
                    "host": args.url,
                    "password": API_KEY,
                    "extra": {"max_retries": 6, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 30},
                }
            ),
        }
    )
    from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator, read_manifest_entries
    from airflow_provider_zimage.storage import atomic
    from tests.dagtest import FakeTI

    written: dict[str, list[int]] = {}
    # Every local write of the storage layer goes through this one function (bytes are one chunk).
    real_chunks = atomic._write_local_chunks_atomic

    def count(path: str, size: int) -> None:
        figures = written.setdefault(kind_of(path), [0, 0])
        figures[0] += size
        figures[1] += 1

    def streamed(target: str, chunks: Iterable[bytes], durable: bool) -> None:
        sizes = [0]

        def counted() -> Iterator[bytes]:
            for part in chunks:
                sizes[0] += len(part)
                yield part

        real_chunks(target, counted(), durable)
        count(target, sizes[0])

    atomic._write_local_chunks_atomic = streamed
    op = ZImageBatchGenerateOperator(
        task_id="generate",
        requests=rows(args.n, args.changed),
        width=SIZE,
        height=SIZE,
        output_path=args.output,
        reuse="content",
        deferrable=False,
        # The test server answers at once: the first poll interval is the floor of each window's wait.
        poll_interval=0.05,
        max_poll_interval=2.0,
    )
    started = time.monotonic()
    cpu = time.process_time()
    summary = op.execute({"ti": FakeTI(args.run_id, dag_id="catalogue")})  # type: ignore[typeddict-item]
    wall = time.monotonic() - started
    cpu = time.process_time() - cpu
    directory = Path(summary["manifest_uri"].removeprefix("file://")).parent
    ledger_size = sum(
        p.stat().st_size for p in directory.rglob("*") if p.is_file() and "_zimage_batch" in str(p)
    )
    images = len(read_manifest_entries(summary["manifest_uri"]))
    print(
        json.dumps(
            {
                "n": args.n,
                "wall": wall,
                "cpu": cpu,
                "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "written": written,
                "ledger_size": ledger_size,
                "summary": summary,
                "manifest_images": images,
            }
        )
    )


def accepted(url: str) -> int:
    origin = url.rstrip("/").removesuffix("/v1")
    with urllib.request.urlopen(f"{origin}/_control/stats", timeout=30) as resp:
        return int(json.loads(resp.read())["total_accepted"])


def run_child(
    url: str, work: Path, n: int, run_id: str, changed: int = 0, profile: str = ""
) -> dict[str, Any]:
    home = work / "home"
    home.mkdir(exist_ok=True)
    before = accepted(url)
    command = [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []), __file__]
    command += ["--child", "--n", str(n), "--url", url, "--run-id", run_id]
    command += ["--output", f"file://{work}/out", "--home", str(home), "--changed", str(changed)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"the batch of {n} failed")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["paid"] = accepted(url) - before
    return figures


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="100 and 300 images, seconds")
    parser.add_argument("--full", action="store_true", help="also 100,000 images (tens of minutes)")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the sizes (smallest is the baseline)")
    parser.add_argument("--profile", default="", help="write a cProfile of the 1%% re-run to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", default="", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="", help=argparse.SUPPRESS)
    parser.add_argument("--home", default="", help=argparse.SUPPRESS)
    parser.add_argument("--changed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    sizes = args.sizes or ([100, 300] if args.smoke else [1_000, 10_000] + ([100_000] if args.full else []))
    sizes = sorted(sizes)
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="zimage-batch-scale-") as tmp,
        server_process("--port", "0", "--delay", "0", "--api-key", API_KEY) as url,
    ):
        work = Path(tmp)
        results = []
        print(
            f"{'images':>8} {'wall s':>8} {'ms/img':>7} {'CPU s':>7} {'peak RSS MB':>11} {'ledger MB':>9} "
            f"{'(final)':>8} {'index MB':>8} {'manifest MB':>11} {'files':>7} {'paid':>7}"
        )
        for n in sizes:
            r = run_child(url, work, n, f"scheduled__{n}")
            results.append(r)
            w = r["written"]
            files = sum(v[1] for v in w.values())
            print(
                f"{n:>8,} {r['wall']:>8.1f} {1000 * r['wall'] / n:>7.2f} {r['cpu']:>7.1f} "
                f"{r['rss_mb']:>11.0f} "
                f"{mb(w.get('ledger', [0])[0]):>9} {mb(r['ledger_size']):>8} {mb(w.get('index', [0])[0]):>8} "
                f"{mb(w.get('manifest', [0])[0]):>11} {files:>7,} {r['paid']:>7,}",
                flush=True,
            )
            if r["paid"] != n or r["summary"]["images"] != n or r["manifest_images"] != n:
                failures.append(f"{n}: paid {r['paid']}, stored {r['summary']['images']} (expected {n} each)")
            if w.get("ledger", [0])[0] > 3 * r["ledger_size"]:
                failures.append(
                    f"{n}: ledger bytes written {w['ledger'][0]} > 3x the final {r['ledger_size']}"
                )
        base, top = results[0], results[-1]
        ratio = (top["wall"] / top["n"]) / (base["wall"] / base["n"])
        cpu_ratio = (top["cpu"] / top["n"]) / (base["cpu"] / base["n"])
        print(
            f"\nms per image at {top['n']:,} / at {base['n']:,}: {ratio:.2f}x (target <= 1.3x); "
            f"CPU per image {cpu_ratio:.2f}x"
        )
        if ratio > 1.3:
            failures.append(f"ms per image grew {ratio:.2f}x from {base['n']} to {top['n']}")
        if top["n"] >= 100_000 and top["rss_mb"] >= 1000:
            failures.append(f"peak RSS {top['rss_mb']:.0f} MB at {top['n']} (target < 1000)")
        changed = max(1, top["n"] // 100)
        again = run_child(
            url, work, top["n"], f"scheduled__{top['n']}_again", changed=changed, profile=args.profile
        )
        share = again["wall"] / top["wall"]
        print(
            f"re-run of {top['n']:,} with {changed:,} rows changed (reuse='content'): "
            f"paid {again['paid']:,}, "
            f"reused {again['summary']['reused']:,}, wall {again['wall']:.1f} s = {share:.2f}x the first "
            f"run (target < 0.25x), peak RSS {again['rss_mb']:.0f} MB"
        )
        if again["paid"] != changed or again["summary"]["reused"] != top["n"] - changed:
            failures.append(f"the 1% re-run paid {again['paid']} (expected {changed})")
        # Below 10,000 images a run's fixed cost (imports, the first window) hides the per-image one.
        if share >= 0.25 and top["n"] >= 10_000:
            failures.append(f"the 1% re-run took {share:.2f}x the first run's wall")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
