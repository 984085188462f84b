"""The spend index: one small record per written manifest, so the "Z-Image spend" page never lists a bucket.

Layout, under the artifact store's base (`[zimage] output_path`)::

    .zimage-index/days/{YYYY-MM-DD}/{record}.json     one per manifest write (UTC day of the write)
    .zimage-index/days/{YYYY-MM-DD}/summary.json      that day, totalled per DAG once the day is over

Why this shape:

* Many task instances finish at once (a mapped task of 200 prompts). One file per manifest write means no
  writer ever reads, modifies and rewrites a shared object, so concurrent writers cannot lose each
  other's spend on S3, where there is no append and no lock.
* The record name is a digest of the manifest's directory and of what it stored (the images' sha256s,
  the failed requests), so writing the same manifest twice (a retry that reuses its images and rewrites
  the manifest) replaces its record instead of counting the money twice, while a regeneration (new
  images, paid again) adds a record.
* Reading the last 30 days is 30 small listings of one folder each. A day that is over is folded into
  `summary.json` the first time the page reads it, so old days cost one GET.
* The dot prefix keeps the index out of any DAG's folder: `storage.safe_segment` never produces a
  segment starting with ".".

Index writes are best effort: they happen after the manifest (the commit marker of paid images) is on
storage, and a failure is logged, never raised, because losing a line of the spend report must not fail
a task whose images are already paid for and stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from airflow.sdk import ObjectStoragePath

from airflow_provider_zimage.storage.atomic import write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["INDEX_DIR", "DaySpend", "SpendRecord", "read_spend", "record_manifest"]

INDEX_DIR = ".zimage-index"
SUMMARY_NAME = "summary.json"
INDEX_VERSION = 1


@dataclass(frozen=True)
class SpendRecord:
    """What one manifest write cost: the row the spend page adds up."""

    day: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    images: int
    failed: int
    cost: float
    manifest: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": INDEX_VERSION, **self.__dict__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpendRecord:
        return cls(
            day=str(data["day"]),
            dag_id=str(data["dag_id"]),
            run_id=str(data.get("run_id", "")),
            task_id=str(data.get("task_id", "")),
            map_index=int(data.get("map_index", -1)),
            images=int(data.get("images", 0)),
            failed=int(data.get("failed", 0)),
            cost=float(data.get("cost") or 0.0),
            manifest=str(data.get("manifest", "")),
        )


@dataclass
class DaySpend:
    """Images, failed requests and cost of one DAG on one UTC day."""

    day: str
    dag_id: str
    images: int = 0
    failed: int = 0
    cost: float = 0.0
    runs: int = 0


def _day(when: dt.datetime | None) -> str:
    return (when or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).date().isoformat()


def _days_dir(base: ObjectStoragePath) -> ObjectStoragePath:
    return base / INDEX_DIR / "days"


def _record_name(directory: str, manifest: Mapping[str, Any]) -> str:
    stored = sorted(str(i.get("sha256", i.get("uri", ""))) for i in manifest.get("images") or [])
    failed = len(manifest.get("failed") or [])
    key = json.dumps([directory, stored, failed, manifest.get("task_uuid")], sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32] + ".json"


def record_manifest(
    base: ObjectStoragePath,
    directory: ObjectStoragePath,
    manifest: Mapping[str, Any],
    *,
    now: dt.datetime | None = None,
) -> ObjectStoragePath | None:
    """Write the spend record of a manifest just written to `directory`; None (logged) if it failed."""
    images = manifest.get("images") or []
    cost = manifest.get("total_cost")
    if cost is None:
        cost = sum(float(i.get("cost") or 0.0) for i in images)
    day = _day(now)
    record = SpendRecord(
        day=day,
        dag_id=str(manifest.get("dag_id") or ""),
        run_id=str(manifest.get("run_id") or ""),
        task_id=str(manifest.get("task_id") or ""),
        map_index=int(manifest.get("map_index", -1) if manifest.get("map_index") is not None else -1),
        images=len(images),
        failed=len(manifest.get("failed") or []),
        cost=round(float(cost), 6),
        manifest=str(directory),
    )
    if not record.dag_id:
        return None
    target = _days_dir(base) / day / _record_name(str(directory), manifest)
    try:
        return write_json_atomic(target, record.to_dict())
    except Exception as exc:  # the images are stored and paid; a missing report line must not fail the task
        log.warning("Could not write the spend index record %s: %s", target, exc)
        return None


def _read_json(path: ObjectStoragePath) -> Any:
    return json.loads(path.fs.cat_file(path.path).decode("utf-8"))


def _day_records(folder: ObjectStoragePath) -> Iterable[SpendRecord]:
    try:
        names = folder.fs.ls(folder.path, detail=False)
    except FileNotFoundError:
        return
    for name in sorted(str(n) for n in names):
        leaf = name.rstrip("/").rsplit("/", 1)[-1]
        if not leaf.endswith(".json") or leaf == SUMMARY_NAME or leaf.startswith("."):
            continue
        try:
            yield SpendRecord.from_dict(_read_json(folder / leaf))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("Ignoring unreadable spend record %s/%s: %s", folder, leaf, exc)


def _aggregate(day: str, records: Iterable[SpendRecord]) -> dict[str, DaySpend]:
    per_dag: dict[str, DaySpend] = {}
    runs: dict[str, set[str]] = {}
    for record in records:
        row = per_dag.setdefault(record.dag_id, DaySpend(day=day, dag_id=record.dag_id))
        row.images += record.images
        row.failed += record.failed
        row.cost = round(row.cost + record.cost, 6)
        runs.setdefault(record.dag_id, set()).add(record.run_id)
    for dag_id, row in per_dag.items():
        row.runs = len(runs[dag_id])
    return per_dag


def _read_day(base: ObjectStoragePath, day: str, *, compact: bool) -> dict[str, DaySpend]:
    folder = _days_dir(base) / day
    summary = folder / SUMMARY_NAME
    try:
        data = _read_json(summary)
        return {row["dag_id"]: DaySpend(**row) for row in data["dags"]}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("Ignoring unreadable spend summary %s: %s", summary, exc)
        compact = False
    per_dag = _aggregate(day, _day_records(folder))
    if compact and per_dag:
        try:
            write_json_atomic(
                summary, {"version": INDEX_VERSION, "dags": [row.__dict__ for row in per_dag.values()]}
            )
        except Exception as exc:  # read-only credentials on the API server: stay correct, just slower
            log.info("Could not write the spend summary %s: %s", summary, exc)
    return per_dag


def read_spend(base: ObjectStoragePath, *, days: int = 30, today: dt.date | None = None) -> list[DaySpend]:
    """Per DAG per day for the last `days` UTC days (today included), newest day first.

    Days before yesterday are complete (records are filed under the day they are written), so they are
    folded into their summary; today and yesterday are always read from their records.
    """
    today = today or dt.datetime.now(dt.timezone.utc).date()
    rows: list[DaySpend] = []
    for offset in range(days):
        day = today - dt.timedelta(days=offset)
        per_dag = _read_day(base, day.isoformat(), compact=offset >= 2)
        rows.extend(sorted(per_dag.values(), key=lambda r: r.dag_id))
    return rows
