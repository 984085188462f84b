"""Every benchmark has a `--smoke` mode, and `make test` runs them all.

Benchmarks that nothing runs rot: `bench/triggerer_load.py` crashed on a changed trigger event for
weeks. `make bench-smoke` runs each `bench/*.py --smoke`; these tests make a new bench without the flag,
or a Makefile that stops running the smoke, fail the unit suite. The source is read, not imported:
importing a bench pulls in torch or starts nothing useful, and the flag's behaviour is what
`make bench-smoke` checks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = sorted(p for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))


def declared_flags(source: str) -> set[str]:
    """The option strings of every `<parser>.add_argument(...)` call in a script."""
    flags: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
        ):
            strings = (a.value for a in node.args if isinstance(a, ast.Constant))
            flags.update(s for s in strings if isinstance(s, str))
    return flags


def makefile_rule(target: str) -> tuple[list[str], str]:
    """A Makefile rule's prerequisites and recipe."""
    text = (REPO / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:([^\n]*)\n((?:\t[^\n]*\n)*)", text, re.MULTILINE)
    assert match, f"no `{target}` rule in the Makefile"
    return match.group(1).split(), match.group(2)


def test_the_benches_are_found():
    assert len(BENCHES) >= 8, [p.name for p in BENCHES]


@pytest.mark.parametrize("bench", BENCHES, ids=lambda p: p.name)
def test_every_bench_accepts_smoke(bench: Path):
    assert "--smoke" in declared_flags(bench.read_text()), (
        f"{bench.relative_to(REPO)} has no --smoke option: add one (tiny sizes, seconds, same code path), "
        "`make bench-smoke` runs it"
    )


def test_a_bench_without_smoke_is_noticed():
    # The check above must be able to fail: a parser with other options but no --smoke.
    source = "import argparse\np = argparse.ArgumentParser()\np.add_argument('--runs', type=int)\n"
    assert "--smoke" not in declared_flags(source)
    assert "--smoke" in declared_flags(source + "p.add_argument('--smoke', action='store_true')\n")


def test_make_test_runs_every_bench_smoke():
    prerequisites, _ = makefile_rule("test")
    assert "bench-smoke" in prerequisites
    _, recipe = makefile_rule("bench-smoke")
    # The loop takes every bench/*.py but _*.py, so a new bench is smoked without editing the Makefile.
    assert "bench/[!_]*.py" in recipe and "--smoke" in recipe
    assert "bench/gpu_check.sh --smoke" in recipe


def test_gpu_check_measures_step_caching_and_controlnet():
    # The next lent GPU runs one script: gpu_check.sh. The cache on/off and ControlNet figures must come
    # out of it, and bench/accel_check.py (smoked above like every bench) is what prints them.
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    assert "bench/accel_check.py" in script
    source = (REPO / "bench" / "accel_check.py").read_text()
    for figure in ("steps_computed", "psnr_db", "controlnet_seconds_per_image", "not built yet"):
        assert figure in source, figure


def test_the_engine_bench_smoke_runs_where_the_engine_is_installed():
    # bench/engine_throughput.py needs real SGLang workers (.venv-sglang): `make bench-smoke` leaves it
    # to `make test-sglang`, which `make test` runs, so its smoke still runs on every `make test`.
    _, loop = makefile_rule("bench-smoke")
    assert "bench/engine_throughput.py) echo" in loop
    prerequisites, _ = makefile_rule("test")
    assert "test-sglang" in prerequisites
    sglang_prerequisites, recipe = makefile_rule("test-sglang")
    assert "install-sglang" in sglang_prerequisites
    assert "bench/engine_throughput.py --smoke" in recipe and "-m sglang tests/sglang" in recipe
