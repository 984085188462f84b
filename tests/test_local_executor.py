"""The local diffusers backend, run for real on a tiny random Z-Image checkpoint built offline.

Nothing is mocked on the generation path: the checkpoint is written with `save_pretrained` and loaded
through the executor's normal `from_pretrained(..., local_files_only=True)`, so these tests catch the
same integration breaks a real checkpoint would (pipeline arguments, schedulers, LoRA loading).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from airflow_provider_zimage import local  # noqa: E402
from airflow_provider_zimage.exceptions import ZImageValidationError  # noqa: E402
from airflow_provider_zimage.local import (  # noqa: E402
    SUPPORTED_SCHEDULERS,
    LocalBackendUnavailable,
    LocalGenerationError,
    LocalZImageExecutor,
)
from airflow_provider_zimage.runware.models import SCHEDULERS, ImageInferenceRequest, Inputs  # noqa: E402
from airflow_provider_zimage.testing.tiny_model import build_tiny_lora  # noqa: E402

pytestmark = pytest.mark.local

REPO = Path(__file__).resolve().parents[1]
SIZE = 128  # the smallest side the request model accepts
TURBO = "runware:z-image@turbo"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    # Tensors this small gain nothing from threads, and two xdist workers with 2 threads each on 2 cores
    # oversubscribe the CPU (OpenMP spin-waits) and run several times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora(tiny_model, tmp_path_factory.mktemp("lora"))


@pytest.fixture
def executor(tiny_model: Path) -> LocalZImageExecutor:
    return LocalZImageExecutor(tiny_model, local_files_only=True)


def make_request(**overrides: Any) -> ImageInferenceRequest:
    params: dict[str, Any] = {
        "model": TURBO,
        "positivePrompt": "a lighthouse on a cliff at dusk",
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "seed": 1234,
        "outputFormat": "PNG",
    }
    params.update(overrides)
    return ImageInferenceRequest.build(**params)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="session")
def seed_image() -> Image.Image:
    # A smooth gradient, a different size than requested so the resize path runs too.
    image = Image.new("RGB", (160, 144))
    image.putdata([(x * 255 // 160, y * 255 // 144, 128) for y in range(144) for x in range(160)])
    return image


@pytest.fixture(scope="session")
def mask_image() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (32, 32, 96, 96))
    return mask


# --------------------------------------------------------------------------------------------------
# Text to image
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "pil_format"), [("PNG", "PNG"), ("JPG", "JPEG"), ("WEBP", "WEBP")])
def test_text_to_image_returns_decodable_images(executor, fmt, pil_format):
    request = make_request(outputFormat=fmt, width=SIZE, height=SIZE + 32, outputQuality=80)
    [image] = executor.generate(request)
    decoded = decode(image.data)
    assert decoded.format == pil_format
    assert decoded.size == (SIZE, SIZE + 32)
    assert image.format == fmt
    assert image.result == {
        "taskType": "imageInference",
        "taskUUID": request.task_uuid,
        "imageUUID": image.result["imageUUID"],
        "seed": 1234,
        "status": "success",
    }, "no NSFWContent without a check, no cost unless includeCost asked (as Runware's answers)"
    uuid.UUID(image.result["imageUUID"])
    extrema = decoded.convert("L").getextrema()
    assert extrema[0] < extrema[1], "a flat image means the pipeline produced nothing"


def test_same_seed_same_bytes_different_seed_different_bytes(executor):
    first = executor.generate(make_request(seed=7))[0]
    again = executor.generate(make_request(seed=7))[0]
    other = executor.generate(make_request(seed=8))[0]
    assert first.data == again.data
    assert first.data != other.data
    assert first.result["imageUUID"] != again.result["imageUUID"]


def test_seed_is_recorded_when_none_given_and_reproduces(executor):
    [random_run] = executor.generate(make_request(seed=None))
    seed = random_run.result["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    [replay] = executor.generate(make_request(seed=seed))
    assert replay.data == random_run.data


def test_number_results_uses_consecutive_seeds_each_reproducible(executor):
    batch = executor.generate(make_request(seed=500, numberResults=2))
    assert [g.result["seed"] for g in batch] == [500, 501]
    assert batch[0].data != batch[1].data
    assert len({g.result["imageUUID"] for g in batch}) == 2
    [single] = executor.generate(make_request(seed=501))
    assert single.data == batch[1].data


def test_defaults_come_from_the_catalog(executor, monkeypatch):
    import numpy as np

    seen: dict[str, Any] = {}
    pipe = executor.pipeline()

    def spy(self, **kwargs):  # records the call instead of denoising 1024x1024 on a CPU
        seen.update(kwargs)
        return SimpleNamespace(images=[np.full((kwargs["height"], kwargs["width"], 3), 0.5, np.float32)])

    monkeypatch.setattr(type(pipe), "__call__", spy)
    executor.generate(make_request(CFGScale=None, steps=None, width=None, height=None, outputFormat=None))
    # Turbo: 8 steps, no CFG; 1024x1024 when no size is given.
    assert (seen["num_inference_steps"], seen["guidance_scale"]) == (8, 0.0)
    assert (seen["width"], seen["height"]) == (1024, 1024)


# --------------------------------------------------------------------------------------------------
# Image to image, inpainting
# --------------------------------------------------------------------------------------------------


def test_image_to_image_from_base64(executor, seed_image):
    request = make_request(inputs={"seedImage": png_b64(seed_image)}, strength=0.6)
    [image] = executor.generate(request)
    assert decode(image.data).size == (SIZE, SIZE)
    [text_only] = executor.generate(make_request())
    assert image.data != text_only.data
    assert executor.generate(request)[0].data == image.data


def test_image_to_image_accepts_data_uri_and_file(tiny_model, seed_image, tmp_path):
    executor = LocalZImageExecutor(tiny_model, local_files_only=True, input_roots=[tmp_path])
    b64 = png_b64(seed_image)
    from_b64 = executor.generate(make_request(inputs={"seedImage": b64}))[0].data
    data_uri = f"data:image/png;base64,{b64}"
    assert executor.generate(make_request(inputs={"seedImage": data_uri}))[0].data == from_b64
    path = tmp_path / "seed.png"
    seed_image.save(path)
    assert executor.generate(make_request(inputs={"seedImage": f"file://{path}"}))[0].data == from_b64


@pytest.mark.parametrize("form", ["file-url", "dot-dot"])
def test_files_outside_the_allowed_roots_are_refused_naming_the_parameter(
    unloadable_executor, seed_image, tmp_path, form
):
    """A request is data: a path in it must not read any file the worker can see (issue 10)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "private.png"
    seed_image.save(outside)
    reference = {
        "file-url": f"file://{outside}",
        "dot-dot": f"file://{allowed}/../private.png",
    }[form]
    executor = LocalZImageExecutor(unloadable_executor.model_path, input_roots=[allowed])
    loads = local.load_count()
    with pytest.raises(ZImageValidationError) as caught:
        executor.validate(make_request(inputs={"seedImage": reference}))
    assert caught.value.parameters == ["inputs.seedImage"]
    assert "local_input_roots" in str(caught.value) and str(allowed) in str(caught.value)
    assert local.load_count() == loads


