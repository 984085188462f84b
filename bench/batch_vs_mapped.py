"""N mapped `ZImageGenerateOperator` tasks vs one `ZImageBatchGenerateOperator`, in a real deployment.

The e2e harness's Airflow deployment (`tests/e2e/harness.py`: api-server, scheduler with the
LocalExecutor, dag-processor and triggerer as separate processes, SQLite) against the Runware test
server with a fixed generation delay, everything on this machine, one run:

(a) N mapped `ZImageGenerateOperator` tasks, deferrable (`--mapped-n`, default N);
(b) one `ZImageBatchGenerateOperator` over the same number of requests, deferrable, default settings;
    then the same batch (other rows) with `defer_after=0` (batch*) and `defer_after=5` (batch5, the
    earlier default; left out of the smoke);
(floor) a bare client in this process, no Airflow: the same N requests submitted in chunks of 100
    through `ZImageHook`, polled with batched `getResponse` every 0.5 s, downloaded by 8 threads and
    written with their sha256, which is the API's own speed plus download and store.

Printed for (a) and (b): wall time (trigger to DAG run success, and the image task instance's own
duration), images per minute, the ratio of wall time to the floor, CPU seconds of each Airflow
component over the run (the scheduler's figure includes its LocalExecutor workers and their task
processes), metadata-DB rows added, and submissions paid. Then the batch's re-run figures: the same
DAG run cleared and run again, a new run with 1% of the rows changed, and a new run of the same rows
under `reuse="content"` (each with what it paid).

    .venv/bin/python bench/batch_vs_mapped.py [--n 1000 --mapped-n 1000 --delay 10]
    (quick look: --n 100 --delay 2)
    .venv/bin/python bench/batch_vs_mapped.py --smoke   # 4 images, 0.5 s delay (make bench-smoke)

The smoke runs all of the above but the mapped run, at tiny sizes, in a real deployment (about a
minute, most of it the deployment's start and stop and the deferral settle window), and exits
non-zero when a run fails or paid other than what the re-run figures promise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import sqlite3
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.dags import HEADER
from tests.e2e.harness import Deployment, DeploymentConfig

MAPPED = "bench_mapped"
BATCH = "bench_batch"
# The same batch (other rows, so nothing is reused) deferring at once: its trigger's settle window
# ([zimage] deferral_settle_seconds, 10 s from the deferral) then overlaps the generation time.
BATCH_NOW = "bench_batch_defer_at_once"
# And deferring after 5 s, the earlier default (now 5 s plus the settle window): answers that come
# within the window after the deferral are held until it ends.
BATCH_AT_5 = "bench_batch_defer_after_5"
POLL = {"poll_interval": 0.5, "max_poll_interval": 2.0}

DAGS = {
    MAPPED: """
with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False,
         default_args={{"retries": 3, "retry_delay": timedelta(seconds=2)}}):
    @task
    def rows():
        return [{{"prompt": f"mapped catalogue row {{i}}", "seed": 50_000 + i}} for i in range({n})]

    ZImageGenerateOperator.partial(
        task_id="generate", width=256, height=256, deferrable=True, **json.loads({poll!r}),
    ).expand_kwargs(rows())
""",
    BATCH: """
from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator

with DAG({dag_id!r}, schedule=None, start_date=START, catchup=False,
         default_args={{"retries": 3, "retry_delay": timedelta(seconds=2)}}):
    @task
    def rows(**context):
        # A product table: the first `changed` rows got new packaging since the last run.
        changed = int(context["dag_run"].conf.get("changed", 0))
        salt = str(context["dag_run"].conf.get("salt", ""))  # another round: new rows, nothing reused
        return [
            {{"prompt": f"{prefix}{{salt}} row {{i}}" + (" (new packaging)" if i < changed else ""),
              "seed": 10_000 + i}}
            for i in range({n})
        ]

    ZImageBatchGenerateOperator(
        task_id="generate", requests=rows(), width=256, height=256, deferrable=True, reuse="content",
        **json.loads({poll!r}), **json.loads({extra!r}),
    )
