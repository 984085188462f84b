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

It ends with the URL of the content pipeline run's Images tab (the provider's plugin view in the Airflow
UI). `make demo-ui` (`scripts/demo.py --ui`) serves that page: it starts `airflow api-server` on
127.0.0.1:8080 (ZIMAGE_DEMO_PORT, read each time `make demo-ui` starts, whatever port the demo itself
ran with) over the same home and output folder, with the simple auth manager letting everyone in as admin
(a throwaway, loopback-only Airflow), until Ctrl-C.

`airflow dags test` runs every task in its own process and prints the task logs instead of writing log
files, so the UI's Logs tab would have nothing to read. The demo echoes that output and also writes each
task attempt's lines (between dag.test()'s "[DAG TEST] starting" and "end task" lines) as JSON log lines
to the file Airflow's log reader opens for it: `[logging] base_log_folder` / `log_filename_template`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / ".demo"
DAGS_FOLDER = ROOT / "dags"
DEMO_DAGS = ("zimage_quickstart", "zimage_content_pipeline")
LAST_RUN = DEMO_DIR / "last-run.json"
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
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


def ui_url(env: Mapping[str, str]) -> str:
    """Where `make demo-ui` serves the Airflow UI (loopback only): ZIMAGE_DEMO_PORT, default 8080."""
    raw = env.get("ZIMAGE_DEMO_PORT", "").strip() or "8080"
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise SystemExit(f"ZIMAGE_DEMO_PORT must be a port number between 1 and 65535 (got {raw!r})")
    return f"http://127.0.0.1:{int(raw)}"


def rebase(url: str, base: str) -> str:
    """`url` on the scheme, host and port of `base`: a URL the demo printed, for today's `make demo-ui`."""
    return base.rstrip("/") + urlsplit(url)._replace(scheme="", netloc="").geturl()


