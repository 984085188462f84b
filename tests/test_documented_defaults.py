"""Issue 19, hole 6: a parameter left unset makes the picture the model's documented default makes.

TwinFlow's page says `acceleration` defaults to `medium`; 0.2 fingerprinted unset as `none`, so spelling
out `medium` paid again and `none` spelled out could reuse a picture made at `medium`. Every default now
comes from one table checked here against the seed pages, and what 0.2 wrote is still found where it
really was the same picture.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage.jobs.ledger import STATE_FILE, job_fingerprint
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
from airflow_provider_zimage.runware.models import (
    CATALOG,
    RUNWARE_DEFAULTS,
    UNDOCUMENTED_DEFAULTS,
    ImageInferenceRequest,
)
from airflow_provider_zimage.testing.runware_server.schema import seeds_dir
from tests.test_one_reading import generate, run_try

ZIMAGE = "runware:z-image@0"
TURBO = "runware:z-image@turbo"
TWINFLOW = "runware:twinflow-z-image-turbo@0"
SEEDS = seeds_dir()
# The model pages of each model (seed README): 000/001 Z-Image, 002 (+ 003 its OpenAPI schema) Turbo,
# 004 TwinFlow.
PAGES = {ZIMAGE: ("000", "001"), TURBO: ("002", "003"), TWINFLOW: ("004",)}
have_pages = pytest.mark.skipif(
    not all(any(SEEDS.glob(f"{n}_*.txt")) for pages in PAGES.values() for n in pages),
    reason=f"the Runware model pages (000-004) are not in {SEEDS}; set ZIMAGE_SEEDS_DIR",
)


# -- reading the pages ------------------------------------------------------------------------------


def _value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d+", text):
        return float(text)
    return text


# "outputQuality\nintegermin: 20max: 99default: 95Compression..." (000) and
# "outputQuality\ninteger min: 20 max: 99 default: 95 -" (002, 004): the name is the line before.
_PLAIN_DEFAULT = re.compile(r"default:\s?(false|true|-?\d+(?:\.\d+)?(?![\d.])|[A-Za-z]+?(?= -|[A-Z][a-z]|$))")


def _plain_name(line: str) -> str:
    """`safety»modemode` (the path, then the leaf name again) -> `safety.mode`."""
    parts = line.strip().split("»")
    leaf = parts[-1]
    if len(parts) > 1 and len(leaf) % 2 == 0 and leaf[: len(leaf) // 2] == leaf[len(leaf) // 2 :]:
        parts[-1] = leaf[: len(leaf) // 2]
    return ".".join(parts)


def _plain_page(text: str) -> dict[str, Any]:
    lines = text.splitlines()
    found = {}
    for before, line in itertools.pairwise(lines):
        match = _PLAIN_DEFAULT.search(line)
        if match and not line.lstrip().startswith(('"', "{")):
            found[_plain_name(before)] = _value(match.group(1))
    return found


def _markdown_page(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    name = path = None
    for line in text.splitlines():
        heading = re.match(r"#{3,6} \[([^\]]+)\]", line)
        if heading:
            name, path = heading.group(1), None
        elif m := re.match(r"- \*\*Path\*\*: `([^`]+)`", line):
            path = m.group(1)
        elif (m := re.match(r"- \*\*Default\*\*: `([^`]+)`", line)) and name:
            found[path or name] = _value(m.group(1))
    return found


def _schema_defaults(schema: Any, prefix: str = "") -> dict[str, Any]:
    found: dict[str, Any] = {}
    if not isinstance(schema, dict):
        return found
    for name, prop in (schema.get("properties") or {}).items():
        path = f"{prefix}{name}"
        if isinstance(prop, dict) and "default" in prop:
            found[path] = prop["default"]
        found.update(_schema_defaults(prop, f"{path}."))
        found.update(_schema_defaults(prop.get("items") if isinstance(prop, dict) else None, f"{path}."))
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key) or []:
            found.update(_schema_defaults(option, prefix))
    return found


def documented_defaults(air: str) -> dict[str, Any]:
    """Every default the model's pages state, by wire path (`lora.weight`); pages must not disagree."""
    found: dict[str, Any] = {}
    for number in PAGES[air]:
        (page,) = SEEDS.glob(f"{number}_*.txt")
        text = page.read_text(encoding="utf-8")
        if number == "003":
            item = json.loads(text)["components"]["schemas"]["RequestBody"]["items"]
            defaults = _schema_defaults(item)
        elif text.lstrip().startswith("#") or "- **Default**:" in text:
            defaults = _markdown_page(text)
        else:
            defaults = _plain_page(text)
        for path, value in defaults.items():
            assert found.get(path, value) == value, f"{air}: the pages disagree on {path}"
            found[path] = value
    return found


