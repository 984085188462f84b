"""`make demo`: run the example DAGs in a throwaway Airflow and show where the images went.

Everything lives under `.demo/` in the repository (gitignored): an AIRFLOW_HOME with a SQLite database,
the generated images, and, without an API key, a tiny random-weight Z-Image model built offline. The
DAGs are the repository's own `dags/`, run with `airflow dags test` exactly as a user would.

Which backend, decided by the environment (the DAGs never change; only the `zimage_default` connection,
passed as AIRFLOW_CONN_ZIMAGE_DEFAULT, does):

* RUNWARE_API_KEY set: the Runware API (connection password = key, backend runware). Real images, real
  cost (about $0.003 per 1024x1024 image; 7 images). RUNWARE_BASE_URL overrides the API URL.
* ZIMAGE_MODEL_PATH set: diffusers on this machine with those weights (a diffusers folder or a Hugging
  Face id), on the GPU if there is one.
* Neither: a `zimage-executor` on loopback serving the tiny model (built on first use) on the CPU; the
  DAGs submit to it and defer, exactly as they would to Runware, and it is stopped at the end. Its
  weights are random, so the pictures are coloured noise: it proves the pipeline, not the model.

ZIMAGE_IMAGE_SIZE overrides the image side (default 256 for the tiny model, 1024 otherwise).

Every demo is a new DAG run (`airflow dags test` names runs after the moment they start), so it
generates again; the folders of earlier runs stay next to it until `make clean`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / ".demo"
DAGS_FOLDER = ROOT / "dags"
DEMO_DAGS = ("zimage_quickstart", "zimage_content_pipeline")
POOLS = {
    "zimage_api": {"slots": 8, "description": "Concurrent Runware requests (zimage_daily_backfill)"},
    "gpu": {"slots": 1, "description": "One slot per GPU (zimage_local_gpu)"},
}


@dataclass(frozen=True)
class Backend:
    """What the demo runs on, and everything that follows from it."""

    name: str  # "runware", "local" or "tiny"
    connection: dict[str, Any] = field(repr=False)
    image_size: int
    output_label: str  # separate folders: a tiny-model run must never be "reused" as a real one
    notice: str

    @property
    def needs_tiny_model(self) -> bool:
        return self.name == "tiny"


def _size(env: Mapping[str, str], default: int) -> int:
    raw = env.get("ZIMAGE_IMAGE_SIZE", "").strip()
    return int(raw) if raw else default


def choose_backend(env: Mapping[str, str], tiny_model_dir: Path) -> Backend:
    """RUNWARE_API_KEY first, then ZIMAGE_MODEL_PATH, else the tiny offline model."""
    api_key = env.get("RUNWARE_API_KEY", "").strip()
    model_path = env.get("ZIMAGE_MODEL_PATH", "").strip()
    if api_key:
        connection: dict[str, Any] = {
            "conn_type": "zimage",
            "password": api_key,
            "extra": {"backend": "runware"},
        }
        if env.get("RUNWARE_BASE_URL", "").strip():
            connection["host"] = env["RUNWARE_BASE_URL"].strip()
        ignored = " (ZIMAGE_MODEL_PATH is ignored while RUNWARE_API_KEY is set)" if model_path else ""
        return Backend(
            name="runware",
            connection=connection,
            image_size=_size(env, 1024),
            output_label="runware",
            notice=f"Backend: the Runware API, with the key in RUNWARE_API_KEY{ignored}. "
            "These are real Z-Image-Turbo images and Runware bills them (about $0.003 each at 1024x1024).",
        )
    if model_path:
        digest = hashlib.sha256(model_path.encode()).hexdigest()[:8]
        return Backend(
            name="local",
            connection={"conn_type": "zimage", "extra": {"backend": "local", "model_path": model_path}},
            image_size=_size(env, 1024),
            output_label=f"local-{digest}",
            notice=f"Backend: diffusers on this machine with the weights in ZIMAGE_MODEL_PATH={model_path}.",
        )
    return Backend(
        name="tiny",
        # host and token are filled in once the executor is listening (see main)
        connection={"conn_type": "zimage", "extra": {"backend": "executor"}},
        image_size=_size(env, 256),
        output_label="tiny-random-weights",
        notice="Backend: a zimage-executor started on 127.0.0.1 for this demo, serving a TINY Z-Image "
        f"model whose weights are RANDOM (built offline in {tiny_model_dir}) on the CPU; the DAGs submit "
        "to it deferrably (deferrable=True), as they would to Runware: images ready within defer_after "
        "(5 s) are stored without deferring.\nThe images will be coloured "
        "noise: they prove that the pipeline works (DAG -> operator -> storage -> manifest -> contact "
        "sheet), not what Z-Image draws.\n"
        "For real pictures: RUNWARE_API_KEY=<your key> make demo, or ZIMAGE_MODEL_PATH=<Z-Image-Turbo "
        "weights> make demo on a GPU.",
    )


def airflow_env(backend: Backend, home: Path, output: Path, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of every `airflow` command: a private home, SQLite, the repo's DAGs."""
    env = dict(base)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__ZIMAGE__OUTPUT_PATH": output.as_uri(),
            "AIRFLOW_CONN_ZIMAGE_DEFAULT": json.dumps(backend.connection),
            "ZIMAGE_IMAGE_SIZE": str(backend.image_size),
        }
    )
    return env


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def airflow(args: list[str], env: Mapping[str, str], *, quiet: bool = False) -> None:
    """Run `airflow ARGS` with this interpreter (the venv's), failing the demo if it fails."""
    command = [sys.executable, "-m", "airflow", *args]
    result = subprocess.run(command, env=dict(env), cwd=ROOT, capture_output=quiet, text=True)
    if result.returncode != 0:
        if quiet:
            print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"demo failed: `airflow {' '.join(args)}` exited with {result.returncode}")


