"""The support table (runware/support.py) covers every seed parameter, and docs/backends.md shows it as it is.

A parameter with no row is a parameter nobody decided about: the local backends would pass it through
silently. A page that is not regenerated tells users the old story. Both fail here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage.runware import support
from airflow_provider_zimage.runware.support import (
    BACKENDS,
    ROWS,
    find,
    note,
    refusals,
    refused,
    refused_parameters,
)
from airflow_provider_zimage.testing.runware_server.schema import seeds_dir
from scripts import parity_table

_TYPE_LINE = re.compile(r"^(string|integer|float|number|boolean|object|array)")
_PLAIN_NAME = re.compile(r"[A-Za-z][A-Za-z»]*")
_MD_HEADING = re.compile(r"^(#{3,4}) \[(\w+)\]\([^)]*#request-([a-z0-9-]+)\)")
_MD_PATH = re.compile(r"^- \*\*Path\*\*: `([\w.]+)`")


def _openapi(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for name, prop in schema.get("properties", {}).items():
        yield prefix + name
        if "properties" in prop:
            yield from _openapi(prop, f"{prefix}{name}.")
        items = prop.get("items")
        if isinstance(items, dict) and "properties" in items:
            yield from _openapi(items, f"{prefix}{name}.")


def _plain_page(text: str) -> Iterator[str]:
    """Pages 000, 002, 004: a name on its own line, its type on the next; `parent»childchild` nested."""
    lines = [line.strip() for line in text.splitlines()]
    for line, following in zip(lines, lines[1:], strict=False):
        if _PLAIN_NAME.fullmatch(line) and _TYPE_LINE.match(following):
            if "»" in line:
                group, doubled = line.split("»", 1)
                yield f"{group}.{doubled[: len(doubled) // 2]}"
            else:
                yield line


def _markdown_page(text: str) -> Iterator[str]:
    """Page 001: `### [name](...#request-name)` top level, else the `Path` line under the heading."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        heading = _MD_HEADING.match(line)
        if not heading:
            continue
        name, anchor = heading.group(2), heading.group(3)
        if heading.group(1) == "###" and anchor == name.lower():
            yield name
            continue
        path = next((m.group(1) for m in map(_MD_PATH.match, lines[index + 1 : index + 4]) if m), None)
        if path and path.endswith("." + name):
            yield path


def seed_parameters(directory: Path) -> dict[str, set[str]]:
    """Every imageInference request parameter each seed file names, dotted (`controlNet.model`)."""
    found: dict[str, set[str]] = {}
    for page in sorted(directory.glob("0*.txt")):
        text = page.read_text(encoding="utf-8")
        if text.lstrip().startswith("{"):
            items = json.loads(text)["components"]["schemas"]["RequestBody"]["items"]
            found[page.name] = set(_openapi(items))
        elif text.startswith("---"):
            found[page.name] = set(_markdown_page(text.split("## Response", 1)[0]))
        else:
            found[page.name] = set(_plain_page(text))
    return found


def _dotted(parameter: str) -> str:
    return parameter.replace("[]", "")


def test_every_seed_parameter_has_a_row_in_the_support_table() -> None:
    pages = seed_parameters(seeds_dir())
    assert pages, f"no seed pages in {seeds_dir()}"
    rows = {_dotted(row.parameter) for row in ROWS}
    for page, parameters in pages.items():
        assert parameters - rows == set(), f"{page} names parameters runware/support.py has no row for"


def test_every_row_is_a_seed_parameter() -> None:
    every = set().union(*seed_parameters(seeds_dir()).values())
    assert {_dotted(row.parameter) for row in ROWS} - every == set(), "a row for a parameter no seed names"
    assert len({row.parameter for row in ROWS}) == len(ROWS), "a parameter has two rows"