def table(air: str) -> dict[str, Any]:
    return {path.replace("[]", ""): value for path, value in RUNWARE_DEFAULTS[air].items()}


@have_pages
@pytest.mark.parametrize("air", list(PAGES))
def test_the_defaults_table_is_what_the_model_pages_say(air):
    documented = documented_defaults(air)
    assert len(documented) > 15, documented  # the parser read the page, not a fragment of it
    undocumented = {p.replace("[]", "") for p in UNDOCUMENTED_DEFAULTS.get(air, {})}
    assert not undocumented & set(documented), "documented now: take it out of UNDOCUMENTED_DEFAULTS"
    assert {p: v for p, v in table(air).items() if p not in undocumented} == documented
    assert all(UNDOCUMENTED_DEFAULTS.get(air, {}).values()), "every undocumented default says why it is there"


def _spell(air: str, path: str, value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request with `path` unset, the same request with the default spelled out)."""
    unset: dict[str, Any] = {"model": air, "positivePrompt": "a lighthouse", "seed": 1}
    top, _, leaf = path.partition(".")
    spelled = dict(unset)
    if top == "lora":
        unset["lora"] = [{"model": "civitai:1@1"}]
        spelled["lora"] = [{"model": "civitai:1@1", leaf: value}]
    elif top == "controlNet":
        net = {"model": "civitai:2@2", "guideImage": "https://example.com/guide.png"}
        unset["controlNet"] = [net]
        spelled["controlNet"] = [{**net, leaf: value}]
    elif leaf:
        unset[top] = {}
        spelled[top] = {leaf: value}
    elif top in ("width", "height"):
        spelled.update(width=RUNWARE_DEFAULTS[air]["width"], height=RUNWARE_DEFAULTS[air]["height"])
    else:
        spelled[top] = value
    if top == "strength":
        unset["inputs"] = spelled["inputs"] = {"seedImage": "https://example.com/seed.png"}
    return unset, spelled


@have_pages
@pytest.mark.parametrize("air", list(PAGES))
def test_every_documented_default_spelled_out_is_the_same_picture_as_leaving_it_unset(air):
    for path, value in {**documented_defaults(air), **table(air)}.items():
        unset, spelled = _spell(air, path, value)
        a = ImageInferenceRequest.build(**unset).fingerprint()
        b = ImageInferenceRequest.build(**spelled).fingerprint()
        assert a == b, f"{air}: {path}={value!r} spelled out is fingerprinted as another picture"


def test_the_catalogue_reads_its_runware_defaults_from_the_table():
    for air, spec in CATALOG.items():
        defaults = RUNWARE_DEFAULTS[air]
        assert (spec.default_steps, spec.default_cfg_scale) == (
            defaults.get("steps"),
            defaults.get("CFGScale"),
        )
        assert (spec.default_width, spec.default_height) == (defaults["width"], defaults["height"])


def test_acceleration_none_on_twinflow_is_a_different_picture_from_unset():
    base = {"model": TWINFLOW, "positivePrompt": "a lighthouse", "seed": 1}
    unset = ImageInferenceRequest.build(**base).fingerprint()
    assert ImageInferenceRequest.build(**base, acceleration="medium").fingerprint() == unset
    for level in ("none", "low", "high"):
        assert ImageInferenceRequest.build(**base, acceleration=level).fingerprint() != unset, level


# -- against the test server: accepted submissions are what Runware bills ----------------------------


def twinflow(output_dir: str, **kwargs: Any) -> ZImageGenerateOperator:
    return generate(output_dir, model="twinflow", **kwargs)


def test_spelling_out_twinflows_default_acceleration_medium_on_a_rerun_pays_nothing(zimage_conn, output_dir):
    from tests.dagtest import FakeTI

    ti = FakeTI("manual__twinflow_medium")
    first = run_try(twinflow(output_dir), ti)
    again = run_try(twinflow(output_dir, acceleration="medium"), ti)
    assert again == first
    assert zimage_conn.stats["total_accepted"] == 1


def test_acceleration_none_on_a_twinflow_rerun_is_a_new_picture_and_is_paid_once(zimage_conn, output_dir):
    from tests.dagtest import FakeTI

    ti = FakeTI("manual__twinflow_none")
    (first,) = run_try(twinflow(output_dir), ti)
    (at_none,) = run_try(twinflow(output_dir, acceleration="none"), ti)
    assert at_none["task_uuid"] != first["task_uuid"]
    assert zimage_conn.stats["total_accepted"] == 2
    assert run_try(twinflow(output_dir, acceleration="none"), ti) == [at_none]
    assert zimage_conn.stats["total_accepted"] == 2


# -- what 0.2 wrote -------------------------------------------------------------------------------

# 0.2's fingerprint, frozen here as it shipped: the reference for "a manifest 0.2 wrote". A copy of
# runware/models.py's `_fingerprint_0_2` tables kept on purpose: an independent oracle, so an edit of the
# production copy cannot move the reference it is checked against.
_DELIVERY_0_2 = {
    "taskUUID",
    "webhookURL",
    "uploadEndpoint",
    "deliveryMethod",
    "outputType",
    "includeCost",
    "ttl",
}
_DEFAULTS_0_2: dict[str, Any] = {
    "numberResults": 1,
    "outputFormat": "JPG",
    "outputQuality": 95,
    "acceleration": "none",
    "safety": {"checkContent": False, "mode": "none"},
    "acceleratorOptions": {
        "cacheMaxConsecutiveSteps": 3,
        "fbCache": False,
        "fbCacheThreshold": 0.25,
        "teaCache": False,
        "teaCacheDistance": 0.5,
        "dbCache": False,
        "dbCacheThreshold": 0.25,
        "dbCacheSkipInterval": 5,
    },
    "ultralytics": {
        "CFGScale": 8,
        "confidence": 0.9,
        "maskBlur": 5,
        "maskPadding": 5,
        "steps": 20,
        "strength": 0.3,
    },
}
_ITEMS_0_2 = {
    "lora": {"weight": 1, "transformer": "both"},
    "controlNet": {"weight": 1, "controlMode": "balanced"},
}
_NONE = object()


def _strip_0_2(value: Any, defaults: Any) -> Any:
    if not isinstance(value, dict) or not isinstance(defaults, dict):
        return value
    kept = {}
    for key, item in value.items():
        default = defaults.get(key, _NONE)
        item = _strip_0_2(item, default)
        if item == default or item == {}:
            continue
        kept[key] = item
    return kept


def fingerprint_0_2(request: ImageInferenceRequest) -> str:
    wire = {k: v for k, v in request.to_wire().items() if k not in _DELIVERY_0_2}
    defaults = {**_DEFAULTS_0_2, "width": 1024, "height": 1024}
    if request.model == TWINFLOW:
        defaults.update(steps=4, CFGScale=0.0)
    if (request.inputs is not None and request.inputs.seed_image) or request.strength is not None:
        defaults["strength"] = 0.8
    wire = _strip_0_2(wire, defaults)
    for key, item_defaults in _ITEMS_0_2.items():
        if key in wire:
            wire[key] = [_strip_0_2(item, item_defaults) for item in wire[key]]
    canonical = json.dumps(wire, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _job(fingerprint: str) -> str:
    return job_fingerprint(fingerprint, backend="runware", origin="zimage_default")


def as_written_by_0_2(output_dir: str, op: ZImageGenerateOperator) -> None:
    """Re-key what this provider stored for `op` under the fingerprint 0.2 gave the same request."""
    request = op.build_request()
    new, old = _job(request.fingerprint()), _job(fingerprint_0_2(request))
    root = Path(output_dir.removeprefix("file://"))
    for path in [
        *root.rglob("manifest.json"),
        *root.rglob(STATE_FILE),
        *root.rglob("_zimage_content/*.json"),
    ]:
        path.write_text(path.read_text().replace(new, old))
        if path.name == f"{new}.json":
            path.rename(path.with_name(f"{old}.json"))


def test_a_0_2_twinflow_manifest_with_acceleration_unset_is_found_by_unset_and_medium_not_none(
    zimage_conn, output_dir
):
    from tests.dagtest import FakeTI

    ti = FakeTI("manual__from_0_2_unset")
    first = run_try(twinflow(output_dir), ti)
    as_written_by_0_2(output_dir, twinflow(output_dir))
    assert run_try(twinflow(output_dir, acceleration="medium"), ti) == first
    assert run_try(twinflow(output_dir), ti) == first
    assert zimage_conn.stats["total_accepted"] == 1
    (at_none,) = run_try(twinflow(output_dir, acceleration="none"), ti)  # made at medium: not this picture
    assert at_none["task_uuid"] != first[0]["task_uuid"]
    assert zimage_conn.stats["total_accepted"] == 2


def test_a_0_2_twinflow_manifest_made_at_none_is_reused_for_none_and_never_for_unset(zimage_conn, output_dir):
    """0.2 gave `none` and unset one fingerprint; the manifest's recorded request says which it was."""
    from tests.dagtest import FakeTI

    ti = FakeTI("manual__from_0_2_none")
    at_none = run_try(twinflow(output_dir, acceleration="none"), ti)
    as_written_by_0_2(output_dir, twinflow(output_dir, acceleration="none"))
    assert run_try(twinflow(output_dir, acceleration="none"), ti) == at_none
    assert zimage_conn.stats["total_accepted"] == 1
    (unset,) = run_try(twinflow(output_dir), ti)
    assert unset["task_uuid"] != at_none[0]["task_uuid"]
    assert zimage_conn.stats["total_accepted"] == 2


