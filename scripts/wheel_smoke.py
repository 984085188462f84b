"""`make wheel-smoke`: build the sdist and the wheel, install the wheel alone into a fresh venv, use it.

The development venv has every extra and the source tree on `sys.path`, so it cannot notice a module
missing from the wheel, a data file left out of the package, or an import of a `dev` dependency
(pytest, hypothesis, moto...) from runtime code. This does what a user does: `python -m build`
(the wheel is built from the sdist, so the sdist is checked too), `pip install` of the wheel alone,
with neither the `dev` nor the `local` extra, into a new venv, then, from a folder outside the
repository:

* the package and its data files come from the venv, Airflow's providers manager lists the provider,
  its connection type and its plugin, and none of the `dev` or `local` packages is installed;
* every operator, sensor, trigger, hook and the plugin import;
* a DagBag of the repository's `dags/` has no import errors;
* `zimage_quickstart` runs through `dag.test()` against the packaged Runware test server: one image
  stored, its sha256 matching the manifest, one paid submission.

The new venv resolves against constraints-cpu.txt, so pip picks the versions the suite is tested with
from its cache; without the `local` extra it never installs torch. Everything lives in a temporary
folder that is removed afterwards (`--keep` keeps it and prints where).

    python scripts/wheel_smoke.py [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DIST_NAME = "airflow-provider-zimage"
PACKAGE = "airflow_provider_zimage"
DAG_IDS = {
    "zimage_quickstart",
    "zimage_content_pipeline",
    "zimage_catalogue",
    "zimage_daily_backfill",
    "zimage_local_gpu",
}
MODULES = [
    f"{PACKAGE}.operators.generate",
    f"{PACKAGE}.operators.batch",
    f"{PACKAGE}.sensors.task",
    f"{PACKAGE}.triggers.task",
    f"{PACKAGE}.triggers.batch",
    f"{PACKAGE}.hooks.runware",
    f"{PACKAGE}.plugin",
    f"{PACKAGE}.executor.cli",
    f"{PACKAGE}.testing.runware_server",
]
# What must NOT be there: the `dev` extra (and the `local` one, whose torch is the slow install).
NOT_INSTALLED = ["pytest", "hypothesis", "moto", "ruff", "mypy", "rfc3987", "torch", "diffusers"]
# Files a release must carry, in the sdist and in the wheel.
SDIST_FILES = ["LICENSE", "NOTICE", "CHANGELOG.md", "README.md", "pyproject.toml", f"{PACKAGE}/py.typed"]
WHEEL_FILES = [
    f"{PACKAGE}/py.typed",
    f"{PACKAGE}/testing/runware_server/seed_copy/003_923103d950f02562.txt",
]


SUMMARY = "  wheel-smoke: "


def _step(message: str, since: float) -> None:
    print(f"[wheel-smoke {time.monotonic() - since:5.1f} s] {message}", flush=True)


def _run(args: list[str], **kwargs: Any) -> None:
    subprocess.run(args, check=True, **kwargs)


def build(out: Path) -> tuple[Path, Path]:
    """`python -m build`: the sdist, then the wheel built from it (isolated build environments)."""
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True, text=True
    )
    if done.returncode != 0:
        print(done.stdout[-20000:], done.stderr[-20000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"wheel-smoke: python -m build failed (exit {done.returncode})")
    [sdist], [wheel] = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = {n.removeprefix(f"{top}/") for n in archive.getnames()}
    missing = [f for f in SDIST_FILES if f not in names]
    assert not missing, f"the sdist {sdist.name} lacks {missing}"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = [f for f in WHEEL_FILES if f not in names]
    missing += [f for f in ("LICENSE", "NOTICE") if not any(n.endswith(f"/licenses/{f}") for n in names)]
    assert not missing, f"the wheel {wheel.name} lacks {missing}"
    return sdist, wheel


def install(venv: Path, wheel: Path) -> Path:
    """A new venv with the wheel and its own dependencies only; returns its python."""
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-compile"]
        + ["-c", str(ROOT / "constraints-cpu.txt"), str(wheel)]
    )
    return python


def check(dags: Path) -> None:
    """Runs inside the fresh venv (`--check`), from a folder outside the repository."""
    import airflow_provider_zimage as provider

    where = Path(provider.__file__).resolve()
    assert where.is_relative_to(Path(sys.prefix).resolve()), f"imported from {where}, not the venv"
    assert not where.is_relative_to(ROOT), f"imported from the source tree: {where}"
    present = [name for name in NOT_INSTALLED if importlib.util.find_spec(name) is not None]
    assert not present, f"installed without extras, yet {present} are importable"
    from importlib.metadata import version

    assert version(DIST_NAME) == provider.__version__
    assert (where.parent / "py.typed").is_file()
    for module in MODULES:
        importlib.import_module(module)
    print(f"{SUMMARY}imported {len(MODULES)} modules from {where.parent}")

    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    info = manager.providers[DIST_NAME]
    assert info.version == provider.__version__, info
    assert "zimage" in manager.field_behaviours, sorted(manager.field_behaviours)  # the connection form
    assert [p.plugin_class for p in manager.plugins if p.provider_name == DIST_NAME] == [
        f"{PACKAGE}.plugin.ZImagePlugin"
    ]
    print(f"{SUMMARY}providers manager: {DIST_NAME} {info.version}, connection type zimage, ZImagePlugin")

    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef,attr-defined]
    bag = DagBag(dag_folder=str(dags))
    assert not bag.import_errors, bag.import_errors
    assert DAG_IDS <= set(bag.dags), sorted(bag.dags)
    print(f"{SUMMARY}DagBag of {dags}: {len(bag.dags)} DAGs, no import errors")

    from airflow.utils import db

    from airflow_provider_zimage.testing.runware_server import RunwareTestServer

    db.initdb()
    with RunwareTestServer() as server:
        os.environ["AIRFLOW_CONN_ZIMAGE_DEFAULT"] = json.dumps(
            {"conn_type": "zimage", "host": server.url, "password": server.api_key}
        )
        run = bag.dags["zimage_quickstart"].test()
        paid = server.total_accepted
    assert str(run.state) in ("success", "DagRunState.SUCCESS"), run.state
    output = Path(os.environ["AIRFLOW__ZIMAGE__OUTPUT_PATH"].removeprefix("file://"))
    [manifest_path] = output.glob("zimage_quickstart/*/generate/unmapped/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    [image] = manifest["images"]
    data = Path(image["uri"].removeprefix("file://")).read_bytes()
    assert hashlib.sha256(data).hexdigest() == image["sha256"]
    assert paid == 1, f"{paid} paid submissions for one image"
    print(f"{SUMMARY}dag.test() of zimage_quickstart: {run.state}, 1 image, {len(data)} B, sha256 ok, 1 paid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--check", type=Path, metavar="DAGS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        check(args.check)
        return 0

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="zimage-wheel-smoke-"))
    try:
        sdist, wheel = build(work / "dist")
        _step(f"built {sdist.name} and {wheel.name}", started)
        python = install(work / "venv", wheel)
        _step(f"installed {wheel.name} alone (no dev or local extra) into a fresh venv", started)
        home = work / "airflow"
        dags = shutil.copytree(ROOT / "dags", work / "dags", ignore=shutil.ignore_patterns("__pycache__"))
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV")) and key != "RUNWARE_API_KEY"
        }
        env.update(
            AIRFLOW_HOME=str(home),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(dags),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
            AIRFLOW__ZIMAGE__OUTPUT_PATH=(work / "artifacts").as_uri(),
            AIRFLOW__ZIMAGE__DEFERRAL_SETTLE_SECONDS="0",
            ZIMAGE_IMAGE_SIZE="256",
        )
        # -I: neither the script's folder nor PYTHON* variables reach sys.path, so only the venv's copy
        # of the package can be imported; the working directory is outside the repository too.
        done = subprocess.run(
            [str(python), "-I", str(Path(__file__).resolve()), "--check", str(dags)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:  # Airflow's task logs are long: show them only when something failed
            print(done.stdout[-20000:], done.stderr[-20000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"wheel-smoke: the installed wheel failed its check (exit {done.returncode})")
        print("".join(line + "\n" for line in done.stdout.splitlines() if line.startswith(SUMMARY)), end="")
        _step("the installed wheel imports, registers and runs zimage_quickstart", started)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
