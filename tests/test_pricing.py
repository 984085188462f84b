"""`max_cost_usd` is only a promise if the estimate is an upper bound of what Runware bills.

Every priced example of the seeds (a request and the `cost` of its answer) and every listed price is
walked here: no model and no size may be estimated below a price the spec shows for it.
"""

from __future__ import annotations

import json
import re

import pytest

from airflow_provider_zimage.runware.models import ImageInferenceRequest, estimate_cost
from airflow_provider_zimage.testing.runware_server.schema import seeds_dir

SEEDS = seeds_dir()
pytestmark = pytest.mark.skipif(
    not any(SEEDS.glob("00[124]_*.txt")),
    reason=f"the Runware model pages (001/002/004_*.txt) are not in {SEEDS}; set ZIMAGE_SEEDS_DIR",
)
# The seeds README's platform facts: prices seen but not in any model page's examples.
LISTED = [
    ("runware:z-image@turbo", 512, 512, None, 0.0013),
    ("runware:z-image@turbo", 1024, 1024, None, 0.0032),
    ("runware:z-image@0", 1024, 1024, None, 0.0045),
]


def _json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in a model page (requests and responses alternate)."""
    decoder = json.JSONDecoder()
    found, i = [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = end
    return found


def priced_examples() -> list[tuple[str, dict, float]]:
    """(seed file, request, billed cost) for every example answer that states a cost."""
    examples = []
    for path in sorted(SEEDS.glob("00[124]_*.txt")):
        requests: dict[str, dict] = {}
        for obj in _json_objects(path.read_text()):
            if obj.get("taskType") == "imageInference" and "positivePrompt" in obj:
                requests[obj["taskUUID"]] = obj
            elif "cost" in obj and obj.get("taskUUID") in requests:
                examples.append((path.name, requests[obj["taskUUID"]], float(obj["cost"])))
    return examples


def listed_prices() -> list[tuple[str, int, int, int | None, float]]:
    """The per-size prices model pages list (`- **1024x1024**: `$0.0045``), plus the README's."""
    rows = list(LISTED)
    for path in sorted(SEEDS.glob("00[124]_*.txt")):
        text = path.read_text()
        model = re.search(r"runware:[a-z0-9-]+@[a-z0-9]+", text)
        for w, h, price in re.findall(r"\*\*(\d+)x(\d+)\*\*: `\$([0-9.]+)`", text):
            rows.append((model.group(0), int(w), int(h), None, float(price)))
    return rows


EXAMPLES = priced_examples()
LISTINGS = listed_prices()


def test_the_seeds_have_priced_examples_for_every_model():
    models = {request["model"] for _, request, _ in EXAMPLES}
    assert models == {"runware:z-image@0", "runware:z-image@turbo", "runware:twinflow-z-image-turbo@0"}
    assert len(EXAMPLES) >= 10
    assert any(size == (1024, 1024) for *_, size in [(m, (w, h)) for m, w, h, _, _ in LISTINGS])


@pytest.mark.parametrize(
    ("seed", "request_body", "cost"), EXAMPLES, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(EXAMPLES)]
)
def test_every_priced_example_is_estimated_at_or_above_what_it_cost(seed, request_body, cost):
    request = ImageInferenceRequest.build(**request_body)
    assert estimate_cost(request) >= cost, (seed, request_body["width"], request_body["height"], cost)


@pytest.mark.parametrize(("model", "width", "height", "steps", "price"), LISTINGS)
def test_every_listed_price_is_covered_whatever_the_steps_left_unset(model, width, height, steps, price):
    request = ImageInferenceRequest.build(
        model=model, positivePrompt="a lighthouse", width=width, height=height
    )
    assert estimate_cost(request) >= price


def test_smaller_images_are_never_estimated_below_the_smallest_price_seen():
    """256x256 Turbo is estimated at least at the $0.0013 that 512x512 (and every 4-step image) costs."""
    tiny = ImageInferenceRequest.build(model="turbo", positivePrompt="a lighthouse", width=256, height=256)
    assert estimate_cost(tiny) >= 0.0013


def test_more_steps_never_lower_the_estimate():
    costs = [
        estimate_cost(
            ImageInferenceRequest.build(
                model="z-image", positivePrompt="a lighthouse", width=1024, height=768, steps=n
            )
        )
        for n in (4, 16, 32, 36, 50)
    ]
    assert costs == sorted(costs)
    assert costs[-1] > costs[0]


def test_max_cost_usd_refuses_a_request_the_seeds_bill_above_the_limit(zimage_conn, output_dir):
    """The defect: 512x512 Turbo was estimated at $0.0009 and billed $0.0013, so a $0.001 budget let
    it through. Now it is refused before a single request."""
    from airflow_provider_zimage.compat import AirflowFailException
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.dagtest import FakeTI

    op = ZImageGenerateOperator(
        task_id="t", prompt="a lighthouse", width=512, height=512, max_cost_usd=0.001, output_path=output_dir
    )
    with pytest.raises(AirflowFailException, match="max_cost_usd"):
        op.execute({"ti": FakeTI()})
    assert zimage_conn.stats["requests"] == 0


def test_the_test_server_bills_512_turbo_like_the_seeds(zimage_conn, output_dir):
    """The stand-in for Runware bills what the seeds say, so the budget tests above mean something."""
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.dagtest import FakeTI

    op = ZImageGenerateOperator(
        task_id="t", prompt="a lighthouse", width=512, height=512, output_path=output_dir, poll_interval=0.02
    )
    (image,) = op.execute({"ti": FakeTI()})
    assert image["cost"] == pytest.approx(0.0013)
    assert estimate_cost(op.build_request()) >= image["cost"]