def airflow_env(backend: Backend, home: Path, output: Path, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of every `airflow` command: a private home, SQLite, the repo's DAGs.

    `[api] base_url` is the demo UI's, so the operator's extra link points at the Images tab there.
    """
    env = dict(base)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__ZIMAGE__OUTPUT_PATH": output.as_uri(),
            "AIRFLOW__API__BASE_URL": ui_url(base),
            "AIRFLOW_CONN_ZIMAGE_DEFAULT": json.dumps(backend.connection),
            "ZIMAGE_IMAGE_SIZE": str(backend.image_size),
        }
    )
    return env


def ui_env(env: Mapping[str, str]) -> dict[str, str]:
    """The API server's environment: the demo's, with everyone let in as admin (no login page)."""
    return {
        **env,
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__WORKERS": "1",
    }


def images_tab(env: Mapping[str, str], manifest: Mapping[str, Any]) -> str:
    """The Airflow UI page of the Images tab of the run that wrote `manifest` (the plugin's view)."""
    from airflow_provider_zimage.ui.links import images_tab_url

    return images_tab_url(manifest["dag_id"], manifest["run_id"], base_url=env["AIRFLOW__API__BASE_URL"])


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(?P<task>\S+) map_index=(?P<index>-?\d+)")
_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=\S+ map_index=-?\d+")
_CONSOLE_LINE = re.compile(
    r"^(?P<timestamp>\d{4}-\d\d-\d\dT[\d:.]+Z?) \[(?P<level>[a-z]+)\s*\] (?P<event>.*)$"
)


def _log_record(line: str) -> str:
    """One printed line as the JSON line Airflow's log reader parses (level and time when it has them)."""
    found = _CONSOLE_LINE.match(line)
    if found is None:
        return json.dumps({"event": line})
    return json.dumps({"timestamp": found["timestamp"], "level": found["level"], "event": found["event"]})


def write_task_logs(
    lines: Iterable[str], dag_id: str, run_id: str, folder: Path, template: str
) -> list[Path]:
    """Each task attempt's lines of an `airflow dags test` transcript, in the file the UI reads for it.

    dag.test() runs task instances one after the other and frames each attempt (deferrals included)
    with "[DAG TEST] starting task_id=... map_index=..." and "... end task ...": the lines in between
    are that attempt's log; the n-th frame of a task instance is its attempt n.
    """
    import jinja2

    attempts: dict[tuple[str, int], int] = {}
    logs: dict[Path, list[str]] = {}
    current: list[str] | None = None
    root = folder.resolve()
    for line in lines:
        if start := _TASK_START.search(line):
            key = (start["task"], int(start["index"]))
            attempts[key] = attempt = attempts.get(key, 0) + 1
            ti = SimpleNamespace(
                dag_id=dag_id, run_id=run_id, task_id=key[0], map_index=key[1], try_number=attempt
            )
            name = jinja2.Template(template).render(ti=ti, try_number=attempt)
            path = (folder / name).resolve()
            if not path.is_relative_to(root):
                raise SystemExit(f"demo failed: log file {name!r} would be outside {folder}")
            current = logs.setdefault(path, [])
        if current is not None:
            current.append(_log_record(line))
        if _TASK_END.search(line):
            current = None
    for path, records in logs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{record}\n" for record in records))
    return list(logs)


def dags_test(dag_id: str, env: Mapping[str, str]) -> list[str]:
    """`airflow dags test DAG_ID`, its output shown as it comes and returned (for `write_task_logs`)."""
    command = [sys.executable, "-m", "airflow", "dags", "test", dag_id]
    lines = []
    with subprocess.Popen(
        command, env=dict(env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
    if process.returncode != 0:
        raise SystemExit(f"demo failed: `airflow dags test {dag_id}` exited with {process.returncode}")
    sys.stdout.flush()
    return lines


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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_ui(env: Mapping[str, str], home: Path, urls: list[str]) -> int:
    """`airflow api-server` for the demo's home on loopback, until Ctrl-C; prints `urls` once it answers."""
    import httpx

    base = env["AIRFLOW__API__BASE_URL"]
    port = base.rsplit(":", 1)[1]
    log_path = home / "api-server.log"
    print(f"Starting the Airflow API server on {base} (log: {log_path})...", flush=True)
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", port],
            env=ui_env(env),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # Ctrl-C reaches this process only (the server has its own session); SIGTERM is handled the same way.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                print(log_path.read_text()[-3000:], file=sys.stderr)
                raise SystemExit(f"demo failed: the API server exited with {server.returncode}")
            try:
                if httpx.get(f"{base}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"demo failed: the API server did not answer on {base}; see {log_path}")
            time.sleep(0.5)
        banner(
            "\n".join(["The Airflow UI is up (everyone is admin; loopback only). Ctrl-C stops it.", *urls])
        )
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return 0


def serve_last_run() -> int:
    """`make demo-ui`: serve the Airflow of the last `make demo`, with its output folder and backend."""
    if not LAST_RUN.is_file():
        raise SystemExit("Nothing to show yet: run `make demo` first.")
    last = json.loads(LAST_RUN.read_text())
    env = dict(os.environ)
    env.update(last["env"])
    # Today's ZIMAGE_DEMO_PORT, not the one the demo ran with (last-run.json remembers that one).
    env["AIRFLOW__API__BASE_URL"] = ui_url(os.environ)
    tab = rebase(last["images_tab"], env["AIRFLOW__API__BASE_URL"])
    urls = [f"Images tab of the last demo run: {tab}", "Task logs: its Logs tab, from any task of that run."]
    return serve_ui(env, Path(last["env"]["AIRFLOW_HOME"]), urls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ui", action="store_true", help="serve the Airflow UI of the last demo run (make demo-ui)"
    )
    if parser.parse_args(argv).ui:
        return serve_last_run()
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

    from airflow.configuration import conf

    logs = Path(conf.get("logging", "base_log_folder"))
    log_template = conf.get("logging", "log_filename_template")
    runs, task_logs = {}, 0
    for dag_id in DEMO_DAGS:
        banner(f"airflow dags test {dag_id}")
        before = run_folders(output, dag_id)
        transcript = dags_test(dag_id, env)
        runs[dag_id] = new_run_folder(output, dag_id, before)
        run_id = json.loads(next(runs[dag_id].rglob("manifest.json")).read_text())["run_id"]
        task_logs += len(write_task_logs(transcript, dag_id, run_id, logs, log_template))

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
        f"Task logs ({task_logs}):    {logs} (the UI's Logs tab reads them)",
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
    pipeline_manifest = json.loads(next(found["images"].rglob("manifest.json")).read_text())
    tab = images_tab(env, pipeline_manifest)
    keep = ("AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__LOAD_EXAMPLES")
    keep += ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__ZIMAGE__OUTPUT_PATH", "AIRFLOW__API__BASE_URL")
    LAST_RUN.write_text(json.dumps({"images_tab": tab, "env": {k: env[k] for k in keep}}, indent=2))
    lines += [
        f"Images tab:        {tab}",
        "                   (the run's images and cost in the Airflow UI: `make demo-ui` serves it; "
        "ZIMAGE_DEMO_PORT=... make demo-ui serves it on another port)",
    ]
    banner("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
