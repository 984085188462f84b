"""What each backend does with each seed parameter: the one table the refusals, the docs and the tests read.

One DAG, two backends only holds if "the executor refuses X" is written down once. The local planner
(`local/planning.py`) refuses exactly the rows marked refused here, with the text written here; the
parity table of docs/backends.md is generated from these rows (`python -m scripts.parity_table --write`);
the conformance suite sends an example of every row to the Runware test server and to an executor and
checks that the executor serves what this table says it serves and refuses what it says it refuses.
A test also walks the seeds' `imageInference` parameters (nested groups too) and fails on one without a
row here.

Sans-IO: plain data and dictionary walks, no Airflow, no torch.

A row names a wire parameter by its path: `safety.checkContent`, `controlNet[].guideImage` (`[]`: every
element of the list). Each backend gets a `Support`: served, refused (its text is the refusal message,
`<parameter>: <text>`), or served with a note (its text says what differs from Runware). A refused row
under a refused group (`outpaint.top` under `outpaint`) is refused by its group: the request is refused
once, naming the group, as Runware names the first parameter it rejects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "BACKENDS",
    "ROWS",
    "Backend",
    "Row",
    "Support",
    "find",
    "parent",
    "refused_parameters",
    "refusals",
]

Backend = Literal["runware", "executor", "in-process"]
BACKENDS: tuple[Backend, ...] = ("runware", "executor", "in-process")
Status = Literal["served", "refused", "note"]


@dataclass(frozen=True)
class Support:
    """One backend's answer to one parameter. `text`: the refusal message (refused) or what differs."""

    status: Status
    text: str = ""

    def cell(self) -> str:
        """The parity table's cell: a word, then the reason or note."""
        word = {"served": "yes", "refused": "**refused**", "note": "yes, but"}[self.status]
        return f"{word}: {self.text}" if self.text else word


SERVED = Support("served")


def refused(text: str) -> Support:
    return Support("refused", text)


def note(text: str) -> Support:
    return Support("note", text)


@dataclass(frozen=True)
class Row:
    """One wire parameter. `accepts`: values a refusing backend still takes, because they ask for
    nothing (`acceleration: "none"`, `safety.checkContent: false`)."""

    parameter: str
    runware: Support
    executor: Support
    in_process: Support
    accepts: tuple[Any, ...] = field(default=())

    def on(self, backend: Backend) -> Support:
        return {"runware": self.runware, "executor": self.executor, "in-process": self.in_process}[backend]


def _row(
    parameter: str,
    local: Support = SERVED,
    *,
    runware: Support = SERVED,
    executor: Support | None = None,
    in_process: Support | None = None,
    accepts: tuple[Any, ...] = (),
) -> Row:
    """`local` is both local backends unless `executor=` / `in_process=` say otherwise."""
    return Row(parameter, runware, executor or local, in_process or local, accepts)


_DELIVERY = "is a Runware delivery option; local results are returned directly"
_NOT_URLS = "the worker stores the bytes itself; no URL is served"
_CONTROLNET = "needs a Z-Image ControlNet model, which the local backend does not load"
_ULTRALYTICS = "(face/hand detailing) is a Runware-side post-process"
_OUTPAINT = "is not available locally (diffusers has no Z-Image outpainting pipeline)"
_CACHE = "(step caching) is Runware-side; remove it for local runs"
_INPUT = (
    "base64, a data URI, a file under the allowed input folders or a URL on an allowed origin; "
    "a Runware image UUID is refused (only Runware can resolve it)"
)
_TWINFLOW_ONLY = "TwinFlow only"
_NOT_TWINFLOW = "not for TwinFlow"