def test_default_input_roots_are_the_output_path_and_the_dags_folder(monkeypatch, tmp_path):
    from airflow_provider_zimage.local.images import default_input_roots

    monkeypatch.setenv("AIRFLOW__ZIMAGE__OUTPUT_PATH", f"file://{tmp_path}/out")
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(tmp_path / "dags"))
    monkeypatch.delenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ROOTS", raising=False)
    assert default_input_roots() == [f"{tmp_path}/out", str(tmp_path / "dags")]
    monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_INPUT_ROOTS", f"{tmp_path}/a, {tmp_path}/b")
    assert default_input_roots() == [f"{tmp_path}/a", f"{tmp_path}/b"]


def test_image_to_image_keeps_seed_image_size_when_none_requested(executor, seed_image):
    [image] = executor.generate(
        make_request(inputs={"seedImage": png_b64(seed_image)}, width=None, height=None)
    )
    assert decode(image.data).size == (160, 144)


def test_inpainting_with_mask(executor, seed_image, mask_image):
    seed_b64 = png_b64(seed_image.resize((SIZE, SIZE)))
    inpaint = make_request(inputs={"seedImage": seed_b64, "maskImage": png_b64(mask_image)}, strength=0.9)
    [image] = executor.generate(inpaint)
    assert decode(image.data).size == (SIZE, SIZE)
    assert executor.generate(inpaint)[0].data == image.data
    [img2img] = executor.generate(make_request(inputs={"seedImage": seed_b64}, strength=0.9))
    assert image.data != img2img.data


