"""Turn the e2e figures (results.json) into the Markdown table of docs/reliability.md.

    python -m tests.e2e.report [results.json]            # print the table
    python -m tests.e2e.report [results.json] --write    # replace it in the README
    python -m tests.e2e.report --distributed [--write]   # the same for results-distributed.json


The table sits between two HTML comments in the document, so a re-run updates figures and leaves the
prose alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results.json"
DOC = HERE.parents[1] / "README.md"
START = "<!-- e2e-results:start -->"
END = "<!-- e2e-results:end -->"
DIST_START = "<!-- e2e-distributed:start -->"
DIST_END = "<!-- e2e-distributed:end -->"


def results_path() -> Path:
    """`$E2E_RESULTS` when set (CI keeps it as an artifact), else tests/e2e/results.json."""
    return Path(os.environ.get("E2E_RESULTS") or DEFAULT_RESULTS)


def table(results: dict[str, Any]) -> str:
    rows = [
        "| # | Scenario | Load | Faults injected | Images expected | Stored (sha256 verified) "
        "| Duplicate submissions | Wall time |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for s in sorted(results.get("scenarios", []), key=lambda s: str(s["number"])):
        if s.get("skipped"):
            rows.append(
                f"| {s['number']} | {s['title']} | {s['load']} | {s['faults']} | - | - | - | "
                f"skipped: {s['skipped']} |"
            )
            continue
        rows.append(
            f"| {s['number']} | {s['title']} | {s['load']} | {s['faults']} | {s['expected']} | "
            f"{s['stored']} | {s['duplicate_submissions']} | {s['wall_s']:.0f} s |"
        )
    env = results.get("environment", {})
    total = results.get("total_wall_s")
    foot = [
        "",
        f"Measured {env.get('date', '?')} on {env.get('cpus', '?')} CPU cores, "
        f"{env.get('memory_gib', '?')} GiB, Airflow {env.get('airflow', '?')}, "
        f"Python {env.get('python', '?')}, "
        f"SQLite + LocalExecutor (parallelism {env.get('parallelism', '?')}); deployment start "
        f"{env.get('startup_s', '?')} s; whole e2e run {total if total is not None else '?'} s.",
    ]
    return "\n".join(rows + foot)


def distributed_table(results: dict[str, Any]) -> str:
    """The distributed deployment's table: which nodes ran, what was killed, and its own footer."""
    rows = [
        "| # | Scenario | Nodes | Faults injected | Images expected | Stored (sha256 verified) "
        "| Duplicate submissions | Wall time |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for s in sorted(results.get("scenarios", []), key=lambda s: str(s["number"])):
        head = f"| {s['number']} | {s['title']} | {s['nodes']} | {s['faults']} |"
        if s.get("skipped") or s.get("xfailed"):
            rows.append(f"{head} - | - | - | {'xfail' if s.get('xfailed') else 'skipped'}: "
                        f"{s.get('skipped') or s.get('xfailed')} |")  # fmt: skip
            continue
        rows.append(
            f"{head} {s['expected']} | {s['stored']} | {s['duplicate_submissions']} | {s['wall_s']:.0f} s |"
        )
    env = results.get("environment", {})
    cpu = env.get("cpu_s_by_component") or {}
    cpu_text = ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])) or "?"
    settings = ", ".join(f"{k} {v}" for k, v in sorted((env.get("settings") or {}).items())) or "?"
    foot = [
        "",
        f"Measured {env.get('date', '?')} on {env.get('cpus', '?')} CPU cores, "
        f"{env.get('memory_gib', '?')} GiB, Airflow {env.get('airflow', '?')}, Python "
        f"{env.get('python', '?')}, {env.get('deployment', '?')}; every node on one machine (loopback). "
        f"Deployment start {env.get('startup_s', '?')} s {json.dumps(env.get('startup_breakdown_s') or {})}; "
        f"whole run {results.get('total_wall_s', '?')} s. Settings: {settings}. "
        f"CPU seconds per component over the whole run: {cpu_text}.",
    ]
    return "\n".join(rows + foot)


def details(results: dict[str, Any]) -> str:
    """One line of secondary figures per scenario (retries, conflicts, faults counted by the server)."""
    lines = []
    for s in sorted(results.get("scenarios", []), key=lambda s: str(s["number"])):
        extra = s.get("details") or {}
        if extra:
            parts = ", ".join(f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in extra.items())
            lines.append(f"- **{s['number']}. {s['title']}**: {parts}")
    return "\n".join(lines)


def render(results: dict[str, Any], *, distributed: bool = False) -> str:
    if distributed:
        body = distributed_table(results)
        return f"{DIST_START}\n{body}\n\nPer-scenario details:\n\n{details(results)}\n{DIST_END}"
    return f"{START}\n{table(results)}\n\nPer-scenario details:\n\n{details(results)}\n{END}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=None)
    parser.add_argument("--write", action="store_true", help=f"update the table in {DOC}")
    parser.add_argument("--distributed", action="store_true", help="the CeleryExecutor deployment's figures")
    args = parser.parse_args(argv)
    if args.distributed:
        from tests.e2e.distributed.settings import results_path as dist_results_path

        default, start, end = dist_results_path(), DIST_START, DIST_END
    else:
        default, start, end = results_path(), START, END
    results = json.loads((args.results or default).read_text())
    block = render(results, distributed=args.distributed)
    if not args.write:
        print(block)
        return 0
    text = DOC.read_text()
    if start not in text or end not in text:
        print(f"{DOC} has no {start} ... {end} block", file=sys.stderr)
        return 1
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    DOC.write_text(head + block + tail)
    print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
