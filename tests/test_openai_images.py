"""Backend `openai_images`: the operators against a loopback OpenAI images server (real HTTP, faults).

What a user of an SGLang / vLLM-Omni cluster notices: the request says what the engine gets (its
extras named as SGLang documents them), what the engine would silently get wrong is refused before a
byte is sent, every image has its own reproducible seed, overload and crashes are retried, a retried
task makes only what is missing, a URL answer cannot send the worker anywhere, and the key stays out
of everything written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage.compat import AirflowException, AirflowFailException
from airflow_provider_zimage.jobs.openai_images import IMAGES_STATE_FILE
from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator
from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
from airflow_provider_zimage.testing.openai_images_server import Fault, OpenAIImagesTestServer, seed_png
from tests.dagtest import FakeTI, run_dag, task_states

API_KEY = "sk-engine-7f3a9c1d2e4b"
FAST = {"max_retries": 4, "backoff_base": 0.01, "backoff_max": 0.05, "timeout": 10}


def engine_connection(server: OpenAIImagesTestServer, **extra: Any) -> str:
    return json.dumps(
        {
            "conn_type": "zimage",
            "host": server.url,
            "password": API_KEY,
            "extra": {"backend": "openai_images", "served_model": "Z-Image-Turbo", **FAST, **extra},
        }
    )


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch, zimage_output: Path) -> Iterator[OpenAIImagesTestServer]:
    with OpenAIImagesTestServer(api_key=API_KEY) as server:
        monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", engine_connection(server))
        yield server


def generate(run_id: str = "manual__engine", **kwargs: Any) -> list[dict[str, Any]]:
    args = {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 42, **kwargs}
    op = ZImageGenerateOperator(task_id="generate", **args)
    result: list[dict[str, Any]] = op.execute({"ti": FakeTI(run_id)})
    return result


def batch(rows: list[dict[str, Any]], run_id: str = "manual__engine_batch", **kwargs: Any) -> dict[str, Any]:
    op = ZImageBatchGenerateOperator(task_id="batch", requests=rows, width=256, height=256, **kwargs)
    result: dict[str, Any] = op.execute({"ti": FakeTI(run_id, task_id="batch")})
    return result


def test_the_request_reaches_the_engine_with_sglangs_own_parameter_names(
    engine: OpenAIImagesTestServer,
) -> None:
    generate(negative_prompt="fog", steps=6, cfg_scale=1.5, width=512, height=384, output_format="PNG")
    (call,) = engine.generations
    assert call.body == {
        "model": "Z-Image-Turbo",
        "prompt": "a lighthouse at dusk",
        "n": 1,
        "size": "512x384",
        "response_format": "b64_json",
        "output_format": "png",
        "seed": 42,
        "num_inference_steps": 6,
        "guidance_scale": 0.5,  # Runware's CFGScale 1.5 = SGLang's pos + 0.5 * (pos - neg)
        "negative_prompt": "fog",
    }
    assert call.headers["authorization"] == f"Bearer {API_KEY}"


def test_cfgscale_1_means_no_guidance_on_the_engine_as_on_runware(engine: OpenAIImagesTestServer) -> None:
    # Runware: guidance off at CFGScale <= 1, negativePrompt ignored. SGLang's Z-Image guides for any
    # guidance_scale > 0, so sending 1 as given would run guidance with the negative prompt.
    generate(negative_prompt="fog", cfg_scale=1.0)
    (call,) = engine.generations
    assert call.body["guidance_scale"] == 0.0
    assert "negative_prompt" not in call.body


def test_an_unset_step_count_is_sent_as_the_catalogs_so_the_picture_does_not_depend_on_the_server(
    engine: OpenAIImagesTestServer,
) -> None:
    generate()
    body = engine.generations[0].body
    assert body["num_inference_steps"] == 8 and body["guidance_scale"] == 0.0


@pytest.mark.parametrize(
    ("arguments", "parameter"),
    [
        ({"width": 1000}, "width"),
        ({"height": 500}, "height"),
        ({"lora": [{"model": "hf:owner/repo", "weight": 0.8}]}, "lora"),
        ({"scheduler": "DPM++ 2M Karras"}, "scheduler"),
        ({"model": "runware:z-image@0"}, "model"),
        ({"seed_image": "https://example.com/a.png", "strength": 0.5}, "inputs"),
        ({"safety": {"check_content": True}}, "safety.checkContent"),
    ],
)
def test_what_the_engine_would_get_wrong_is_refused_before_anything_is_sent(
    engine: OpenAIImagesTestServer, arguments: dict[str, Any], parameter: str
) -> None:
    with pytest.raises(AirflowFailException, match=rf"{parameter}: ") as refused:
        generate(**arguments)
    assert engine.generations == []
    # Sizes are the model's own rule (multiples of 16); the rest are this backend's refusals.
    assert ("multiple of 16" if parameter in ("width", "height") else "openai_images") in str(refused.value)


def test_a_batch_row_the_engine_cannot_serve_stops_the_whole_batch_before_the_first_call(
    engine: OpenAIImagesTestServer,
) -> None:
    rows = [{"prompt": f"row {i}", "seed": i} for i in range(5)] + [{"prompt": "bad", "width": 1000}]
    with pytest.raises(AirflowFailException, match=r"requests\[5\]\.width"):
        batch(rows)
    assert engine.generations == []


def test_number_results_makes_one_request_per_image_with_consecutive_seeds(
    engine: OpenAIImagesTestServer,
) -> None:
    images = generate(seed=7, number_results=3, output_format="PNG")
    assert sorted(c.body["seed"] for c in engine.generations) == [7, 8, 9]
    assert {c.body["n"] for c in engine.generations} == {1}
    assert [i["seed"] for i in images] == [7, 8, 9]
    # Each stored file is the engine's picture of its own seed, byte for byte (PNG kept as sent).
    for image in images:
        stored = Path(image["uri"].removeprefix("file://")).read_bytes()
        assert stored == seed_png("a lighthouse at dusk", image["seed"], 256, 256)


def test_jpg_and_quality_are_encoded_by_the_provider(engine: OpenAIImagesTestServer) -> None:
    (low,) = generate("manual__q30", output_format="JPG", output_quality=30)
    (high,) = generate("manual__q95", output_format="JPG", output_quality=95)
    assert low["format"] == high["format"] == "jpg"
    assert low["bytes"] < high["bytes"]
    assert all(c.body["output_format"] == "png" for c in engine.generations)


def test_a_429_waits_as_long_as_retry_after_asks(engine: OpenAIImagesTestServer) -> None:
    engine.script(Fault(status=429, headers={"Retry-After": "1"}))
    generate()
    first, second = engine.generations
    assert second.at - first.at >= 0.95  # the backoff alone would wait about 10 ms


def test_server_errors_and_dropped_answers_are_retried_until_the_image_is_stored(
    engine: OpenAIImagesTestServer,
) -> None:
    engine.script(Fault(status=500), Fault(status=503), Fault(drop=True))
    (image,) = generate()
    assert len(engine.generations) == 4
    assert Path(image["uri"].removeprefix("file://")).is_file()


def test_a_bad_request_answer_fails_the_task_without_retrying(engine: OpenAIImagesTestServer) -> None:
    engine.script(Fault(status=400, body={"detail": "size unsupported"}))
    with pytest.raises(AirflowFailException, match="HTTP 400: size unsupported"):
        generate()
    assert len(engine.generations) == 1


def test_a_killed_workers_retry_makes_only_the_images_not_yet_stored(
    engine: OpenAIImagesTestServer, zimage_output: Path
) -> None:
    rows = [{"prompt": f"product {i}", "seed": 100 + i, "number_results": 2} for i in range(3)]
    first = batch(rows)
    assert first["images"] == 6 and len(engine.generations) == 6
    folder = Path(Path(first["manifest_uri"].removeprefix("file://")).parent)
    # The worker died after sending two images and before storing them: the ledger still says intent,
    # their files may or may not be there, and no manifest was written yet.
    ledger = json.loads((folder / IMAGES_STATE_FILE).read_text())
    for key in ("1/1", "2/0"):
        ledger["images"][key]["status"] = "intent"
        ledger["images"][key]["image"] = None
    (folder / IMAGES_STATE_FILE).write_text(json.dumps(ledger))
    (folder / "manifest.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jpg")}

    retried = batch(rows)

    again = engine.generations[6:]
    assert sorted((c.body["prompt"], c.body["seed"]) for c in again) == [
        ("product 1", 102),
        ("product 2", 102),
    ]
    assert retried["images"] == 6 and retried["reused"] == 4
    files = sorted(p.name for p in folder.glob("*.jpg"))
    assert len(files) == 6 and sorted(kept) == files  # the remade images overwrote their own names
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted((i["index"], i["seed"]) for i in manifest["images"]) == [
        (0, 100),
        (0, 101),
        (1, 101),
        (1, 102),
        (2, 102),
        (2, 103),
    ]


def test_an_unseeded_request_keeps_its_recorded_seed_across_a_retry(engine: OpenAIImagesTestServer) -> None:
    engine.script(*[Fault(status=500)] * 5)  # more than max_retries: the first try fails
    with pytest.raises(AirflowException):
        generate("manual__unseeded", seed=None)
    first_seed = engine.generations[0].body["seed"]
    (image,) = generate("manual__unseeded", seed=None)
    assert image["seed"] == first_seed == engine.generations[-1].body["seed"]


def test_the_batch_bounds_calls_in_flight(monkeypatch: pytest.MonkeyPatch, zimage_output: Path) -> None:
    with OpenAIImagesTestServer(api_key=API_KEY, latency=0.1) as server:
        monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", engine_connection(server))
        summary = batch([{"prompt": f"tile {i}", "seed": i} for i in range(12)], max_in_flight=3)
    assert summary["images"] == 12 and summary["total_cost"] == 0.0
    assert server.max_in_flight == 3


def test_a_url_answer_from_an_origin_not_allowed_is_not_fetched(engine: OpenAIImagesTestServer) -> None:
    engine.script(Fault(url="http://169.254.169.254/latest/meta-data/{name}"))
    with pytest.raises(AirflowFailException, match="169.254.169.254"):
        generate()
    assert [r.path for r in engine.requests] == ["/v1/images/generations"]


def test_a_url_answer_from_the_servers_own_origin_is_fetched(engine: OpenAIImagesTestServer) -> None:
    engine.script(Fault(url="/files/{name}"))  # SGLang answers relative URLs under its own origin
    (image,) = generate(output_format="PNG")
    assert Path(image["uri"].removeprefix("file://")).read_bytes() == seed_png(
        "a lighthouse at dusk", 42, 256, 256
    )


def test_the_api_key_appears_in_no_log_error_ledger_or_manifest(
    engine: OpenAIImagesTestServer, zimage_output: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine.script(
        Fault(status=500, body={"error": {"message": f"upstream said Bearer {API_KEY}"}}),
        *[Fault(status=401, body={"error": {"message": f"bad key {API_KEY}"}})],
    )
    with pytest.raises(AirflowFailException) as failed:
        generate("manual__key")
    assert API_KEY not in str(failed.value)
    generate("manual__key_ok")
    written = "".join(p.read_text(errors="replace") for p in zimage_output.rglob("*.json"))
    assert "manifest" in "".join(p.name for p in zimage_output.rglob("*.json"))
    assert API_KEY not in written
    assert API_KEY not in caplog.text


def test_the_sensor_refuses_an_openai_images_connection_naming_why(engine: OpenAIImagesTestServer) -> None:
    from airflow_provider_zimage.sensors.task import ZImageTaskSensor

    sensor = ZImageTaskSensor(task_id="wait", task_uuid="00000000-0000-4000-8000-000000000000")
    with pytest.raises(AirflowFailException, match="no task id"):
        sensor.execute({"ti": FakeTI(task_id="wait")})
    assert engine.requests == []


def test_wait_for_completion_false_is_refused_on_this_backend(engine: OpenAIImagesTestServer) -> None:
    with pytest.raises(AirflowFailException, match="wait_for_completion=False"):
        generate(wait_for_completion=False)
    assert engine.generations == []


MOVING_DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageGenerateOperator(
        task_id="hero",
        prompt="a lighthouse at dusk",
        width=256,
        height=256,
        seed=11,
        output_path=PARAMS["output"],
    )
"""


