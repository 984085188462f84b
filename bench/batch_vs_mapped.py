"""N mapped `ZImageGenerateOperator` tasks vs one `ZImageBatchGenerateOperator`, both deferrable, in one run.

Both DAGs run through `dag.test()` (Airflow's in-process scheduler loop, SQLite, triggers run inline)
against the Runware test server in its own process with a fixed generation delay. This is a proxy for a
deployment, and an unfair one to (a): `dag.test()` runs task instances one at a time, so N mapped
deferrable tasks take about N x delay here, where a real deployment runs them concurrently. It shows
Airflow's per-task-instance cost (a task run, a deferral and a scheduler round
each) against one task instance, not the figures of a multi-process scheduler/worker/triggerer setup.
Prints wall time, images per minute, the ratio of wall time to the server's floor (delay + the time to
download and store), CPU seconds of this process (scheduler + worker + triggerer are all in it here)
and metadata-DB rows written. Then the re-run figures of the batch: the same run again, 1% of the rows
changed, and `reuse="content"` under a new logical date, each with the submissions it paid for.

    .venv/bin/python bench/batch_vs_mapped.py [--n 1000 --delay 10]   (CI: --n 40 --delay 2)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_home = tempfile.mkdtemp(prefix="zimage-bench-batch-")
os.environ["AIRFLOW_HOME"] = _home
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(_home, "dags")

MAPPED = """
import pendulum
from airflow.sdk import DAG
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

with DAG("bench_mapped", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageGenerateOperator.partial(
        task_id="generate", width=256, height=256, output_path=PARAMS["output"], deferrable=True,
        defer_after=0, poll_interval=0.5, max_poll_interval=2.0,
    ).expand_kwargs(PARAMS["requests"])
"""

BATCH = """
import pendulum
from airflow.sdk import DAG
from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageBatchGenerateOperator(
        task_id="generate", requests=PARAMS["requests"], width=256, height=256, output_path=PARAMS["output"],
        deferrable=True, defer_after=0, poll_interval=0.5, max_poll_interval=2.0, reuse=PARAMS["reuse"],
    )
"""


def db_rows() -> int:
    from airflow.settings import engine
    from sqlalchemy import MetaData, func, select

    meta = MetaData()
    meta.reflect(engine)
    with engine.connect() as conn:
        return sum(
            conn.execute(select(func.count()).select_from(t)).scalar() or 0 for t in meta.tables.values()
        )


def run(name: str, source: str, logical_date: Any = None, **params: Any) -> dict[str, float]:
    from tests.dagtest import run_dag

    rows0, cpu0, t0 = db_rows(), time.process_time(), time.perf_counter()
    dag_run = run_dag(name, source, logical_date=logical_date, **params)
    wall = time.perf_counter() - t0
    if dag_run.state != "success":
        raise SystemExit(f"{name} ended {dag_run.state}")
    return {"wall": wall, "cpu": time.process_time() - cpu0, "rows": db_rows() - rows0}


def accepted(url: str) -> int:
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    return int(httpx.get(f"{parts.scheme}://{parts.netloc}/_control/stats").json()["total_accepted"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=10.0, help="server-side seconds per generation")
    args = parser.parse_args()

    import pendulum
    from airflow.utils import db

    from bench._server import server_process

    db.initdb()
    out = f"file://{_home}/artifacts"
    requests = [{"prompt": f"catalogue row {i}", "seed": 10_000 + i} for i in range(args.n)]
    with server_process("--api-key", "bench-key", "--delay", str(args.delay)) as url:
        os.environ["AIRFLOW_CONN_ZIMAGE_DEFAULT"] = json.dumps(
            {"conn_type": "zimage", "host": url, "password": "bench-key", "extra": {"timeout": 60}}
        )
        mapped = run("bench_mapped", MAPPED, output=out, requests=requests)
        paid_mapped = accepted(url)
        day1 = pendulum.datetime(2026, 5, 1, tz="UTC")
        batch = run(
            "bench_batch", BATCH, day1, dag_id="bench_batch", output=out, requests=requests, reuse="content"
        )
        paid_batch = accepted(url) - paid_mapped
        again = run(
            "bench_batch", BATCH, day1, dag_id="bench_batch", output=out, requests=requests, reuse="content"
        )
        paid_again = accepted(url) - paid_mapped - paid_batch
        changed = [dict(r) for r in requests]
        n_changed = max(1, args.n // 100)
        for r in changed[:n_changed]:
            r["prompt"] += " (new packaging)"
        ch = run(
            "bench_batch", BATCH, day1, dag_id="bench_batch", output=out, requests=changed, reuse="content"
        )
        paid_changed = accepted(url) - paid_mapped - paid_batch - paid_again
        day2 = pendulum.datetime(2026, 5, 2, tz="UTC")
        run("bench_batch", BATCH, day2, dag_id="bench_batch", output=out, requests=changed, reuse="content")
        paid_day2 = accepted(url) - paid_mapped - paid_batch - paid_again - paid_changed

    # The floor is the generation delay alone (download and store are not added), so the ratio is an
    # upper bound of the one the issue asks for.
    floor = args.delay
    print(
        f"images              {args.n}, server delay {args.delay:g} s "
        "(floor = the delay; download and store not added)"
    )
    for label, f, paid in (("mapped", mapped, paid_mapped), ("batch", batch, paid_batch)):
        print(
            f"{label:<8} wall {f['wall']:8.2f} s  {args.n * 60 / f['wall']:8.1f} images/min  "
            f"ratio to floor {f['wall'] / floor:6.2f}  CPU {f['cpu']:7.2f} s  "
            f"DB rows {f['rows']:6d}  paid {paid}"
        )
    print(f"batch vs mapped     {mapped['wall'] / batch['wall']:.1f}x the images per minute")
    print(f"re-run same run     paid {paid_again} (wall {again['wall']:.2f} s)")
    print(f"{n_changed} row(s) changed    paid {paid_changed} (wall {ch['wall']:.2f} s)")
    print(f"reuse=content, next logical date: paid {paid_day2}")


if __name__ == "__main__":
    main()
