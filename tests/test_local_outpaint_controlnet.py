"""Outpainting, crop-and-zoom inpainting (`maskMargin`) and ControlNet on the local backends, run for
real on the tiny random checkpoint: in-process (`LocalZImageExecutor`) and in the `zimage-executor`
service (a child process spoken to over HTTP)."""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from airflow_provider_zimage import local  # noqa: E402
from airflow_provider_zimage.exceptions import ZImageValidationError  # noqa: E402
from airflow_provider_zimage.executor.process import ExecutorProcess  # noqa: E402
from airflow_provider_zimage.local import LocalZImageExecutor, batch_key  # noqa: E402
from airflow_provider_zimage.runware.models import ImageInferenceRequest  # noqa: E402
from airflow_provider_zimage.testing.tiny_model import build_tiny_controlnet  # noqa: E402

pytestmark = pytest.mark.local

TURBO = "runware:z-image@turbo"
CONTROLNET_AIR = "civitai:999@1"  # the id a DAG would use on Runware, mapped to local weights here


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_controlnet(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_controlnet(tiny_model, tmp_path_factory.mktemp("controlnet") / "cn")


@pytest.fixture(scope="module")
def engine(tiny_model: Path, tiny_controlnet: Path) -> LocalZImageExecutor:
    return LocalZImageExecutor(
        tiny_model, local_files_only=True, controlnet_paths={CONTROLNET_AIR: tiny_controlnet}
    )


@pytest.fixture
def unloadable(tmp_path: Path, tiny_controlnet: Path) -> LocalZImageExecutor:
    """No model behind it: a refusal that got as far as loading would fail with another error."""
    return LocalZImageExecutor(
        tmp_path / "no-model-here", local_files_only=True, controlnet_paths={CONTROLNET_AIR: tiny_controlnet}
    )


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Busy pixels (noise over a gradient): a copy that is off by one anywhere shows."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1))], 2)
    noise = rng.integers(0, 64, (height, width, 3))
    pixels = np.concatenate([base, np.full((height, width, 1), 128.0)], 2) * 0.75 + noise
    return Image.fromarray(pixels.clip(0, 255).astype("uint8"))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def make_request(**overrides: Any) -> ImageInferenceRequest:
    params: dict[str, Any] = {
        "model": TURBO,
        "positivePrompt": "a lighthouse on a cliff",
        "steps": 3,
        "seed": 7,
        "outputFormat": "PNG",
    }
    params.update(overrides)
    return ImageInferenceRequest.build(**params)


def refused(executor: LocalZImageExecutor, request: ImageInferenceRequest) -> ZImageValidationError:
    loads = local.load_count()
    with pytest.raises(ZImageValidationError) as caught:
        executor.generate(request)
    assert local.load_count() == loads, "refused after loading the model"
    return caught.value


# --------------------------------------------------------------------------------------------------
# Outpainting
# --------------------------------------------------------------------------------------------------

SOURCE = picture(96, 112)
OUTPAINT = {"top": 16, "left": 32}  # 96 + 32 = 128 wide, 112 + 16 = 128 high


def outpaint_request(**overrides: Any) -> ImageInferenceRequest:
    params = {"inputs": {"seedImage": b64(SOURCE)}, "outpaint": OUTPAINT, "strength": 1.0}
    return make_request(**{**params, **overrides})


def test_outpaint_gives_the_source_plus_the_padding_with_the_source_kept_to_the_byte(engine):
    [first] = engine.generate(outpaint_request())
    [second] = engine.generate(outpaint_request(seed=8))
    one, two = pixels(first.data), pixels(second.data)
    assert one.shape == (112 + 16, 96 + 32, 3)
    kept = np.asarray(SOURCE)
    assert np.array_equal(one[16:, 32:], kept) and np.array_equal(two[16:, 32:], kept)
    # The new border is generated: it depends on the seed and is not a copy of the source's edge.
    assert not np.array_equal(one[:16], two[:16]) and not np.array_equal(one[16:, :32], two[16:, :32])


def test_outpaint_accepts_the_width_and_height_it_produces(engine):
    [image] = engine.generate(outpaint_request(width=128, height=128))
    assert pixels(image.data).shape == (128, 128, 3)


def test_outpaint_off_the_16_pixel_grid_is_refused_naming_the_side_and_the_range(unloadable):
    error = refused(unloadable, outpaint_request(outpaint={"top": 16, "right": 20}))
    assert error.parameters == ["outpaint.right"]
    assert "multiple of 16 between 128 and 2048" in str(error) and "outpaint.right 32" in str(error)


def test_outpaint_with_a_width_that_is_not_source_plus_padding_is_refused_naming_width(unloadable):
    error = refused(unloadable, outpaint_request(width=256, height=128))
    assert error.parameters == ["width"] and "must be 128" in str(error)


def test_outpaint_past_the_largest_side_is_refused(unloadable):
    error = refused(unloadable, outpaint_request(outpaint={"top": 2000, "left": 32}))
    assert error.parameters == ["outpaint.top"] and "2048" in str(error)


def test_outpaint_runs_alone_in_the_executor_batches(engine):
    assert batch_key(engine.plan(outpaint_request())) is None


# --------------------------------------------------------------------------------------------------
# maskMargin
# --------------------------------------------------------------------------------------------------

SEED = picture(128, 128, seed=1)
MASK = Image.new("L", (128, 128), 0)
MASK.paste(255, (56, 40, 72, 64))


def margin_request(**overrides: Any) -> ImageInferenceRequest:
    params = {
        "inputs": {"seedImage": b64(SEED), "maskImage": b64(MASK)},
        "maskMargin": 32,
        "strength": 1.0,
        "width": 128,
        "height": 128,
        "CFGScale": 0,
    }
    return make_request(**{**params, **overrides})


def test_mask_margin_repaints_only_the_masked_pixels_and_keeps_the_rest_to_the_byte(engine):
    [zoomed] = engine.generate(margin_request())
    [plain] = engine.generate(margin_request(maskMargin=None))
    out, source, inside = pixels(zoomed.data), np.asarray(SEED), np.asarray(MASK) > 0
    assert np.array_equal(out[~inside], source[~inside])
    assert not np.array_equal(out[inside], source[inside])
    # Inpainted on the zoomed crop, not on the whole picture: the masked pixels come out otherwise.
    assert not np.array_equal(out[inside], pixels(plain.data)[inside])


def test_mask_margin_calls_the_pipeline_on_the_zoomed_crop(engine):
    plan = engine.plan(margin_request())
    kwargs = plan.pipeline_kwargs()
    # The 16x24 mask at (56, 40) plus 32 pixels each side is an 80x88 crop, scaled up towards the
    # output's pixel count, on the 16-pixel grid.
    assert plan.region is not None and plan.region.box == (24, 8, 104, 96)
    width, height = kwargs["width"], kwargs["height"]
    assert width > 80 and height > 88 and width % 16 == 0 and height % 16 == 0
    assert kwargs["image"].size == kwargs["mask_image"].size == (width, height)


def test_mask_margin_with_an_empty_mask_is_refused_naming_the_mask(unloadable):
    empty = Image.new("L", (128, 128), 0)
    request = margin_request(inputs={"seedImage": b64(SEED), "maskImage": b64(empty)})
    error = refused(unloadable, request)
    assert error.parameters == ["inputs.maskImage"] and "between 32 and 128" in str(error)


def test_mask_margin_without_a_mask_is_refused_even_past_the_request_model(unloadable):
    request = make_request().model_copy(update={"mask_margin": 64})
    assert refused(unloadable, request).parameters == ["maskMargin"]


# --------------------------------------------------------------------------------------------------
# ControlNet
# --------------------------------------------------------------------------------------------------

GUIDE_A = picture(128, 128, seed=2)
GUIDE_B = Image.new("RGB", (128, 128), (255, 255, 255))


def controlnet_request(guide: Image.Image = GUIDE_A, **entry: Any) -> ImageInferenceRequest:
    return make_request(
        width=128,
        height=128,
        controlNet=[{"model": CONTROLNET_AIR, "guideImage": b64(guide), **entry}],
    )


def test_the_guide_image_changes_the_picture(engine):
    [a] = engine.generate(controlnet_request(GUIDE_A))
    [b] = engine.generate(controlnet_request(GUIDE_B))
    [none] = engine.generate(make_request(width=128, height=128))
    assert a.data != b.data and a.data != none.data


def test_controlnet_weight_is_the_conditioning_scale_and_zero_means_no_influence(engine):
    [zero] = engine.generate(controlnet_request(weight=0))
    [half] = engine.generate(controlnet_request(weight=0.5))
    [none] = engine.generate(make_request(width=128, height=128))
    assert zero.data == none.data and half.data != none.data


def test_controlnet_step_windows_switch_the_guidance_off_outside_them(engine):
    [full] = engine.generate(controlnet_request())
    [whole] = engine.generate(controlnet_request(startStep=0, endStep=3))
    [late] = engine.generate(controlnet_request(startStep=1, endStep=3))
    [late_pct] = engine.generate(controlnet_request(startStepPercentage=34, endStepPercentage=100))
    [none] = engine.generate(make_request(width=128, height=128))
    assert whole.data == full.data
    assert late.data not in (full.data, none.data)
    assert late_pct.data == late.data  # 34% of 3 steps starts at step 1, as startStep=1 does


def test_a_controlnet_request_runs_alone_in_the_executor_batches(engine):
    assert batch_key(engine.plan(controlnet_request())) is None


@pytest.mark.parametrize(
    ("parameter", "request_kwargs"),
    [
        ("controlNet[0].model", {"controlNet": [{"model": "civitai:1@1", "guideImage": "x"}]}),
        (
            "controlNet[1]",
            {
                "controlNet": [
                    {"model": CONTROLNET_AIR, "guideImage": "x"},
                    {"model": CONTROLNET_AIR, "guideImage": "x"},
                ]
            },
        ),
        (
            "controlNet[0].controlMode",
            {"controlNet": [{"model": CONTROLNET_AIR, "guideImage": "x", "controlMode": "prompt"}]},
        ),
        (
            "controlNet[0].guideImage",
            {"controlNet": [{"model": CONTROLNET_AIR, "guideImage": str(uuid.uuid4())}]},
        ),
        (
            "controlNet",
            {
                "controlNet": [{"model": CONTROLNET_AIR, "guideImage": "x"}],
                "inputs": {"seedImage": b64(SEED)},
            },
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_controlnet_refusals_name_the_parameter_before_any_load(unloadable, parameter, request_kwargs):
    error = refused(unloadable, make_request(width=128, height=128, **request_kwargs))
    assert parameter in error.parameters and parameter in str(error)


# --------------------------------------------------------------------------------------------------
# The executor service
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tiny_model: Path, tiny_controlnet: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    process = ExecutorProcess(
        {TURBO: str(tiny_model)},
        tmp_path_factory.mktemp("executor"),
        "--devices",
        "cpu",
        "--fetch-grace",
        "0",
        "--controlnet",
        f"{CONTROLNET_AIR}={tiny_controlnet}",
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    ).start()
    yield process
    assert process.stop() == 0, process.log()[-3000:]


def run_sync(process: ExecutorProcess, request: ImageInferenceRequest) -> httpx.Response:
    task = {**request.to_wire(), "deliveryMethod": "sync", "outputType": "base64Data"}
    headers = {"Authorization": f"Bearer {process.token}"}
    return httpx.post(process.url, json=[task], headers=headers, timeout=300)


def image_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    return pixels(base64.b64decode(item["imageBase64Data"]))


def test_the_executor_outpaints_keeping_the_source_to_the_byte(service):
    out = image_of(run_sync(service, outpaint_request()))
    assert out.shape == (128, 128, 3) and np.array_equal(out[16:, 32:], np.asarray(SOURCE))


def test_the_executor_inpaints_with_mask_margin_keeping_unmasked_pixels(service):
    out, inside = image_of(run_sync(service, margin_request())), np.asarray(MASK) > 0
    assert np.array_equal(out[~inside], np.asarray(SEED)[~inside])
    assert not np.array_equal(out[inside], np.asarray(SEED)[inside])


def test_the_executor_serves_a_mapped_controlnet_and_the_guide_changes_the_picture(service):
    a = image_of(run_sync(service, controlnet_request(GUIDE_A)))
    b = image_of(run_sync(service, controlnet_request(GUIDE_B)))
    assert not np.array_equal(a, b)


def test_the_executor_refuses_an_unmapped_controlnet_naming_the_parameter(service):
    request = make_request(width=128, height=128, controlNet=[{"model": "civitai:1@1", "guideImage": "x"}])
    response = run_sync(service, request)
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert any(e.get("parameter") == "controlNet[0].model" for e in errors), json.dumps(errors)
