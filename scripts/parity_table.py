"""docs/backends.md's parity table, generated from airflow_provider_zimage/runware/support.py.

    python -m scripts.parity_table            # print the table
    python -m scripts.parity_table --check    # exit 1 when docs/backends.md is stale
    python -m scripts.parity_table --write    # rewrite the table in docs/backends.md

The table lives between two markers in the page; everything else of the page is left alone.
tests/test_parity_table.py fails when the page and the support table disagree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airflow_provider_zimage.runware.support import BACKENDS, ROWS, Row, parent  # noqa: E402

DOC = ROOT / "docs" / "backends.md"
START = (
    "<!-- parity-table:start: generated from airflow_provider_zimage/runware/support.py by "
    "`python -m scripts.parity_table --write`; edit the rows there, not here -->"
)
END = "<!-- parity-table:end -->"
HEADER = {
    "runware": "Runware",
    "executor": "executor",
    "in-process": "in-process",
    "openai_images": "openai_images",
}


def _cell(row: Row, backend: str) -> str:
    support = row.on(backend)  # type: ignore[arg-type]
    up = parent(row.parameter)
    if up is not None and support.status == "refused":
        group = next(r for r in ROWS if r.parameter == up).on(backend)  # type: ignore[arg-type]
        if group.status == "refused" and group.text == support.text:
            return f"**refused** (with `{up}`)"
    return support.cell().replace("|", "\\|")


def render() -> str:
    """The table, markers included."""
    lines = [
        START,
        "",
        "| parameter | " + " | ".join(HEADER[b] for b in BACKENDS) + " |",
        "| --- | " + " | ".join("---" for _ in BACKENDS) + " |",
    ]
    for row in ROWS:
        cells = " | ".join(_cell(row, backend) for backend in BACKENDS)
        lines.append(f"| `{row.parameter}` | {cells} |")
    lines += ["", END]
    return "\n".join(lines)


def current(text: str) -> str | None:
    """The table as the page has it, markers included; None when the page has no markers."""
    if START not in text or END not in text:
        return None
    begin = text.index(START)
    return text[begin : text.index(END, begin) + len(END)]


def updated(text: str) -> str:
    """`text` with its table replaced by a fresh one (appended when the page has none)."""
    old = current(text)
    if old is None:
        return text.rstrip("\n") + "\n\n" + render() + "\n"
    return text.replace(old, render())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/backends.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/backends.md is stale")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    if args.write:
        DOC.write_text(updated(text), encoding="utf-8")
        print(f"wrote the parity table ({len(ROWS)} rows) to {DOC.relative_to(ROOT)}")
        return 0
    if args.check:
        if current(text) != render():
            print(
                f"{DOC.relative_to(ROOT)} is stale: python -m scripts.parity_table --write", file=sys.stderr
            )
            return 1
        return 0
    print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
