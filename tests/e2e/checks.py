"""What every scenario ends with: the stored files against their manifests, and who paid for what.

Pure functions over the artifact folder, the Runware test server's stats and the REST API's answers, so
a failure message says exactly which image or which taskUUID broke a promise.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_zimage.storage.artifacts import safe_segment


@dataclass
class StoredImages:
    """The manifests of one DAG run, each image re-read and re-hashed."""

    manifests: int = 0
    images: int = 0
    task_uuids: set[str] = field(default_factory=set)
    entries: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # Batch manifests: the requests listed as failed, per task instance.
    failed: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)


def verify_stored(artifacts: Path, dag_id: str, run_id: str) -> StoredImages:
    """Every `manifest.json` of the run: each listed file exists and matches its sha256 and size."""
    out = StoredImages()
    run_dir = artifacts / safe_segment(dag_id) / safe_segment(run_id)
    for path in sorted(run_dir.glob("*/*/manifest.json")):
        manifest = json.loads(path.read_text())
        out.manifests += 1
        if manifest.get("task_uuid"):
            out.task_uuids.add(manifest["task_uuid"])
        if manifest.get("kind") == "batch":  # one manifest, a taskUUID per image
            out.task_uuids |= {i["task_uuid"] for i in manifest.get("images") or []}
            out.failed[(manifest["task_id"], int(manifest["map_index"]))] = manifest.get("failed") or []
        key = (manifest["task_id"], int(manifest["map_index"]))
        out.entries[key] = manifest.get("images") or []
        # A batch manifest has no task of its own: each of its images names the task that made it.
        out.task_uuids.update(i["task_uuid"] for i in manifest.get("images") or [] if i.get("task_uuid"))
        for image in manifest.get("images") or []:
            file = Path(str(image["uri"]).removeprefix("file://"))
            if not file.is_file():
                out.problems.append(f"{path}: {file} is missing")
                continue
            data = file.read_bytes()
            if hashlib.sha256(data).hexdigest() != image["sha256"] or len(data) != image["bytes"]:
                out.problems.append(f"{path}: {file} does not match its sha256/size")
                continue
            out.images += 1
    return out


def unlisted_images(artifacts: Path, dag_id: str, run_id: str) -> list[str]:
    """Image files of the run that no manifest lists: what a second store of one task would leave."""
    run_dir = artifacts / safe_segment(dag_id) / safe_segment(run_id)
    listed = set()
    for path in run_dir.glob("*/*/manifest.json"):
        listed |= {str(i["uri"]).removeprefix("file://") for i in json.loads(path.read_text())["images"]}
    files = (p for p in run_dir.glob("*/*/*") if p.suffix in (".jpg", ".png", ".webp"))
    return sorted(str(p) for p in files if str(p) not in listed)


def ledger_generations(artifacts: Path, dag_id: str, run_id: str) -> dict[str, int]:
    """map index -> the generation of its last submission (0: never regenerated under a new taskUUID)."""
    run_dir = artifacts / safe_segment(dag_id) / safe_segment(run_id)
    out = {}
    for path in sorted(run_dir.glob("*/*/_zimage_state.json")):
        submissions = json.loads(path.read_text())["submissions"].values()
        out[path.parent.name] = max((int(s["generation"]) for s in submissions), default=0)
    return out


def executor_stats(log: str) -> dict[str, Any]:
    """The zimage-executor's accepted submissions, read from its log in the shape of the Runware test
    server's `/stats` (`accepted`: taskUUID -> times), so `check_paid_once` judges both backends.

    Each process start logs "listening on" once; "Accepted task" lines before it are tasks a restarted
    executor resumes from its `--output-dir`, not new submissions: they are counted apart (`resumed`).
    """
    accepted: dict[str, int] = {}
    resumed: dict[str, int] = {}
    listening = True  # a log read from an offset starts inside a running process
    for line in log.splitlines():
        if "Loaded " in line and " task record(s)" in line:
            listening = False  # a new process reading what the previous one left
        elif " listening on " in line:
            listening = True
        elif (found := _ACCEPTED.search(line)) is not None:
            counts = accepted if listening else resumed
            counts[found.group(1)] = counts.get(found.group(1), 0) + 1
    return {"accepted": accepted, "resumed": resumed, "total_accepted": sum(accepted.values())}


_ACCEPTED = re.compile(r"Accepted task (\S+):")


def duplicate_submissions(stats: dict[str, Any]) -> int:
    """Submissions Runware accepted (and would bill) beyond the first for the same taskUUID."""
    return sum(n - 1 for n in stats["accepted"].values() if n > 1)


def check_paid_once(stats: dict[str, Any], stored: StoredImages, expected: int) -> list[str]:
    """Problems with "each image paid exactly once": what was accepted vs what was stored."""
    problems = list(stored.problems)
    accepted: dict[str, int] = stats["accepted"]
    if stored.images != expected:
        problems.append(f"{stored.images} verified images stored, expected {expected}")
    if len(accepted) != expected:
        problems.append(f"Runware accepted {len(accepted)} distinct tasks, expected {expected}")
    twice = {uuid: n for uuid, n in accepted.items() if n != 1}
    if twice:
        problems.append(f"taskUUIDs accepted more than once: {twice}")
    unpaid = stored.task_uuids - set(accepted)
    if unpaid:
        problems.append(f"manifests name taskUUIDs Runware never accepted: {sorted(unpaid)[:5]}")
    orphans = set(accepted) - stored.task_uuids
    if orphans:
        problems.append(f"paid-for tasks with no manifest: {sorted(orphans)[:5]}")
    return problems


def check_xcoms_match(stored: StoredImages, xcoms: dict[tuple[str, int], Any]) -> list[str]:
    """The XCom each task returned (from the REST API) lists exactly the files of its manifest."""
    problems = []
    for key, images in stored.entries.items():
        value = xcoms.get(key)
        if not isinstance(value, list):
            problems.append(f"{key}: XCom return_value is {value!r}, expected the manifest's images")
            continue
        got = sorted((i["uri"], i["sha256"]) for i in value)
        want = sorted((i["uri"], i["sha256"]) for i in images)
        if got != want:
            problems.append(f"{key}: XCom {got} != manifest {want}")
    return problems


def check_batch_summary(stored: StoredImages, key: tuple[str, int], summary: Any, requests: int) -> list[str]:
    """A batch's XCom is a small summary: its counts and manifest agree with the files stored."""
    if not isinstance(summary, dict):
        return [f"{key}: XCom return_value is {summary!r}, expected the batch summary"]
    problems = []
    images = stored.entries.get(key, [])
    if summary.get("images") != len(images) or summary.get("failed") != len(stored.failed.get(key, [])):
        problems.append(f"{key}: summary {summary} does not match the manifest's {len(images)} images")
    if not str(summary.get("manifest_uri", "")).endswith("/manifest.json"):
        problems.append(f"{key}: summary has no manifest_uri: {summary}")
    indexes = sorted(int(i["index"]) for i in images)
    if indexes != list(range(requests)):
        problems.append(f"{key}: manifest indexes are not 0..{requests - 1} once each")
    if len({i["uri"] for i in images}) != len(images):
        problems.append(f"{key}: an image file is listed twice")
    return problems


def tries_histogram(tis: list[dict[str, Any]], skip: tuple[str, ...] = ("collect",)) -> dict[int, int]:
    """How many image tasks needed 1, 2, ... tries (retries after kills, or Airflow's own races)."""
    hist: dict[int, int] = {}
    for ti in tis:
        if ti["task_id"] not in skip:
            hist[int(ti["try_number"])] = hist.get(int(ti["try_number"]), 0) + 1
    return dict(sorted(hist.items()))


def find_literals(texts: dict[str, str], literals: dict[str, str]) -> list[str]:
    """`where: what` for every literal found in any text (where -> text, what -> literal value)."""
    hits = []
    for where, text in texts.items():
        for what, literal in literals.items():
            if literal and literal in text:
                hits.append(f"{where}: {what}")
    return hits
