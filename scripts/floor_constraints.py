"""Derive the Airflow floor's constraints file from the newest one (Makefile `constraints-floor`).

Resolving the floor from scratch sends pip backtracking through hundreds of provider releases for tens of
minutes. Starting from the pins the suite already passes with, swapping the Airflow pin, and dropping
only the pins the resolver names as conflicting keeps every other version identical on both tested
Airflows, so a difference between the two runs is Airflow's, not a dependency's.

Usage: python scripts/floor_constraints.py VENV_PYTHON AIRFLOW_VERSION SOURCE TARGET
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HEADER = (
    "# Exact versions the unit suite is tested with on the Airflow floor (its newest patch); see README\n"
    '# "Compatibility". Regenerate with make constraints-floor (scripts/floor_constraints.py).\n'
)
CONFLICT = re.compile(r"The user requested \(constraint\) ([A-Za-z0-9_.-]+?)==")
DEPENDER = re.compile(r"^    ([A-Za-z0-9_.-]+) [0-9][^ ]* depends on", re.M)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(line: str) -> str | None:
    head = line.split("==", 1)[0].strip()
    return _norm(head) if head and not head.startswith("#") and "==" in line else None


def main(python: str, airflow: str, source: str, target: str) -> int:
    keep = {"apache-airflow"}
    pins = [
        line
        for line in Path(source).read_text().splitlines(keepends=True)
        if _name(line) not in {"apache-airflow", "apache-airflow-core", "apache-airflow-task-sdk"}
    ]
    pins.append(f"apache-airflow=={airflow}\n")
    work = Path(target + ".work")
    install = [python, "-m", "pip", "install", "-r", "requirements-cpu.txt", "-c", str(work)]
    install += ["-e", ".[local,s3,dev]"]
    for _ in range(60):
        work.write_text("".join(pins))
        answer = subprocess.run([*install, "--dry-run"], capture_output=True, text=True)
        text = answer.stdout + answer.stderr
        if answer.returncode == 0:
            break
        bad = {_norm(n) for n in CONFLICT.findall(text) + DEPENDER.findall(text)} - keep
        if not bad:
            sys.stderr.write(text[-3000:])
            return 1
        print("re-resolving:", ", ".join(sorted(bad)), flush=True)
        pins = [line for line in pins if _name(line) not in bad]
    subprocess.run([*install, "-q"], check=True)
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    lines = [line for line in frozen.splitlines(keepends=True) if "airflow-provider-zimage" not in line]
    Path(target).write_text(HEADER + "".join(lines))
    work.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