def test_image_pipelines_reuse_the_loaded_weights(executor, seed_image, mask_image):
    local.clear_pipeline_cache()
    loads = local.load_count()
    executor.generate(make_request())
    executor.generate(make_request(inputs={"seedImage": png_b64(seed_image)}))
    executor.generate(
        make_request(inputs={"seedImage": png_b64(seed_image), "maskImage": png_b64(mask_image)}, width=SIZE)
    )
    assert local.load_count() == loads + 1
    kinds = {kind for *_, kind in local.cached_pipelines()}
    assert kinds == {"text-to-image", "image-to-image", "inpainting"}
    pipes = [executor.pipeline(kind=k) for k in ("text-to-image", "image-to-image", "inpainting")]
    assert pipes[0].transformer is pipes[1].transformer is pipes[2].transformer


# --------------------------------------------------------------------------------------------------
# Cache, LoRA, schedulers
# --------------------------------------------------------------------------------------------------


def test_second_call_does_not_reload(executor, tiny_model):
    local.clear_pipeline_cache()
    loads = local.load_count()
    executor.generate(make_request())
    LocalZImageExecutor(tiny_model, local_files_only=True).generate(make_request(seed=2))
    assert local.load_count() == loads + 1
    assert local.cached_pipelines() == [(str(tiny_model), "cpu", "float32", "text-to-image")]