""",
}


def db_rows(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return sum(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables)


def accepted(deployment: Deployment) -> int:
    assert deployment.control is not None
    return int(deployment.control.stats()["total_accepted"])


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 1) for k in after if k != "runware"}


def measure(
    deployment: Deployment, dag_id: str, *, conf: dict[str, Any] | None = None, clear: str = ""
) -> dict:
    """One DAG run (or, with `clear`, that run cleared and run again): wall, CPU, DB rows, paid."""
    api = deployment.api
    assert api is not None
    rows0, cpu0, paid0 = (
        db_rows(deployment.home / "airflow.db"),
        deployment.cpu_seconds(),
        accepted(deployment),
    )
    started = time.monotonic()
    if clear:
        run_id = clear
        resp = api.request(
            "POST",
            f"/api/v2/dags/{dag_id}/clearTaskInstances",
            json={"dag_run_id": run_id, "task_ids": ["generate"], "dry_run": False, "only_failed": False},
        )
        resp.raise_for_status()
    else:
        run_id = f"bench_{uuid.uuid4().hex[:8]}"
        api.trigger(dag_id, run_id, conf)
    run = api.wait_dag_run(dag_id, run_id, timeout=3600)
    wall = time.monotonic() - started
    if run["state"] != "success":
        raise SystemExit(f"{dag_id} {run_id} ended {run['state']}: see {deployment.component_logs}")
    tis = [ti for ti in api.task_instances(dag_id, run_id) if ti["task_id"] == "generate"]
    # The image task(s) from the first start to the last end: what the run spent making images.
    task_wall = (
        max(datetime.fromisoformat(t["end_date"]) for t in tis)
        - min(datetime.fromisoformat(t["start_date"]) for t in tis)
    ).total_seconds()
    return {
        "run_id": run_id,
        "wall": wall,
        "task_wall": task_wall,
        "task_instances": len(tis),
        "tries": sum(int(t["try_number"]) for t in tis),
        "cpu": cpu_delta(cpu0, deployment.cpu_seconds()),
        "rows": db_rows(deployment.home / "airflow.db") - rows0,
        "paid": accepted(deployment) - paid0,
    }


def bare_client(deployment: Deployment, n: int, folder: Path) -> float:
    """The floor: the same work without Airflow, from this process, with the hook the operators use."""
    from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

    folder.mkdir(parents=True)
    settings = ConnectionSettings(base_url=deployment.runware_url, api_key=deployment.config.api_key)
    requests = [
        ImageInferenceRequest.build(
            model="runware:z-image@turbo",
            positivePrompt=f"bare client catalogue row {i}",
            width=256,
            height=256,
            seed=90_000 + i,
        )
        for i in range(n)
    ]
    with ZImageHook("bench", settings=settings) as hook:
        started = time.monotonic()
        for i in range(0, n, 100):
            hook.submit(requests[i : i + 100])
        pending = [r.task_uuid for r in requests]
        results: dict[str, Any] = {}
        while pending:
            time.sleep(0.5)
            for i in range(0, len(pending), 100):
                for result in hook.get_responses(pending[i : i + 100]).results:
                    results[result.task_uuid] = result
            pending = [u for u in pending if u not in results]

        def store(item: tuple[str, Any]) -> str:
            data = hook.download(item[1])
            tmp = folder / f".{item[0]}.tmp"
            tmp.write_bytes(data)
            tmp.rename(folder / f"{item[0]}.png")
            return hashlib.sha256(data).hexdigest()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            digests = list(pool.map(store, results.items()))
        elapsed = time.monotonic() - started
    assert len(set(digests)) == n, "the bare client stored fewer distinct images than it asked for"
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000, help="images of the batch (and the floor)")
    parser.add_argument("--mapped-n", type=int, default=None, help="mapped task instances (default --n)")
    parser.add_argument("--delay", type=float, default=10.0, help="server-side seconds per generation")
    parser.add_argument("--skip-mapped", action="store_true", help="only the batch, the floor and re-runs")
    parser.add_argument("--rounds", type=int, default=1, help="batch, batch* and batch5 runs each")
    parser.add_argument("--smoke", action="store_true", help="seconds, tiny sizes (make bench-smoke)")
    args = parser.parse_args()
    if args.smoke:
        # Mapped left out: its first run alone was 23 s, and the e2e suite runs that operator already;
        # its DAG is still parsed (wait_for_dags), so a broken template fails here too.
        args.n, args.delay, args.skip_mapped = 4, 0.5, True
    mapped_n = args.n if args.mapped_n is None else args.mapped_n
    changed = max(1, args.n // 100)

    sources = {
        MAPPED: HEADER + DAGS[MAPPED].format(dag_id=MAPPED, n=mapped_n, poll=json.dumps(POLL)),
        BATCH: HEADER
        + DAGS[BATCH].format(dag_id=BATCH, n=args.n, poll=json.dumps(POLL), prefix="catalogue", extra="{}"),
        BATCH_NOW: HEADER
        + DAGS[BATCH].format(
            dag_id=BATCH_NOW, n=args.n, poll=json.dumps(POLL), prefix="deferred", extra='{"defer_after": 0}'
        ),
        BATCH_AT_5: HEADER
        + DAGS[BATCH].format(
            dag_id=BATCH_AT_5, n=args.n, poll=json.dumps(POLL), prefix="at five", extra='{"defer_after": 5}'
        ),
    }
    with Deployment(sources, DeploymentConfig(runware_delay=args.delay)) as deployment:
        assert deployment.control is not None
        deployment.wait_for_dags([MAPPED, BATCH, BATCH_NOW, BATCH_AT_5])
        deployment.control.configure(delay=args.delay)
        floor = bare_client(deployment, args.n, deployment.home / "bare")
        mapped = None if args.skip_mapped else measure(deployment, MAPPED)
        batch = measure(deployment, BATCH)
        batch_now = measure(deployment, BATCH_NOW)
        # Left out of the smoke: the same deferral path as batch*, plus its 10 s window.
        batch_at_5 = None if args.smoke else measure(deployment, BATCH_AT_5)
        # More rounds in the reverse order, on new rows: the first run of a deployment starts cold.
        extra_rounds = []
        for r in range(1, args.rounds):
            salt = {"salt": f" round {r}"}
            at_5 = measure(deployment, BATCH_AT_5, conf=salt)
            extra_rounds.append(
                (r, measure(deployment, BATCH, conf=salt), measure(deployment, BATCH_NOW, conf=salt), at_5)
            )
        again = measure(deployment, BATCH, clear=batch["run_id"])
        one_pct = measure(deployment, BATCH, conf={"changed": changed})
        next_day = measure(deployment, BATCH, conf={"changed": changed})

    print(
        f"{args.n} images (mapped: {mapped_n}), 256x256, server delay {args.delay:g} s per image; "
        f"Airflow deployment: {Path(sys.executable).parent.parent.name}, SQLite, LocalExecutor, "
        f"parallelism {deployment.config.parallelism}"
    )
    print(f"floor (bare client: submit, batched getResponse, 8 downloads at once, store): {floor:.1f} s")
    print(
        f"{'':<7} {'images':>6} {'run wall s':>10} {'task wall s':>11} {'images/min':>10} "
        f"{'run/floor':>9} {'task/floor':>10} {'DB rows':>7} {'paid':>5}  CPU s by component"
    )
    rows = [
        ("mapped", mapped, mapped_n),
        ("batch", batch, args.n),
        ("batch*", batch_now, args.n),
        ("batch5", batch_at_5, args.n),
    ]
    for r, again_batch, again_now, again_at_5 in extra_rounds:
        rows += [(f"batch5/{r}", again_at_5, args.n), (f"batch/{r}", again_batch, args.n)]
        rows.append((f"batch*/{r}", again_now, args.n))
    for label, f, count in rows:
        if f is None:
            continue
        print(
            f"{label:<7} {count:>6} {f['wall']:>10.1f} {f['task_wall']:>11.1f} "
            f"{count * 60 / f['wall']:>10.0f} "
            f"{f['wall'] / floor:>9.2f} {f['task_wall'] / floor:>10.2f} {f['rows']:>7} {f['paid']:>5}  "
            f"{json.dumps(f['cpu'])} (total {sum(f['cpu'].values()):.0f}); tries {f['tries']}"
        )
    if mapped is not None:
        rate = (args.n / batch["wall"]) / (mapped_n / mapped["wall"])
        print(f"batch vs mapped: {rate:.1f}x the images per minute")
    print("batch: default settings (defer_after None: 5 s + [zimage] deferral_settle_seconds)")
    print("batch*: the same batch with defer_after=0 (defers at once; the settle overlaps generation)")
    if extra_rounds:
        print("x/N: round N+1, in the reverse order, on new rows")
    if batch_at_5 is not None:
        print("batch5: the same batch with defer_after=5 (the earlier default)")
    print(f"re-run (the same DAG run cleared): paid {again['paid']}, wall {again['wall']:.1f} s")
    print(
        f"new run, {changed} of {args.n} rows changed: paid {one_pct['paid']}, wall {one_pct['wall']:.1f} s"
    )
    print(f"new run, same rows, reuse='content': paid {next_day['paid']}, wall {next_day['wall']:.1f} s")
    expected = {
        "mapped": (mapped, mapped_n),
        "batch": (batch, args.n),
        "batch*": (batch_now, args.n),
        "batch5": (batch_at_5, args.n),
        "re-run": (again, 0),
        "changed rows": (one_pct, changed),
        "same rows": (next_day, 0),
    }
    for r, again_batch, again_now, again_at_5 in extra_rounds:
        expected |= {
            f"batch/{r}": (again_batch, args.n),
            f"batch*/{r}": (again_now, args.n),
            f"batch5/{r}": (again_at_5, args.n),
        }
    wrong = [f"{k} paid {f['paid']}, not {n}" for k, (f, n) in expected.items() if f and f["paid"] != n]
    print(
        json.dumps(
            {
                "floor": floor,
                "mapped": mapped,
                "batch": batch,
                "batch_defer_at_once": batch_now,
                "batch_defer_after_5": batch_at_5,
                "rounds": [
                    {"batch": b, "batch_defer_at_once": n, "batch_defer_after_5": f}
                    for _, b, n, f in extra_rounds
                ],
                "again": again,
                "changed": one_pct,
                "next_day": next_day,
            }
        )
    )
    if wrong:
        raise SystemExit("paid other than expected: " + "; ".join(wrong))


if __name__ == "__main__":
    main()