# The seeds' imageInference parameters (OpenAPI seed 003, model pages 000-002 and TwinFlow's 004), in the
# order of the OpenAPI seed. Rows change with the backends: edit the row, then
# `python -m scripts.parity_table --write`; the conformance suite checks the row against the executor.
ROWS: tuple[Row, ...] = (
    _row("taskType"),
    _row("taskUUID", in_process=note("names the result; there is no queue to conflict with")),
    _row("webhookURL", executor=SERVED, in_process=refused(_DELIVERY)),
    _row("includeCost", executor=note("cost 0"), in_process=note("cost 0.0, reported even when not asked")),
    _row(
        "model",
        note(
            "runware:z-image@turbo and runware:z-image@0 on your weights; "
            "runware:twinflow-z-image-turbo@0 is refused (no diffusers pipeline)"
        ),
    ),
    _row("numberResults", in_process=note("image i is made with seed + i")),
    _row("uploadEndpoint", executor=SERVED, in_process=refused(_DELIVERY)),
    _row("ttl", executor=note("capped by --result-ttl"), in_process=note(_NOT_URLS)),
    _row("outputType", in_process=note(_NOT_URLS)),
    _row("outputFormat"),
    _row("outputQuality"),
    _row("deliveryMethod", in_process=note("the task waits for the images either way")),
    _row("safety"),
    _row(
        "safety.checkContent",
        refused("needs Runware's NSFW classifier; the local backend has none"),
        accepts=(False,),
    ),
    _row("safety.mode", note("no check runs; NSFWContent is always false")),
    _row("inputs", runware=note(_NOT_TWINFLOW)),
    _row("inputs.seedImage", note(_INPUT)),
    _row("inputs.maskImage", note(_INPUT + "; needs inputs.seedImage")),
    _row("positivePrompt", note("cut at the text encoder's 512 tokens")),
    _row("negativePrompt"),
    _row("width", note("a multiple of 16")),
    _row("height", note("a multiple of 16")),
    _row("seed"),
    _row("steps"),
    _row(
        "scheduler",
        note(
            "flow-matching ones only: Default, FlowMatchEulerDiscreteScheduler, Euler (Karras, "
            "Exponential, ancestral), LCM, UniPC (2M, 3M), DPM++ (2M, 3M, 2M SDE); others are refused"
        ),
    ),
    _row("CFGScale", note("passed as diffusers' guidance_scale: guidance runs for any value above 0")),
    _row("strength", runware=note(_NOT_TWINFLOW)),
    _row("maskMargin", refused("(crop-and-zoom inpainting) is not implemented by the local backend")),
    _row(
        "acceleration",
        refused("is Runware-side caching; the local backend runs every step (use 'none')"),
        runware=note(_TWINFLOW_ONLY),
        accepts=("none",),
    ),
    _row("acceleratorOptions", refused(_CACHE)),
    *(
        _row(f"acceleratorOptions.{name}", refused(_CACHE))
        for name in (
            "cacheEndStep",
            "cacheEndStepPercentage",
            "cacheMaxConsecutiveSteps",
            "cacheStartStep",
            "cacheStartStepPercentage",
            "fbCache",
            "fbCacheThreshold",
            "teaCache",
            "teaCacheDistance",
            "dbCache",
            "dbCacheThreshold",
            "dbCacheSkipInterval",
        )
    ),
    _row("outpaint", refused(_OUTPAINT), runware=note(_NOT_TWINFLOW)),
    *(_row(f"outpaint.{side}", refused(_OUTPAINT)) for side in ("top", "right", "bottom", "left")),
    _row("lora", note("file:/path, hf:owner/repo, or AIR ids mapped to files by whoever runs the backend")),
    _row("lora[].model", note("file:/path, hf:owner/repo, or an AIR id mapped with lora_paths / --lora")),
    _row("lora[].weight"),
    _row("lora[].transformer", note("ignored: Z-Image has one transformer")),
    _row("controlNet", refused(_CONTROLNET), runware=note(_NOT_TWINFLOW)),
    *(
        _row(f"controlNet[].{name}", refused(_CONTROLNET))
        for name in (
            "model",
            "weight",
            "guideImage",
            "controlMode",
            "endStep",
            "endStepPercentage",
            "startStep",
            "startStepPercentage",
        )
    ),
    _row("ultralytics", refused(_ULTRALYTICS), runware=note(_NOT_TWINFLOW)),
    *(
        _row(f"ultralytics.{name}", refused(_ULTRALYTICS))
        for name in (
            "CFGScale",
            "confidence",
            "maskBlur",
            "maskPadding",
            "negativePrompt",
            "positivePrompt",
            "steps",
            "strength",
        )
    ),
    _row("ultralytics.inpaintSize", refused(_ULTRALYTICS), runware=note("runware:z-image@0 only")),
)

_BY_PARAMETER: dict[str, Row] = {row.parameter: row for row in ROWS}


def find(parameter: str) -> Row:
    """The row of a wire path (`controlNet[].weight`); KeyError when the table has none."""
    return _BY_PARAMETER[parameter]


def parent(parameter: str) -> str | None:
    """`controlNet[].weight` -> `controlNet`; `safety.mode` -> `safety`; a top-level name -> None."""
    if "." not in parameter:
        return None
    return parameter.rsplit(".", 1)[0].removesuffix("[]")


def refused_parameters(backend: Backend) -> tuple[str, ...]:
    """The parameters `backend` refuses by name, a refused group standing for its members."""
    out = []
    for row in ROWS:
        up = parent(row.parameter)
        if row.on(backend).status == "refused" and not (up and find(up).on(backend).status == "refused"):
            out.append(row.parameter)
    return tuple(out)


def refusals(wire: Mapping[str, Any], backend: Backend) -> list[tuple[str, str, Any]]:
    """(parameter as sent, message, value) for every refused parameter that `wire` sets to something
    that asks for work; `controlNet[].startStep` is named `controlNet[1].startStep`."""
    found = []
    for parameter in refused_parameters(backend):
        row = find(parameter)
        for name, value in _values(wire, parameter):
            if value in (None, [], {}) or any(value == ok and type(value) is type(ok) for ok in row.accepts):
                continue
            found.append((name, row.on(backend).text, value))
    return found


def _values(wire: Any, path: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (concrete name, value) that `path` reaches in the wire dictionary."""
    head, _, rest = path.partition(".")
    listed = head.endswith("[]")
    key = head.removesuffix("[]")
    if not isinstance(wire, Mapping) or key not in wire:
        return
    value = wire[key]
    name = f"{prefix}{key}"
    if listed:
        items = value if isinstance(value, list) else []
        for index, item in enumerate(items):
            yield from (
                _values(item, rest, f"{name}[{index}].") if rest else iter([(f"{name}[{index}]", item)])
            )
    elif rest:
        yield from _values(value, rest, f"{name}.")
    else:
        yield name, value