def run_folders(output: Path, dag_id: str) -> set[Path]:
    """The run folders of a DAG: the operator stores images under {output_path}/{dag_id}/{run_id}/."""
    return {path for path in (output / dag_id).glob("*") if path.is_dir()}


def new_run_folder(output: Path, dag_id: str, before: set[Path]) -> Path:
    """The folder of the run `airflow dags test` just made (its run id is the moment it started)."""
    created = run_folders(output, dag_id) - before
    if len(created) != 1:
        raise SystemExit(f"demo failed: expected one new run folder under {output / dag_id}, found {created}")
    return created.pop()


def check_outputs(quickstart: Path, pipeline: Path) -> dict[str, Path]:
    """The demo's promises, checked on disk rather than trusted from exit codes."""
    found = {
        "quickstart manifest": quickstart / "generate" / "unmapped" / "manifest.json",
        "images": pipeline / "generate",
        "contact sheet": pipeline / "contact_sheet.png",
        "gallery": pipeline / "gallery.html",
    }
    missing = [f"{what}: {path}" for what, path in found.items() if not path.exists()]
    if missing:
        raise SystemExit("demo failed: expected outputs are missing:\n  " + "\n  ".join(missing))
    return found


def main() -> int:
    started = time.monotonic()
    home = DEMO_DIR / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    backend = choose_backend(os.environ, DEMO_DIR / "tiny-zimage")
    output = DEMO_DIR / "output" / backend.output_label
    output.mkdir(parents=True, exist_ok=True)
    env = airflow_env(backend, home, output, os.environ)
    # This process imports the provider too (storage paths below): give it the demo's Airflow settings
    # first, so importing Airflow never creates or reads ~/airflow.
    os.environ.update(env)
    banner(backend.notice + f"\nImage size: {backend.image_size}x{backend.image_size}")

    executor = None
    if backend.needs_tiny_model:
        from airflow_provider_zimage.executor.process import ExecutorProcess
        from airflow_provider_zimage.testing.tiny_model import build_tiny_zimage, is_built

        if not is_built(DEMO_DIR / "tiny-zimage"):
            print("Building the tiny random-weight Z-Image model (once)...", flush=True)
        build_tiny_zimage(DEMO_DIR / "tiny-zimage")
        executor = ExecutorProcess(
            {"runware:z-image@turbo": str(DEMO_DIR / "tiny-zimage")},
            DEMO_DIR / "executor",
            "--devices",
            "cpu",
        ).start()
        print(f"Started zimage-executor (pid {executor.process.pid}) at {executor.url}", flush=True)
        env["AIRFLOW_CONN_ZIMAGE_DEFAULT"] = json.dumps(executor.connection())
        env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] = "True"
        os.environ.update(env)
    try:
        return _run(backend, env, home, output, started, executor)
    finally:
        if executor is not None:
            code = executor.stop()
            print(f"Stopped zimage-executor (exit code {code}); its log: {executor.log_path}", flush=True)


def _run(
    backend: Backend, env: dict[str, str], home: Path, output: Path, started: float, executor: Any
) -> int:

    print(f"AIRFLOW_HOME={home}\nDAGS_FOLDER={DAGS_FOLDER}\nOutput: {output}", flush=True)
    print("Preparing the metadata database (airflow db migrate)...", flush=True)
    airflow(["db", "migrate"], env, quiet=True)
    pools_file = home / "pools.json"
    pools_file.write_text(json.dumps(POOLS))
    airflow(["pools", "import", str(pools_file)], env, quiet=True)

    runs = {}
    for dag_id in DEMO_DAGS:
        banner(f"airflow dags test {dag_id}")
        before = run_folders(output, dag_id)
        airflow(["dags", "test", dag_id], env)
        runs[dag_id] = new_run_folder(output, dag_id, before)

    found = check_outputs(runs["zimage_quickstart"], runs["zimage_content_pipeline"])
    manifest = json.loads(found["quickstart manifest"].read_text())
    images = sorted(p for p in found["images"].rglob("*") if p.suffix in (".jpg", ".png", ".webp"))
    elapsed = time.monotonic() - started
    lines = [
        f"Done in {elapsed:.0f}s on backend '{backend.name}' ({manifest['images'][0]['width']}px images).",
        f"Quickstart image:  {manifest['images'][0]['uri'].removeprefix('file://')}",
        f"Its manifest:      {found['quickstart manifest']}",
        f"Images ({len(images)}):        {found['images']}/<map index>/",
        f"Contact sheet:     {found['contact sheet']}",
        f"Gallery:           {found['gallery']}",
    ]
    if executor is not None:
        health = executor.health()
        lines.append(
            f"Every image was made by the zimage-executor at {executor.url}: it loaded the model "
            f"{health['loads']} time(s) for all tasks (deferrable tasks; none held the model)."
        )
    if backend.needs_tiny_model:
        lines.append(
            "These images come from RANDOM weights (noise, by design). An API key (RUNWARE_API_KEY=...) or "
            "real weights (ZIMAGE_MODEL_PATH=...) give real pictures with the same DAGs."
        )
    banner("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