def _in_flight_0_2(output_dir: str, ti: Any, op: ZImageGenerateOperator) -> str:
    """A submission 0.2 recorded and Runware accepted, whose results were never stored."""
    from airflow_provider_zimage.hooks.runware import ZImageHook
    from airflow_provider_zimage.jobs.ledger import Ledger, LedgerStore, Submission
    from airflow_provider_zimage.storage.artifacts import ArtifactStore

    request = op.build_request()
    old = _job(fingerprint_0_2(request))
    submitted = request.model_copy(update={"task_uuid": "0c1b4c8e-7d25-4a8e-9a53-0d6f7e1e9b10"})
    ZImageHook().submit([submitted])
    directory = ArtifactStore(output_dir).task_dir(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    ledger = Ledger(ti.dag_id, ti.task_id, ti.run_id, ti.map_index)
    ledger.submissions[old] = Submission(old, 0, submitted.task_uuid, "submitted")
    LedgerStore(directory).save(ledger)
    return submitted.task_uuid


def test_a_0_2_twinflow_submission_in_flight_is_reattached_by_unset_and_medium(zimage_conn, output_dir):
    from tests.dagtest import FakeTI

    ti = FakeTI("manual__inflight_unset")
    task_uuid = _in_flight_0_2(output_dir, ti, twinflow(output_dir))
    (image,) = run_try(twinflow(output_dir, acceleration="medium"), ti)
    assert image["task_uuid"] == task_uuid
    assert zimage_conn.stats["total_accepted"] == 1


def test_an_ambiguous_0_2_submission_is_not_reattached_for_acceleration_none(zimage_conn, output_dir):
    """0.2's ledger does not say whether its unset-or-`none` fingerprint was made at `medium` (unset) or
    at `none`; it is read as the API default, so `none` pays once for a picture it knows is made at none."""
    from tests.dagtest import FakeTI

    ti = FakeTI("manual__inflight_none")
    task_uuid = _in_flight_0_2(output_dir, ti, twinflow(output_dir, acceleration="none"))
    (image,) = run_try(twinflow(output_dir, acceleration="none"), ti)
    assert image["task_uuid"] != task_uuid
    assert zimage_conn.stats["total_accepted"] == 2


def test_reuse_content_finds_a_0_2_entry_only_where_it_was_surely_the_same_picture(zimage_conn, output_dir):
    from tests.dagtest import FakeTI

    # 0.2 indexed `medium` spelled out under its own fingerprint: surely a picture made at medium.
    (made,) = run_try(twinflow(output_dir, acceleration="medium", reuse="content"), FakeTI("manual__c1"))
    as_written_by_0_2(output_dir, twinflow(output_dir, acceleration="medium"))
    (copied,) = run_try(twinflow(output_dir, reuse="content"), FakeTI("manual__c2"))
    assert copied["reused_from"] == made["uri"]
    assert zimage_conn.stats["total_accepted"] == 1
    # 0.2 indexed `none` under the fingerprint it also gave unset: nothing tells which picture it is.
    run_try(
        twinflow(output_dir, acceleration="none", reuse="content", prompt="a kettle"), FakeTI("manual__c3")
    )
    as_written_by_0_2(output_dir, twinflow(output_dir, acceleration="none", prompt="a kettle"))
    for n, level in enumerate(("none", None)):
        kwargs = {"acceleration": level} if level else {}
        (image,) = run_try(
            twinflow(output_dir, reuse="content", prompt="a kettle", **kwargs), FakeTI(f"manual__d{n}")
        )
        assert "reused_from" not in image
    assert zimage_conn.stats["total_accepted"] == 4


def test_a_batch_upgraded_from_0_2_pays_nothing_for_its_twinflow_rows(zimage_conn, output_dir):
    """A cleared catalogue of TwinFlow rows (acceleration unset, `medium` spelled out) stored by 0.2."""
    from airflow_provider_zimage.jobs.batch_ledger import BATCH_STATE_FILE
    from tests.dagtest import FakeTI
    from tests.test_batch import batch
    from tests.test_batch import run_try as run_batch

    rows = [{"prompt": f"a lighthouse number {i}", "seed": i} for i in range(3)]
    rows.append({"prompt": "a lighthouse at medium", "seed": 9, "acceleration": "medium"})
    ti = FakeTI("manual__batch_0_2", dag_id="catalogue_0_2")
    first = run_batch(batch(output_dir, rows, model="twinflow"), ti)
    assert first["images"] == 4 and zimage_conn.stats["total_accepted"] == 4
    (ledger,) = Path(output_dir.removeprefix("file://")).rglob(BATCH_STATE_FILE)
    text = ledger.read_text()
    for row in rows:
        spelled = {("positive_prompt" if k == "prompt" else k): v for k, v in row.items()}
        request = ImageInferenceRequest.build(model="twinflow", width=256, height=256, **spelled)
        text = text.replace(_job(request.fingerprint()), _job(fingerprint_0_2(request)))
        assert _job(fingerprint_0_2(request)) in text, "the ledger holds what 0.2 called the row"
    ledger.write_text(text)
    again = run_batch(batch(output_dir, rows, model="twinflow"), ti)
    assert again["images"] == again["reused"] == 4, again
    # Nothing sent again: 0.2 derived its taskUUIDs from its own fingerprints, so a re-send here would be
    # a new paid task at Runware (the test server only knows this run's taskUUIDs, and would say conflict).
    assert zimage_conn.stats["requests_by_type"]["imageInference"] == 4
    assert zimage_conn.stats["total_accepted"] == 4