def test_the_seed_walk_reads_every_page_down_to_nested_members() -> None:
    # The walk must see what only one page has, or the coverage test above checks nothing.
    pages = seed_parameters(seeds_dir())
    every = set().union(*pages.values())
    assert {"safety.checkContent", "controlNet.guideImage", "acceleratorOptions.fbCache"} <= every
    names = {name[:3] for name in pages}
    if {"000", "004"} <= names:  # the shared seeds (the vendored copy has the OpenAPI document only)
        assert "ultralytics.inpaintSize" in every and "acceleration" in every
        assert all(len(parameters) > 30 for parameters in pages.values()), {
            k: len(v) for k, v in pages.items()
        }


def test_docs_backends_shows_the_current_parity_table() -> None:
    text = parity_table.DOC.read_text(encoding="utf-8")
    assert parity_table.current(text) == parity_table.render(), (
        "docs/backends.md's parity table is stale: python -m scripts.parity_table --write"
    )


def test_a_changed_row_makes_the_page_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    text = parity_table.DOC.read_text(encoding="utf-8")
    changed = tuple(replace(r, executor=note("changed")) if r.parameter == "seed" else r for r in ROWS)
    monkeypatch.setattr(parity_table, "ROWS", changed)
    assert parity_table.current(text) != parity_table.render()
    seed = find("seed").openai_images.cell()
    assert f"| `seed` | yes | yes, but: changed | yes | {seed} |" in parity_table.updated(text)


def test_the_parity_table_has_a_column_for_every_backend_and_a_cell_for_every_row() -> None:
    lines = parity_table.render().splitlines()
    assert lines[2] == "| parameter | Runware | executor | in-process | openai_images |"
    assert len(BACKENDS) == 4
    rows = [line for line in lines if line.startswith("| `")]
    assert [line.split("`")[1] for line in rows] == [row.parameter for row in ROWS]
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in rows]  # "\|" inside a cell is text
    assert all(len(row) == 1 + len(BACKENDS) for row in cells), [row for row in cells if len(row) != 5]
    refused_here = [row.parameter for row in ROWS if row.openai_images.status == "refused"]
    assert refused_here and all(
        "**refused**" in line.rsplit(" | ", 1)[1] for line in rows if line.split("`")[1] in refused_here
    ), "the openai_images column shows what the table refuses"


def test_a_refused_group_is_refused_once_naming_the_group() -> None:
    wire = {"controlNet": [{"model": "runware:1@1", "guideImage": "x", "startStep": 1}]}
    if find("controlNet").executor.status != "refused":
        pytest.skip("controlNet is served on the executor now")
    assert [name for name, _, _ in refusals(wire, "executor")] == ["controlNet"]
    assert "controlNet[].startStep" not in refused_parameters("executor")


def test_a_refused_member_of_a_served_list_is_named_with_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # After ControlNet is served, one member may stay refused: the error must say which list item.
    rows = tuple(
        replace(
            r,
            executor=refused("no step windows")
            if r.parameter == "controlNet[].startStep"
            else support.SERVED,
        )
        if r.parameter.startswith("controlNet")
        else r
        for r in ROWS
    )
    monkeypatch.setattr(support, "ROWS", rows)
    monkeypatch.setattr(support, "_BY_PARAMETER", {r.parameter: r for r in rows})
    wire = {"controlNet": [{"model": "a"}, {"model": "b", "startStep": 2}]}
    assert refusals(wire, "executor") == [("controlNet[1].startStep", "no step windows", 2)]


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({"acceleration": "none"}, []),
        ({"acceleration": "high"}, ["acceleration"]),
        ({"safety": {"checkContent": False}}, []),
        ({"safety": {"checkContent": True}}, ["safety.checkContent"]),
        ({"webhookURL": "https://example.com/hook"}, ["webhookURL"]),
    ],
)
def test_a_value_that_asks_for_nothing_is_not_refused(wire: dict[str, Any], expected: list[str]) -> None:
    for name in expected:
        if find(name).in_process.status != "refused":
            pytest.skip(f"{name} is served in-process now")
    assert [name for name, _, _ in refusals(wire, "in-process")] == expected