@pytest.mark.usefixtures("airflow_db")
def test_one_dag_moves_between_runware_and_an_engine_by_its_connection_alone(
    zimage_conn: Any, output_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_runware = run_dag("moving_dag", MOVING_DAG, dag_id="moving_dag", output=output_dir + "/runware")
    assert on_runware.state == "success", task_states(on_runware)
    with OpenAIImagesTestServer(api_key=API_KEY) as server:
        monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", engine_connection(server))
        on_engine = run_dag("moving_dag", MOVING_DAG, dag_id="moving_dag", output=output_dir + "/engine")
    assert on_engine.state == "success", task_states(on_engine)
    assert [c.body["seed"] for c in server.generations] == [11]
    root = Path(output_dir.removeprefix("file://"))
    backends = {
        m.parts[len(root.parts)]: json.loads(m.read_text())["backend"] for m in root.rglob("manifest.json")
    }
    assert backends == {"runware": "runware", "engine": "openai_images"}


# -- the wire and the async twin, without an operator ------------------------------------------------


def _request(**kwargs: Any) -> Any:
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

    return ImageInferenceRequest.build(
        **{
            "model": "runware:z-image@turbo",
            "positive_prompt": "a lighthouse",
            "width": 256,
            "height": 256,
            **kwargs,
        }
    )


@pytest.mark.parametrize(
    ("arguments", "parameter"),
    [
        ({"lora": [{"model": "hf:owner/repo", "weight": 0.8}]}, "lora"),
        ({"scheduler": "Euler Beta"}, "scheduler"),
        ({"acceleration": "high", "model": "runware:twinflow-z-image-turbo@0"}, "acceleration"),
        ({"webhook_url": "https://hooks.example.com/x?token=abc"}, "webhookURL"),
        ({"upload_endpoint": "https://bucket.example.com/x?X-Amz-Signature=abc"}, "uploadEndpoint"),
        ({"safety": {"check_content": True}}, "safety.checkContent"),
    ],
)
def test_every_refusal_names_its_parameter_and_the_backend(arguments: dict[str, Any], parameter: str) -> None:
    from airflow_provider_zimage.exceptions import ZImageValidationError
    from airflow_provider_zimage.openai_images.wire import plan_calls

    request = _request(**arguments)
    served = {"runware:z-image@turbo": "Z-Image-Turbo", "runware:twinflow-z-image-turbo@0": "TwinFlow"}
    with pytest.raises(ZImageValidationError) as refused:
        plan_calls(request, served, 1)
    assert refused.value.parameters == [parameter]
    assert "openai_images" in str(refused.value) and "abc" not in str(refused.value)


def test_a_connection_without_served_model_refuses_naming_the_extra() -> None:
    from airflow_provider_zimage.exceptions import ZImageValidationError
    from airflow_provider_zimage.openai_images.wire import plan_calls, served_models

    with pytest.raises(ZImageValidationError, match="served_model"):
        plan_calls(_request(), served_models(None), 1)
    assert served_models('{"turbo": "zt", "z-image": "zb"}') == {
        "runware:z-image@turbo": "zt",
        "runware:z-image@0": "zb",
    }


def test_the_async_twin_makes_the_same_image(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from airflow_provider_zimage.hooks.openai_images import OpenAIImagesHook
    from airflow_provider_zimage.hooks.runware import loop_clients
    from airflow_provider_zimage.openai_images.wire import plan_calls

    with OpenAIImagesTestServer(api_key=API_KEY) as server:
        monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", engine_connection(server))
        (call,) = plan_calls(_request(seed=3), {"runware:z-image@turbo": "Z-Image-Turbo"}, 3)
        server.script(Fault(status=503, headers={"Retry-After": "0"}), Fault(url="/files/{name}"))

        async def both() -> tuple[bytes, bytes]:
            async with loop_clients():
                hook = OpenAIImagesHook()
                return await hook.agenerate(call), await hook.agenerate(call)

        via_url, via_b64 = asyncio.run(both())
        with OpenAIImagesHook() as hook:
            sync = hook.generate(call)
    assert via_url == via_b64 == sync == seed_png("a lighthouse", 3, 256, 256)


# -- reuse="content": a daily catalogue on an engine makes only what is new -------------------------

CATALOGUE = [{"prompt": f"catalogue item {i}", "seed": 500 + i} for i in range(4)]


def _manifest(summary: dict[str, Any]) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads(Path(summary["manifest_uri"].removeprefix("file://")).read_text())
    return manifest


def _file(image: dict[str, Any]) -> Path:
    return Path(str(image["uri"]).removeprefix("file://"))


def test_a_daily_batch_on_the_engine_copies_yesterdays_seeded_pictures_instead_of_calling(
    engine: OpenAIImagesTestServer,
) -> None:
    yesterday = batch(CATALOGUE, run_id="scheduled__day1", reuse="content")
    assert yesterday["images"] == 4 and len(engine.generations) == 4

    today = batch(CATALOGUE, run_id="scheduled__day2", reuse="content")

    assert len(engine.generations) == 4  # not one call to the engine
    assert today["images"] == 4 and today["reused"] == 4 and today["total_cost"] == 0.0
    sources = {(i["index"], i["seed"]): i["uri"] for i in _manifest(yesterday)["images"]}
    images = _manifest(today)["images"]
    assert sorted((i["index"], i["seed"]) for i in images) == sorted(sources)
    for image in images:
        assert image["reused_from"] == sources[(image["index"], image["seed"])] != image["uri"]
        assert image["cost"] == 0.0
        # A verified copy in today's own folder, byte for byte the engine's picture of that seed.
        assert "scheduled__day2" in image["uri"]
        assert _file(image).read_bytes() == _file({"uri": image["reused_from"]}).read_bytes()
    # Today's task retried: its copies are in its own ledger, kept, and still nothing is called.
    again = batch(CATALOGUE, run_id="scheduled__day2", reuse="content")
    assert len(engine.generations) == 4 and again["images"] == 4
    assert _manifest(again)["images"] == images


def test_one_changed_row_in_the_catalogue_makes_exactly_one_call(engine: OpenAIImagesTestServer) -> None:
    batch(CATALOGUE, run_id="scheduled__day1", reuse="content")
    edited = [dict(row) for row in CATALOGUE]
    edited[2]["prompt"] = "catalogue item 2, now in red"

    today = batch(edited, run_id="scheduled__day2", reuse="content")

    (call,) = engine.generations[4:]
    assert (call.body["prompt"], call.body["seed"]) == ("catalogue item 2, now in red", 502)
    assert today["reused"] == 3
    fresh = [i for i in _manifest(today)["images"] if "reused_from" not in i]
    assert [i["index"] for i in fresh] == [2]


def test_a_corrupted_stored_picture_is_made_again_not_copied(engine: OpenAIImagesTestServer) -> None:
    yesterday = batch(CATALOGUE, run_id="scheduled__day1", reuse="content")
    damaged = next(i for i in _manifest(yesterday)["images"] if i["index"] == 1)
    _file(damaged).write_bytes(b"not the picture any more")
    gone = next(i for i in _manifest(yesterday)["images"] if i["index"] == 3)
    _file(gone).unlink()

    today = batch(CATALOGUE, run_id="scheduled__day2", reuse="content")

    assert sorted(c.body["seed"] for c in engine.generations[4:]) == [501, 503]
    assert today["images"] == 4 and today["reused"] == 2
    for image in _manifest(today)["images"]:
        assert ("reused_from" in image) == (image["index"] in (0, 2))
        assert hashlib.sha256(_file(image).read_bytes()).hexdigest() == image["sha256"]


def test_unseeded_rows_are_never_copied_they_ask_for_a_new_picture(engine: OpenAIImagesTestServer) -> None:
    rows: list[dict[str, Any]] = [{"prompt": "surprise me"}, {"prompt": "seeded", "seed": 9}]
    batch(rows, run_id="scheduled__day1", reuse="content")
    today = batch(rows, run_id="scheduled__day2", reuse="content")
    again = engine.generations[2:]
    assert [c.body["prompt"] for c in again] == ["surprise me"]
    assert today["reused"] == 1


def test_the_single_operator_on_the_engine_copies_a_seeded_picture_stored_before(
    engine: OpenAIImagesTestServer,
) -> None:
    first = generate("scheduled__day1", reuse="content", seed=21, number_results=2)
    assert len(engine.generations) == 2
    second = generate("scheduled__day2", reuse="content", seed=21, number_results=2)
    assert len(engine.generations) == 2
    assert [i["reused_from"] for i in second] == [i["uri"] for i in first]
    assert [i["seed"] for i in second] == [21, 22] and {i["cost"] for i in second} == {0.0}
    # Unseeded: a new picture every time, even with reuse="content".
    generate("scheduled__day1", reuse="content", seed=None)
    generate("scheduled__day2", reuse="content", seed=None)
    assert len(engine.generations) == 4


def test_a_picture_the_single_operator_stored_is_copied_by_a_batch_row_asking_for_it(
    engine: OpenAIImagesTestServer,
) -> None:
    (single,) = generate("scheduled__day1", reuse="content", prompt="catalogue item 0", seed=500)
    today = batch(CATALOGUE[:1], run_id="scheduled__day2", reuse="content")
    assert len(engine.generations) == 1
    (image,) = _manifest(today)["images"]
    assert image["reused_from"] == single["uri"]


def test_another_served_model_is_other_weights_and_is_never_copied(
    engine: OpenAIImagesTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch(CATALOGUE[:2], run_id="scheduled__day1", reuse="content")
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", engine_connection(engine, served_model="Z-Image-v2"))
    today = batch(CATALOGUE[:2], run_id="scheduled__day2", reuse="content")
    assert len(engine.generations) == 4 and today["reused"] == 0
    assert {c.body["model"] for c in engine.generations[2:]} == {"Z-Image-v2"}
