"""Rules of the request models, one test per rule, with the message a DAG author will read."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.runware.models import (
    CATALOG,
    SCHEDULERS,
    ApiErrorDetail,
    ImageInferenceRequest,
    ImageResult,
    Lora,
    estimate_cost,
    resolve_model,
)

TURBO = "runware:z-image@turbo"
ZIMAGE = "runware:z-image@0"
TWINFLOW = "runware:twinflow-z-image-turbo@0"
SEED_IMAGE = "c64351d5-4c59-42f7-95e1-eace013eddab"


def build(model: str = TURBO, **kwargs: Any) -> ImageInferenceRequest:
    kwargs.setdefault("positivePrompt", "a lighthouse at dawn")
    return ImageInferenceRequest.build(model=model, **kwargs)


def refused(**kwargs: Any) -> ZImageValidationError:
    with pytest.raises(ZImageValidationError) as info:
        build(**kwargs)
    return info.value


def problem(err: ZImageValidationError, parameter: str) -> dict[str, Any]:
    matches = [e for e in err.errors if e["parameter"] == parameter]
    assert matches, f"{parameter} not in {err.parameters}: {err}"
    return matches[0]


# -- catalog ---------------------------------------------------------------------------------------


def test_catalog_has_the_three_models_with_their_hf_repos():
    assert set(CATALOG) == {ZIMAGE, TURBO, TWINFLOW}
    assert CATALOG[ZIMAGE].hf_repo == "Tongyi-MAI/Z-Image"
    assert CATALOG[TURBO].hf_repo == "Tongyi-MAI/Z-Image-Turbo"
    assert CATALOG[TWINFLOW].hf_repo is None
    assert (CATALOG[ZIMAGE].local_default_steps, CATALOG[ZIMAGE].local_guidance_scale) == (30, 4.0)
    assert (CATALOG[TURBO].local_default_steps, CATALOG[TURBO].local_guidance_scale) == (8, 0.0)


def test_catalog_capabilities_and_limits():
    for air in (ZIMAGE, TURBO):
        spec = CATALOG[air]
        for capability in ("text-to-image", "image-to-image", "inpainting", "outpainting", "controlnet"):
            assert spec.supports(capability), (air, capability)
        assert spec.supports("ultralytics") and not spec.supports("acceleration")
        assert spec.cfg_scale_max == 20
    twin = CATALOG[TWINFLOW]
    assert twin.capabilities == {"text-to-image", "lora", "acceleration"}
    assert (twin.cfg_scale_max, twin.default_steps, twin.default_cfg_scale) == (50, 4, 0.0)
    assert (twin.default_width, twin.default_height) == (1024, 1024)


def test_estimate_cost_counts_every_result_and_assumes_1024_when_size_is_absent():
    one = estimate_cost(build(TURBO))
    assert one == estimate_cost(build(TURBO, width=1024, height=1024))
    assert estimate_cost(build(TURBO, numberResults=4)) == pytest.approx(4 * one, abs=4e-6)


@pytest.mark.parametrize(
    ("name", "air"),
    [
        (ZIMAGE, ZIMAGE),
        ("z-image", ZIMAGE),
        ("z-image-turbo", TURBO),
        ("turbo", TURBO),
        (" Turbo ", TURBO),
        ("twinflow", TWINFLOW),
        (TWINFLOW, TWINFLOW),
    ],
)
def test_resolve_model_accepts_ids_and_aliases(name, air):
    assert resolve_model(name).air == air


def test_resolve_model_refuses_unknown_names_listing_the_ids():
    with pytest.raises(ZImageValidationError) as info:
        resolve_model("flux-dev")
    assert info.value.parameters == ["model"]
    for air in CATALOG:
        assert air in str(info.value)
    assert "flux-dev" in str(info.value)


# -- building and the wire form --------------------------------------------------------------------


def test_snake_and_camel_case_keys_give_the_same_wire_dict():
    task = str(uuid.uuid4())
    camel = ImageInferenceRequest.build(
        taskUUID=task,
        model="turbo",
        positivePrompt="a red fox",
        CFGScale=2.5,
        numberResults=2,
        acceleratorOptions={"cacheEndStep": 3, "teaCache": True},
        lora=[{"model": "civitai:1@2", "weight": 0.8}],
    )
    snake = ImageInferenceRequest.build(
        task_uuid=task,
        model="turbo",
        positive_prompt="a red fox",
        cfg_scale=2.5,
        number_results=2,
        accelerator_options={"cache_end_step": 3, "tea_cache": True},
        lora=[Lora(model="civitai:1@2", weight=0.8)],
    )
    assert camel.to_wire() == snake.to_wire()
    assert camel.to_wire() == {
        "taskType": "imageInference",
        "taskUUID": task,
        "model": TURBO,
        "positivePrompt": "a red fox",
        "CFGScale": 2.5,
        "numberResults": 2,
        "acceleratorOptions": {"cacheEndStep": 3, "teaCache": True},
        "lora": [{"model": "civitai:1@2", "weight": 0.8}],
    }


def test_wire_names_of_every_renamed_parameter():
    request = build(
        ZIMAGE,
        webhook_url="https://hooks.example.com/z",
        upload_endpoint="https://bucket.example.com/put",
        delivery_method="async",
        output_type="URL",
        output_format="PNG",
        output_quality=90,
        include_cost=True,
        negative_prompt="blurry",
        mask_margin=64,
        inputs={"seed_image": SEED_IMAGE, "mask_image": SEED_IMAGE},
        safety={"check_content": True, "mode": "fast"},
        control_net=[{"model": "cn:1@1", "guide_image": SEED_IMAGE, "control_mode": "prompt"}],
        ultralytics={"cfg_scale": 8.5, "mask_blur": 4, "inpaint_size": 512, "positive_prompt": "face"},
    )
    wire = request.to_wire()
    for key in (
        "webhookURL",
        "uploadEndpoint",
        "deliveryMethod",
        "outputType",
        "outputFormat",
        "outputQuality",
        "includeCost",
        "negativePrompt",
        "maskMargin",
        "controlNet",
    ):
        assert key in wire, key
    assert wire["inputs"] == {"seedImage": SEED_IMAGE, "maskImage": SEED_IMAGE}
    assert wire["safety"] == {"checkContent": True, "mode": "fast"}
    assert wire["controlNet"] == [{"model": "cn:1@1", "guideImage": SEED_IMAGE, "controlMode": "prompt"}]
    assert wire["ultralytics"] == {
        "CFGScale": 8.5,
        "maskBlur": 4,
        "inpaintSize": 512,
        "positivePrompt": "face",
    }


def test_unset_parameters_are_not_sent():
    assert set(build().to_wire()) == {"taskType", "taskUUID", "model", "positivePrompt"}


def test_default_task_uuid_is_a_fresh_uuid4():
    first, second = build(), build()
    assert uuid.UUID(first.task_uuid).version == 4
    assert first.task_uuid != second.task_uuid


@pytest.mark.parametrize(
    "value",
    ["123", "e262cedc-e595-11f1-92ab-02fc00000001", "{e2712b3f-b738-44ab-bc99-3218875f01b1}", 42],
    ids=["digits", "uuid1", "braced-uuid4", "int"],
)
def test_task_uuid_must_be_a_uuid4_string(value):
    err = refused(taskUUID=value)
    assert err.parameters == ["taskUUID"]
    assert "UUID v4" in str(err)


def test_model_alias_is_sent_as_the_air_id():
    assert build("Z-Image").to_wire()["model"] == ZIMAGE


def test_unknown_model_is_refused_listing_the_three_ids():
    err = refused(model="runware:flux@1")
    assert err.parameters == ["model"]
    for air in CATALOG:
        assert air in err.errors[0]["message"]


def test_direct_construction_raises_pydantic_errors_and_build_converts_them():
    with pytest.raises(ValidationError):
        ImageInferenceRequest(model=TURBO, positivePrompt="x")
    err = refused(positivePrompt="x")
    assert isinstance(err, ValueError)  # callers catching ValueError keep working


# -- messages --------------------------------------------------------------------------------------


def test_message_names_parameter_allowed_range_and_value():
    err = refused(width=130, height=1024)
    assert "width: must be a multiple of 16 between 128 and 2048 (got 130)" in str(err)
    assert err.errors == [
        {"parameter": "width", "message": "must be a multiple of 16 between 128 and 2048", "value": 130}
    ]


def test_every_problem_is_reported_at_once():
    err = refused(width=100, height=4000, steps=0, outputQuality=100, numberResults=21, seed=-1)
    assert sorted(err.parameters) == sorted(
        ["width", "height", "steps", "outputQuality", "numberResults", "seed"]
    )
    assert "Invalid Z-Image request (6 problems)" in str(err)
    assert "steps: must be an integer between 1 and 50 (got 0)" in str(err)
    assert "outputQuality: must be an integer between 20 and 99 (got 100)" in str(err)
    assert "numberResults: must be an integer between 1 and 20 (got 21)" in str(err)
    assert "seed: must be an integer between 0 and 9223372036854775807 (got -1)" in str(err)


def test_missing_required_parameters():
    with pytest.raises(ZImageValidationError) as info:
        ImageInferenceRequest.build()
    assert sorted(info.value.parameters) == ["model", "positivePrompt"]
    assert "positivePrompt: is required (a string of 2 to 3000 characters)" in str(info.value)


@pytest.mark.parametrize("prompt", ["x", "x" * 3001])
def test_prompt_length_is_2_to_3000(prompt):
    err = refused(positivePrompt=prompt)
    assert err.parameters == ["positivePrompt"]
    assert "2 to 3000 characters" in str(err)


def test_long_values_are_cut_short_in_messages():
    err = refused(negativePrompt="y" * 5000)
    assert "y" * 100 not in str(err)
    assert "(5000 characters)" in str(err)


@pytest.mark.parametrize(
    ("kwargs", "parameter", "fragment"),
    [
        ({"width": "1024", "height": 1024}, "width", "multiple of 16"),
        ({"steps": 4.0}, "steps", "an integer between 1 and 50"),
        ({"steps": True}, "steps", "an integer"),
        ({"includeCost": "yes"}, "includeCost", "true or false"),
        ({"CFGScale": "7"}, "CFGScale", "a number between 0 and 50"),
        ({"safety": "fast"}, "safety", "an object with keys checkContent, mode"),
        ({"lora": {"model": "a"}}, "lora", "a non-empty list"),
        ({"lora": []}, "lora", "a non-empty list"),
        ({"outputType": "url"}, "outputType", "one of 'URL', 'base64Data', 'dataURI'"),
        ({"outputFormat": "GIF"}, "outputFormat", "one of 'JPG', 'PNG', 'WEBP'"),
        ({"deliveryMethod": "poll"}, "deliveryMethod", "one of 'sync', 'async'"),
        ({"safety": {"mode": "full"}}, "safety.mode", "one of 'none', 'fast'"),
        ({"taskType": "videoInference"}, "taskType", "'imageInference'"),
    ],
)
def test_wrong_types_and_enum_values_are_refused(kwargs, parameter, fragment):
    err = refused(**kwargs)
    assert err.parameters == [parameter]
    assert fragment in problem(err, parameter)["message"]


def test_unknown_keys_are_refused_with_a_suggestion():
    err = refused(cfgScale=3.0, acceleratorOptions={"teacache": True}, sharpness=2)
    assert sorted(err.parameters) == ["acceleratorOptions.teacache", "cfgScale", "sharpness"]
    assert "did you mean CFGScale?" in problem(err, "cfgScale")["message"]
    assert "did you mean teaCache?" in problem(err, "acceleratorOptions.teacache")["message"]
    assert problem(err, "sharpness")["message"] == "is not a known parameter"


def test_a_parameter_given_under_both_names_is_refused():
    err = refused(CFGScale=3.0, cfg_scale=4.0)
    assert err.parameters == ["CFGScale"]
    assert "given twice" in str(err)


def test_url_secrets_are_not_echoed():
    err = refused(
        webhookURL="ftp://user:hunter2@hooks.example.com/z?token=s3cr3t",
        uploadEndpoint="https://bucket.example.com/k?X-Amz-Signature=abc123 x",
    )
    text = str(err) + repr(err.errors)
    for secret in ("hunter2", "s3cr3t", "abc123"):
        assert secret not in text
    assert "hooks.example.com/z?<redacted>" in text


@pytest.mark.parametrize(
    "url", ["hooks.example.com/z", "https://", "https://exa mple.com/", "mailto:ops@example.com"]
)
def test_webhook_url_must_be_an_absolute_http_url(url):
    err = refused(webhookURL=url)
    assert err.parameters == ["webhookURL"]
    assert "absolute http(s) URL" in str(err)


# -- size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [112, 130, 2064, 0, -16])
def test_size_must_be_a_multiple_of_16_between_128_and_2048(side):
    err = refused(width=side, height=side)
    assert sorted(err.parameters) == ["height", "width"]
    assert f"width: must be a multiple of 16 between 128 and 2048 (got {side})" in str(err)


@pytest.mark.parametrize("side", [128, 1024, 1360, 2048])
def test_valid_sizes(side):
    assert build(width=side, height=side).width == side


@pytest.mark.parametrize(("given", "missing"), [("width", "height"), ("height", "width")])
def test_width_and_height_go_together(given, missing):
    err = refused(**{given: 1024})
    assert err.parameters == [missing]
    assert f"is required when {given} is given" in str(err)
    assert "between 128 and 2048" in str(err)


@pytest.mark.parametrize("model", [TWINFLOW, ZIMAGE])
def test_size_is_filled_for_models_that_require_it(model):
    request = build(model)
    assert (request.width, request.height) == (1024, 1024)
    assert request.to_wire()["width"] == 1024


def test_size_is_left_to_runware_for_turbo():
    assert "width" not in build(TURBO).to_wire()


# -- options that only apply together --------------------------------------------------------------


def test_ttl_only_with_url_output():
    assert build(ttl=60).ttl == 60
    assert build(ttl=3600, outputType="URL").ttl == 3600
    err = refused(ttl=600, outputType="base64Data")
    assert err.parameters == ["ttl"]
    assert "only applies when outputType is URL" in str(err) and "(got 600)" in str(err)


def test_ttl_minimum_is_60():
    err = refused(ttl=59)
    assert "ttl: must be an integer >= 60 (got 59)" in str(err)


def test_mask_image_requires_seed_image():
    err = refused(inputs={"maskImage": SEED_IMAGE})
    assert err.parameters == ["inputs.maskImage"]
    assert "requires inputs.seedImage" in str(err)


def test_strength_only_with_seed_image():
    assert build(inputs={"seedImage": SEED_IMAGE}, strength=0.6).strength == 0.6
    err = refused(strength=0.6)
    assert err.parameters == ["strength"]
    assert "only applies with inputs.seedImage (between 0 and 1) (got 0.6)" in str(err)


@pytest.mark.parametrize("strength", [-0.01, 1.01, 0.005])
def test_strength_range_and_step(strength):
    err = refused(inputs={"seedImage": SEED_IMAGE}, strength=strength)
    assert err.parameters == ["strength"]
    assert "between 0 and 1 in steps of 0.01" in str(err)


def test_mask_margin_only_with_mask_image():
    inpaint = {"seedImage": SEED_IMAGE, "maskImage": SEED_IMAGE}
    assert build(inputs=inpaint, maskMargin=32).mask_margin == 32
    err = refused(inputs={"seedImage": SEED_IMAGE}, maskMargin=64)
    assert err.parameters == ["maskMargin"]
    assert "only applies with inputs.maskImage (between 32 and 128) (got 64)" in str(err)
    err = refused(inputs=inpaint, maskMargin=129)
    assert "maskMargin: must be an integer between 32 and 128 (got 129)" in str(err)


def test_outpaint_requires_seed_image_and_a_direction():
    assert build(inputs={"seedImage": SEED_IMAGE}, outpaint={"left": 256}).outpaint is not None
    err = refused(outpaint={"top": 128})
    assert err.parameters == ["outpaint"]
    assert "requires inputs.seedImage" in str(err)
    for empty in ({}, {"top": 0, "bottom": 0}):
        err = refused(inputs={"seedImage": SEED_IMAGE}, outpaint=empty)
        assert err.parameters == ["outpaint"]
        assert "at least one of top, bottom, left, right" in str(err)
    err = refused(inputs={"seedImage": SEED_IMAGE}, outpaint={"top": -1})
    assert "outpaint.top: must be an integer >= 0 (got -1)" in str(err)


@pytest.mark.parametrize(
    "image",
    [
        SEED_IMAGE,
        "https://example.com/seed.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "iVBORw0KGgoAAAANSUhEUg==",
    ],
)
def test_image_inputs_accept_uuid_uri_data_uri_and_base64(image):
    assert build(inputs={"seedImage": image}).inputs.seed_image == image


@pytest.mark.parametrize("image", ["not an image", "", "data:image/png;base64,iVBO Rw=="])
def test_image_inputs_refuse_anything_else(image):
    err = refused(inputs={"seedImage": image})
    assert err.parameters == ["inputs.seedImage"]
    assert "UUID, a URI, a data URI" in str(err)


# -- step windows ----------------------------------------------------------------------------------


def test_accelerator_step_alternatives_are_mutually_exclusive():
    err = refused(
        acceleratorOptions={
            "cacheStartStep": 1,
            "cacheStartStepPercentage": 10,
            "cacheEndStep": 5,
            "cacheEndStepPercentage": 90,
        }
    )
    assert sorted(err.parameters) == [
        "acceleratorOptions.cacheEndStepPercentage",
        "acceleratorOptions.cacheStartStepPercentage",
    ]
    assert "cannot be combined with cacheStartStep" in str(err)


def test_accelerator_start_before_end():
    err = refused(acceleratorOptions={"cacheStartStep": 5, "cacheEndStep": 5})
    assert err.parameters == ["acceleratorOptions.cacheStartStep"]
    assert "must be less than cacheEndStep (5) (got 5)" in str(err)
    err = refused(acceleratorOptions={"cacheStartStepPercentage": 60, "cacheEndStepPercentage": 40})
    assert err.parameters == ["acceleratorOptions.cacheStartStepPercentage"]
    assert "must be less than cacheEndStepPercentage (40) (got 60)" in str(err)


def test_accelerator_end_step_within_steps():
    assert build(steps=8, acceleratorOptions={"cacheEndStep": 8}).steps == 8
    err = refused(steps=8, acceleratorOptions={"cacheEndStep": 9})
    assert err.parameters == ["acceleratorOptions.cacheEndStep"]
    assert "must be between 1 and 8 (steps) (got 9)" in str(err)


def test_end_step_checked_against_the_model_default_steps():
    err = refused(model=TWINFLOW, acceleratorOptions={"cacheEndStep": 6})
    assert err.parameters == ["acceleratorOptions.cacheEndStep"]
    assert "must be between 1 and 4" in str(err) and "default steps" in str(err)


@pytest.mark.parametrize(
    ("options", "parameter", "fragment"),
    [
        ({"cacheMaxConsecutiveSteps": 6}, "cacheMaxConsecutiveSteps", "between 1 and 5"),
        ({"cacheStartStepPercentage": 100}, "cacheStartStepPercentage", "between 0 and 99"),
        ({"cacheEndStepPercentage": 0}, "cacheEndStepPercentage", "between 1 and 100"),
        ({"fbCacheThreshold": 1.5}, "fbCacheThreshold", "between 0 and 1 in steps of 0.01"),
        ({"teaCacheDistance": 0.555}, "teaCacheDistance", "between 0 and 1 in steps of 0.01"),
        ({"dbCacheThreshold": -0.1}, "dbCacheThreshold", "between 0 and 1 in steps of 0.01"),
        ({"dbCacheSkipInterval": 0}, "dbCacheSkipInterval", ">= 1"),
        ({"cacheStartStep": -1}, "cacheStartStep", ">= 0"),
        ({"cacheEndStep": 0}, "cacheEndStep", ">= 1"),
        ({"fbCache": "on"}, "fbCache", "true or false"),
    ],
)
def test_accelerator_option_ranges(options, parameter, fragment):
    err = refused(acceleratorOptions=options)
    assert err.parameters == [f"acceleratorOptions.{parameter}"]
    assert fragment in str(err)


def test_controlnet_windows_and_steps():
    guide = {"model": "cn:1@1", "guideImage": SEED_IMAGE}
    assert build(steps=20, controlNet=[{**guide, "startStep": 0, "endStep": 20}]).control_net
    err = refused(
        steps=20,
        controlNet=[
            {**guide, "startStep": 0, "endStep": 21},
            {**guide, "startStep": 5, "startStepPercentage": 10},
            {**guide, "startStepPercentage": 50, "endStepPercentage": 50},
        ],
    )
    assert sorted(err.parameters) == [
        "controlNet[1].startStepPercentage",
        "controlNet[2].startStepPercentage",
    ]  # field-level problems first: the step count is checked once every item is valid
    err = refused(steps=20, controlNet=[guide, {**guide, "startStep": 0, "endStep": 21}])
    assert err.parameters == ["controlNet[1].endStep"]
    assert "controlNet[1].endStep: must be between 1 and 20 (steps) (got 21)" in str(err)


@pytest.mark.parametrize(
    ("item", "parameter", "fragment"),
    [
        ({"weight": 4.01}, "weight", "between -4 and 4 in steps of 0.01"),
        ({"weight": -4.5}, "weight", "between -4 and 4"),
        ({"weight": 0.333}, "weight", "in steps of 0.01"),
        ({"controlMode": "strict"}, "controlMode", "'balanced', 'controlnet', 'prompt'"),
        ({"startStepPercentage": 100}, "startStepPercentage", "between 0 and 99"),
        ({"endStepPercentage": 101}, "endStepPercentage", "between 1 and 100"),
        ({"model": "bad model"}, "model", "a string matching"),
        ({"guideImage": "no image"}, "guideImage", "an image UUID"),
    ],
)
def test_controlnet_item_ranges(item, parameter, fragment):
    err = refused(controlNet=[{"model": "cn:1@1", "guideImage": SEED_IMAGE, **item}])
    assert err.parameters == [f"controlNet[0].{parameter}"]
    assert fragment in str(err)


def test_controlnet_guide_image_is_required():
    err = refused(controlNet=[{"model": "cn:1@1"}])
    assert err.parameters == ["controlNet[0].guideImage"]


# -- lora ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [-4, -4.0, 0, 0.07, 1.23, 4])
def test_lora_weights_in_range_and_on_the_step_are_accepted(weight):
    assert build(lora=[{"model": "civitai:1@2", "weight": weight}]).lora[0].weight == weight


@pytest.mark.parametrize("weight", [-4.01, 4.01, 0.075, 100])
def test_lora_weights_off_range_or_step_are_refused(weight):
    err = refused(lora=[{"model": "civitai:1@2"}, {"model": "civitai:3@4", "weight": weight}])
    assert err.parameters == ["lora[1].weight"]
    assert f"lora[1].weight: must be a number between -4 and 4 in steps of 0.01 (got {weight})" in str(err)


@pytest.mark.parametrize("model", ["civitai:1@2", "my-lora", "runware:z/lora@v1.2", "a.b_c-d"])
def test_lora_model_ids_matching_the_pattern(model):
    assert build(lora=[{"model": model}]).lora[0].model == model


@pytest.mark.parametrize("model", ["", "civitai:1@2 x", "a:b:c", "é"])
def test_lora_model_ids_off_the_pattern(model):
    err = refused(lora=[{"model": model}])
    assert err.parameters == ["lora[0].model"]


def test_lora_transformer_values():
    assert build(lora=[{"model": "a", "transformer": "high"}]).lora[0].transformer == "high"
    err = refused(lora=[{"model": "a", "transformer": "mid"}])
    assert "lora[0].transformer: must be one of 'high', 'low', 'both' (got 'mid')" in str(err)


# -- per-model rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [TURBO, ZIMAGE])
def test_cfg_scale_max_is_20_for_z_image(model):
    assert build(model, CFGScale=20).cfg_scale == 20
    err = refused(model=model, CFGScale=20.5)
    assert err.parameters == ["CFGScale"]
    assert f"CFGScale: must be between 0 and 20 for {model} (got 20.5)" in str(err)


def test_cfg_scale_max_is_50_for_twinflow():
    assert build(TWINFLOW, CFGScale=50).cfg_scale == 50
    err = refused(model=TWINFLOW, CFGScale=50.01)
    assert "CFGScale: must be a number between 0 and 50 in steps of 0.01 (got 50.01)" in str(err)


@pytest.mark.parametrize("value", [0.07, 0.29, 3.3, 7.01, 19.99])
def test_cfg_scale_step_is_float_tolerant(value):
    assert build(CFGScale=value).cfg_scale == value


def test_cfg_scale_off_the_step_is_refused():
    err = refused(CFGScale=7.005)
    assert "in steps of 0.01" in str(err)


@pytest.mark.parametrize("level", ["none", "low", "medium", "high"])
def test_acceleration_only_on_twinflow(level):
    assert build(TWINFLOW, acceleration=level).acceleration == level
    err = refused(acceleration=level)
    assert err.parameters == ["acceleration"]
    assert f"is not supported by {TURBO} (supported by: {TWINFLOW})" in str(err)


def test_acceleration_values():
    err = refused(model=TWINFLOW, acceleration="max")
    assert "acceleration: must be one of 'none', 'low', 'medium', 'high' (got 'max')" in str(err)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"inputs": {"seedImage": SEED_IMAGE}}, "inputs.seedImage"),
        ({"inputs": {"seedImage": SEED_IMAGE}, "strength": 0.5}, "strength"),
        ({"strength": 0.5}, "strength"),
        ({"maskMargin": 40}, "maskMargin"),
        ({"outpaint": {"top": 64}}, "outpaint"),
        ({"controlNet": [{"model": "cn:1@1", "guideImage": SEED_IMAGE}]}, "controlNet"),
        ({"ultralytics": {"steps": 10}}, "ultralytics"),
    ],
)
def test_twinflow_is_text_to_image_only(kwargs, parameter):
    err = refused(model=TWINFLOW, **kwargs)
    assert parameter in err.parameters
    assert f"{parameter}: is not supported by {TWINFLOW}" in str(err)


def test_twinflow_refusals_are_reported_together():
    err = refused(
        model=TWINFLOW,
        inputs={"seedImage": SEED_IMAGE, "maskImage": SEED_IMAGE},
        ultralytics={"inpaintSize": 512},
    )
    assert err.parameters == ["inputs.seedImage", "inputs.maskImage", "ultralytics"]


def test_twinflow_accepts_lora_and_accelerator_options():
    request = build(
        TWINFLOW,
        steps=6,
        lora=[{"model": "civitai:1@2"}],
        acceleratorOptions={"teaCache": True, "cacheEndStep": 6},
        CFGScale=3.5,
    )
    assert request.to_wire()["acceleratorOptions"] == {"teaCache": True, "cacheEndStep": 6}


def test_ultralytics_inpaint_size_only_on_z_image():
    assert build(ZIMAGE, ultralytics={"inpaintSize": 512}).ultralytics.inpaint_size == 512
    err = refused(ultralytics={"inpaintSize": 512})
    assert err.parameters == ["ultralytics.inpaintSize"]
    assert f"supported by: {ZIMAGE}" in str(err)


@pytest.mark.parametrize(
    ("options", "parameter", "fragment"),
    [
        ({"CFGScale": 50.5}, "CFGScale", "between 0 and 50 in steps of 0.1"),
        ({"CFGScale": 7.25}, "CFGScale", "in steps of 0.1"),
        ({"confidence": 1.1}, "confidence", "between 0 and 1 in steps of 0.01"),
        ({"maskBlur": 101}, "maskBlur", "between 0 and 100"),
        ({"maskPadding": 21}, "maskPadding", "between 0 and 20"),
        ({"steps": 0}, "steps", "between 1 and 100"),
        ({"strength": 1.5}, "strength", "between 0 and 1 in steps of 0.01"),
        ({"positivePrompt": 3}, "positivePrompt", "a string"),
        ({"inpaintSize": 100}, "inpaintSize", "between 128 and 2048"),
    ],
)
def test_ultralytics_ranges(options, parameter, fragment):
    err = refused(model=ZIMAGE, ultralytics=options)
    assert err.parameters == [f"ultralytics.{parameter}"]
    assert fragment in str(err)


def test_ultralytics_accepts_tenths_of_cfg_scale():
    assert build(ultralytics={"CFGScale": 8.3, "confidence": 0.07}).ultralytics.cfg_scale == 8.3


# -- scheduler -------------------------------------------------------------------------------------


def test_there_are_75_distinct_schedulers_and_all_are_accepted():
    assert len(SCHEDULERS) == len(set(SCHEDULERS)) == 75
    for name in SCHEDULERS:
        assert build(scheduler=name).scheduler == name


def test_unknown_scheduler_names_the_closest_valid_names():
    err = refused(scheduler="Euler A")
    assert err.parameters == ["scheduler"]
    assert "must be spelled 'Euler a'" in str(err)
    typo = refused(scheduler="DPM++ 2M Karas")
    assert "the closest are 'DPM++ 2M Karras'" in str(typo)
    assert "75" in str(typo) and "models.SCHEDULERS" in str(typo)


# -- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_ignores_delivery_plumbing():
    base = build(seed=42, width=1024, height=768)
    same = build(
        seed=42,
        width=1024,
        height=768,
        webhookURL="https://hooks.example.com/z?token=1",
        uploadEndpoint="https://bucket.example.com/put",
        deliveryMethod="async",
    )
    assert base.task_uuid != same.task_uuid
    assert re.fullmatch(r"[0-9a-f]{64}", base.fingerprint())
    assert base.fingerprint() == same.fingerprint()


@pytest.mark.parametrize(
    "change",
    [{"seed": 43}, {"positivePrompt": "a lighthouse at dusk"}, {"steps": 9}, {"outputFormat": "PNG"}],
)
def test_fingerprint_changes_with_what_the_image_is(change):
    assert build(seed=42).fingerprint() != build(**{"seed": 42, **change}).fingerprint()


@pytest.mark.parametrize(
    "delivery",
    [
        {"outputType": "base64Data"},
        {"outputType": "dataURI"},
        {"outputType": "URL"},
        {"includeCost": True},
        {"includeCost": False},
        {"ttl": 3600},
        {"deliveryMethod": "sync"},
    ],
)
def test_fingerprint_is_of_the_picture_not_of_how_it_travels(delivery):
    assert build(seed=42).fingerprint() == build(seed=42, **delivery).fingerprint()


@pytest.mark.parametrize(
    "default",
    [
        {"outputFormat": "JPG"},
        {"outputQuality": 95},
        {"numberResults": 1},
        {"width": 1024, "height": 1024},
        {"safety": {"checkContent": False}},
        {"lora": [{"model": "civitai:1@1", "weight": 1}]},
    ],
)
def test_a_documented_default_spelled_out_fingerprints_like_leaving_it_unset(default):
    unset = {k: v for k, v in default.items() if k == "lora"}
    if unset:
        unset = {"lora": [{"model": "civitai:1@1"}]}
    assert build(seed=42, **unset).fingerprint() == build(seed=42, **default).fingerprint()


def test_the_legacy_fingerprint_is_what_0_1_0_computed():
    """0.1.0 hashed every wire field but taskUUID, webhookURL, uploadEndpoint and deliveryMethod."""
    import hashlib
    import json

    request = build(seed=42, includeCost=True, outputFormat="PNG")
    wire = {k: v for k, v in request.to_wire().items() if k not in ("taskUUID", "deliveryMethod")}
    digest = hashlib.sha256(json.dumps(wire, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert request.legacy_fingerprints() == [digest]
    assert request.fingerprint() != digest


def test_fingerprint_is_independent_of_spelling():
    assert build("turbo", CFGScale=2).fingerprint() == build(TURBO, cfg_scale=2.0).fingerprint()
    assert build(TWINFLOW).fingerprint() == build(TWINFLOW, width=1024, height=1024).fingerprint()


# -- results ---------------------------------------------------------------------------------------


def test_image_result_from_wire_keeps_unknown_fields():
    item = {
        "taskType": "imageInference",
        "taskUUID": "b235b0c2-8081-499d-97a6-3bc21824c55a",
        "imageUUID": "52650014-5265-4d72-9520-e5dfd6ebe403",
        "imageURL": "https://im.runware.ai/image/x.jpg",
        "seed": 22452,
        "NSFWContent": False,
        "cost": 0.0006,
        "status": "success",
        "someNewField": {"a": 1},
    }
    result = ImageResult.from_wire(item)
    assert result.image_uuid == "52650014-5265-4d72-9520-e5dfd6ebe403"
    assert result.image_url == "https://im.runware.ai/image/x.jpg"
    assert (result.seed, result.nsfw_content, result.cost, result.status) == (22452, False, 0.0006, "success")
    assert result.model_extra == {"someNewField": {"a": 1}}
    assert result.model_dump(by_alias=True, exclude_none=True) == item


def test_image_result_base64_fields():
    result = ImageResult.from_wire({"imageBase64Data": "aGk=", "imageDataURI": "data:image/png;base64,aGk="})
    assert (result.image_base64_data, result.image_data_uri) == ("aGk=", "data:image/png;base64,aGk=")


def test_api_error_detail_from_wire():
    detail = ApiErrorDetail.from_wire(
        {
            "code": "conflictTaskUUID",
            "message": "taskUUID already used",
            "parameter": "taskUUID",
            "taskType": "imageInference",
            "taskUUID": "b235b0c2-8081-499d-97a6-3bc21824c55a",
            "documentation": "https://runware.ai/docs",
            "extra": 1,
        }
    )
    assert (detail.code, detail.parameter) == ("conflictTaskUUID", "taskUUID")
    assert detail.task_type == "imageInference"
    assert detail.task_uuid == "b235b0c2-8081-499d-97a6-3bc21824c55a"
    assert detail.documentation == "https://runware.ai/docs"
    assert detail.model_extra == {"extra": 1}
    assert ApiErrorDetail.from_wire({}).code is None