@pytest.mark.parametrize("form", ["real-outside", "missing-outside", "missing-inside", "dot-dot", "symlink"])
def test_a_lora_file_outside_the_allowed_roots_is_refused_like_a_missing_one_and_never_loaded(
    tiny_model, tiny_lora, tmp_path, monkeypatch, form
):
    """In-process, LoRA files come from the same allowed roots as seed images ([zimage] local_input_roots);
    a path elsewhere is not opened, and the answer does not say whether the file exists."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "private.safetensors"
    outside.write_bytes(tiny_lora.read_bytes())
    (allowed / "link.safetensors").symlink_to(outside)
    reference = {
        "real-outside": f"file:{outside}",
        "missing-outside": f"file:{tmp_path}/missing.safetensors",
        "missing-inside": f"file:{allowed}/missing.safetensors",
        "dot-dot": f"file://{allowed}/../private.safetensors",
        "symlink": f"file:{allowed}/link.safetensors",
    }[form]
    executor = LocalZImageExecutor(tiny_model, local_files_only=True, input_roots=[allowed])
    loaded: list[Any] = []
    monkeypatch.setattr(type(executor.pipeline()), "load_lora_weights", lambda *a, **k: loaded.append(a))
    with pytest.raises(ZImageValidationError) as caught:
        executor.generate(make_request(lora=[{"model": reference, "weight": 0.8}]))
    assert caught.value.parameters == ["lora[0].model"]
    [entry] = caught.value.errors
    assert entry["message"] == (
        "names no LoRA file this backend may read: LoRA files must exist inside the allowed folders "
        "([zimage] local_input_roots in-process; --lora-root, else --input-root, on the executor), "
        "or be mapped with lora_paths"
    )
    assert loaded == [], "the file was never handed to the LoRA loader"


def test_a_hugging_face_lora_id_cannot_climb_into_local_folders(unloadable_executor):
    loads = local.load_count()
    for name in ("hf:../..", "hf:../../etc/lora.safetensors", "hf:owner/repo/../../x.safetensors", "hf:./x"):
        with pytest.raises(ZImageValidationError) as caught:
            unloadable_executor.validate(make_request(lora=[{"model": name}]))
        assert caught.value.parameters == ["lora[0].model"], name
    assert local.load_count() == loads


def test_lora_is_applied_then_unloaded(tiny_model, tiny_lora):
    executor = LocalZImageExecutor(tiny_model, local_files_only=True, lora_roots=[tiny_lora.parent])
    [plain] = executor.generate(make_request())
    [with_lora] = executor.generate(make_request(lora=[{"model": f"file:{tiny_lora}", "weight": 0.8}]))
    assert with_lora.data != plain.data
    [after] = executor.generate(make_request())
    assert after.data == plain.data, "the adapter must not outlive its task"
    assert not getattr(executor.pipeline().transformer, "peft_config", None)


def test_lora_by_air_id_through_lora_paths(tiny_model, tiny_lora):
    mapped = LocalZImageExecutor(
        tiny_model, local_files_only=True, lora_paths={"civitai:1@2": str(tiny_lora)}
    )
    by_air = mapped.generate(make_request(lora=[{"model": "civitai:1@2", "weight": 0.8}]))[0].data
    by_file = LocalZImageExecutor(tiny_model, local_files_only=True, input_roots=[tiny_lora.parent])
    same = by_file.generate(make_request(lora=[{"model": f"file:{tiny_lora}", "weight": 0.8}]))[0].data
    assert by_air == same


# One name per distinct diffusers configuration: aliases map to the same SchedulerChoice.
DISTINCT_SCHEDULERS = list({repr(local.SCHEDULER_MAP[n]): n for n in SUPPORTED_SCHEDULERS}.values())


@pytest.mark.parametrize("name", DISTINCT_SCHEDULERS)
def test_supported_schedulers_run_and_are_deterministic(executor, seed_image, name):
    request = make_request(scheduler=name, steps=3)
    first = executor.generate(request)[0].data
    assert executor.generate(request)[0].data == first
    img2img = make_request(scheduler=name, steps=3, inputs={"seedImage": png_b64(seed_image)}, strength=0.7)
    assert decode(executor.generate(img2img)[0].data).size == (SIZE, SIZE)


def test_scheduler_names_are_runware_names():
    assert set(SUPPORTED_SCHEDULERS) <= set(SCHEDULERS)


def test_progress_is_logged_in_at_most_ten_lines(executor, caplog):
    caplog.set_level(logging.INFO, logger=local.__name__)
    executor.generate(make_request(steps=25, width=SIZE, height=SIZE))
    steps = [r for r in caplog.records if ": step " in r.getMessage()]
    assert 5 <= len(steps) <= 10
    assert steps[-1].getMessage().split(": step ")[1].startswith("25/25")


def test_nan_output_is_an_error_mentioning_fp16(executor, monkeypatch):
    pipe = executor.pipeline()

    def nan_decode(latents, return_dict=False):
        batch, _, h, w = latents.shape
        return (torch.full((batch, 3, h * 2, w * 2), float("nan")),)

    monkeypatch.setattr(pipe.vae, "decode", nan_decode)
    with pytest.raises(LocalGenerationError, match="float16"):
        executor.generate(make_request())


# --------------------------------------------------------------------------------------------------
# Refusals: before any model load
# --------------------------------------------------------------------------------------------------

UUID_IMAGE = str(uuid.uuid4())


def _refusals() -> list[Any]:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("model", {"model": "runware:twinflow-z-image-turbo@0", "width": 1024, "height": 1024}),
        ("controlNet[0].model", {"controlNet": [{"model": "runware:1@1", "guideImage": UUID_IMAGE}]}),
        ("controlNet[0].guideImage", {"controlNet": [{"model": "runware:1@1", "guideImage": UUID_IMAGE}]}),
        ("ultralytics", {"ultralytics": {"confidence": 0.5}}),
        ("webhookURL", {"webhookURL": "https://example.com/hook?token=secret"}),
        ("uploadEndpoint", {"uploadEndpoint": "https://bucket.example.com/put?sig=secret"}),
        ("inputs.seedImage", {"inputs": {"seedImage": UUID_IMAGE}}),
        ("scheduler", {"scheduler": "DDIM"}),
        ("lora[0].model", {"lora": [{"model": "civitai:123@456", "weight": 1.0}]}),
    ]
    return [pytest.param(parameter, kwargs, id=parameter) for parameter, kwargs in cases]


@pytest.fixture
def unloadable_executor(tmp_path) -> LocalZImageExecutor:
    """Points at a folder with no model: any load attempt would fail with a different error."""
    return LocalZImageExecutor(tmp_path / "no-model-here", local_files_only=True)


@pytest.mark.parametrize(("parameter", "kwargs"), _refusals())
def test_refusals_name_the_parameter_and_load_nothing(unloadable_executor, parameter, kwargs):
    loads = local.load_count()
    request = make_request(**kwargs)
    with pytest.raises(ZImageValidationError) as caught:
        unloadable_executor.generate(request)
    assert parameter in caught.value.parameters
    assert parameter in str(caught.value)
    assert "secret" not in str(caught.value) and "secret" not in json.dumps(caught.value.errors)
    assert local.load_count() == loads


@pytest.mark.parametrize(
    ("parameter", "update"),
    [
        ("acceleration", {"acceleration": "high"}),
        ("acceleratorOptions.teaCache", {"accelerator_options": {"teaCache": True}}),
        ("maskMargin", {"mask_margin": 64}),
    ],
)
def test_refusals_of_options_turbo_validation_already_blocks(unloadable_executor, parameter, update):
    # The request model refuses these for Turbo; a request built another way must still be refused here.
    request = make_request().model_copy(update=update)
    with pytest.raises(ZImageValidationError) as caught:
        unloadable_executor.generate(request)
    assert caught.value.parameters == [parameter]


def test_refusals_are_reported_together(unloadable_executor):
    request = make_request(
        scheduler="DDIM", webhookURL="https://example.com/h", ultralytics={"confidence": 0.5}
    )
    with pytest.raises(ZImageValidationError) as caught:
        unloadable_executor.validate(request)
    assert set(caught.value.parameters) == {"scheduler", "webhookURL", "ultralytics"}


def test_strength_leaving_no_step_is_refused(unloadable_executor, seed_image):
    request = make_request(steps=2, strength=0.0, inputs={"seedImage": png_b64(seed_image)})
    with pytest.raises(ZImageValidationError) as caught:
        unloadable_executor.generate(request)
    assert caught.value.parameters == ["strength"]


def test_undecodable_seed_image_is_refused(unloadable_executor):
    request = make_request().model_copy(update={"inputs": Inputs(seedImage="aGVsbG8gd29ybGQ=")})
    with pytest.raises(ZImageValidationError) as caught:
        unloadable_executor.generate(request)
    assert caught.value.parameters == ["inputs.seedImage"]


def test_fp16_is_refused_unless_forced():
    with pytest.raises(ValueError, match="NaN"):
        LocalZImageExecutor(dtype="float16")
    assert LocalZImageExecutor(dtype="fp16", allow_fp16=True).dtype == "float16"
    with pytest.raises(ValueError, match="dtype"):
        LocalZImageExecutor(dtype="int8")


# --------------------------------------------------------------------------------------------------
# Packaging
# --------------------------------------------------------------------------------------------------


def test_module_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
        "from airflow_provider_zimage import local\n"
        "from airflow_provider_zimage.runware.models import ImageInferenceRequest\n"
        "ex = local.LocalZImageExecutor('/nowhere')\n"
        "req = ImageInferenceRequest.build(model='turbo', positivePrompt='a cat', width=128, height=128)\n"
        "try:\n"
        "    ex.generate(req)\n"
        "except local.LocalBackendUnavailable as exc:\n"
        "    assert '[local]' in str(exc) and isinstance(exc, ImportError), exc\n"
        "    print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_local_backend_unavailable_is_an_import_error():
    assert issubclass(LocalBackendUnavailable, ImportError)


def test_gpu_latency_bench_tiny_smoke():
    done = subprocess.run(
        [sys.executable, "bench/gpu_latency.py", "--tiny", "--runs", "1", "--warmup", "0", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["mode"] == "tiny" and report["total"] > 0


def test_gpu_latency_real_configs_have_published_sizes():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_latency
    finally:
        sys.path.remove(str(REPO / "bench"))
    sizes = gpu_latency.count_parameters(gpu_latency.real_components("meta", torch.bfloat16))
    assert 6.0 < sizes["transformer"] < 6.3  # "6B" Z-Image transformer
    assert 3.9 < sizes["text_encoder"] < 4.1  # Qwen3-4B without its LM head
    assert 0.08 < sizes["vae"] < 0.09  # Flux VAE


def test_oversized_seed_image_is_fitted_to_the_api_limits(unloadable_executor):
    big = png_b64(Image.new("RGB", (4100, 1030), (10, 20, 30)))
    plan = unloadable_executor._plan(make_request(inputs={"seedImage": big}, width=None, height=None))
    assert (plan.width, plan.height) == (2048, 512)
    assert plan.seed_image.size == (2048, 512)
