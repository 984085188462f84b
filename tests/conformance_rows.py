"""The conformance matrix's requests: one fragment per row of the support table (runware/support.py).

Shared by tests/test_conformance.py (Runware test server, executor, in-process planner) and
tests/test_conformance_openai_images.py (the OpenAI images backend), so every backend is asked the
same questions.
"""

from __future__ import annotations

import base64
import io
import uuid
from typing import Any

from PIL import Image

TURBO = "runware:z-image@turbo"


def inference(**overrides: Any) -> dict[str, Any]:
    """A task both servers accept: small, fast, valid for the published schema and the local backend."""
    task: dict[str, Any] = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": TURBO,
        "positivePrompt": "a lighthouse on a cliff at dusk",
        "width": 128,
        "height": 128,
        "steps": 2,
        "seed": 7,
        "outputFormat": "PNG",
        "deliveryMethod": "async",
    }
    task.update(overrides)
    return task


def _png(mode: str, colour: int | tuple[int, int, int], size: int = 128) -> str:
    image = Image.new(mode, (size, size), colour)
    if mode == "L":
        image.paste(255, (32, 32, 96, 96))  # the area to repaint
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


SEED_B64 = _png("RGB", (40, 90, 160))
SEED_URI = f"data:image/png;base64,{SEED_B64}"
MASK_B64 = _png("L", 0)
WITH_SEED = {"inputs": {"seedImage": SEED_URI}}
WITH_MASK = {"inputs": {"seedImage": SEED_URI, "maskImage": MASK_B64}}
TWINFLOW = "runware:twinflow-z-image-turbo@0"
CONTROLNET = {"model": "runware:25@1", "guideImage": SEED_URI}
ACCELERATOR = {
    "cacheEndStep": 4,  # with CACHE_STEPS: a cache needs steps to reuse
    "cacheEndStepPercentage": 50,
    "cacheMaxConsecutiveSteps": 2,
    "cacheStartStep": 0,
    "cacheStartStepPercentage": 10,
    "fbCache": True,
    "fbCacheThreshold": 0.2,
    "teaCache": True,
    "teaCacheDistance": 0.4,
    "dbCache": True,
    "dbCacheThreshold": 0.2,
    "dbCacheSkipInterval": 3,
}
CACHE_STEPS = 4  # the matrix runs one step elsewhere; step caching never reuses step 0
CONTROLNET_MEMBERS = {
    "model": {},
    "weight": {"weight": 0.5},
    "guideImage": {},
    "controlMode": {"controlMode": "balanced"},
    "endStep": {"endStep": 1},
    "endStepPercentage": {"endStepPercentage": 80},
    "startStep": {"startStep": 0},
    "startStepPercentage": {"startStepPercentage": 10},
}
ULTRALYTICS = {
    "CFGScale": 4.0,
    "confidence": 0.5,
    "maskBlur": 4,
    "maskPadding": 4,
    "negativePrompt": "blurry",
    "positivePrompt": "a clear face",
    "steps": 4,
    "strength": 0.3,
    "inpaintSize": 512,
}


def row_examples(sink: str, lora: str) -> dict[str, dict[str, Any]]:
    """One request fragment per row, valid for Runware's schema and setting that row's parameter.
    A new row needs an example here: test_every_row_has_an_example says so."""
    examples: dict[str, dict[str, Any]] = {
        "taskType": {},
        "taskUUID": {},
        "webhookURL": {"webhookURL": f"{sink}/hook?token=t"},
        "includeCost": {"includeCost": True},
        "model": {},
        "numberResults": {"numberResults": 2},
        "uploadEndpoint": {"uploadEndpoint": f"{sink}/bucket/{uuid.uuid4()}.png"},
        "ttl": {"ttl": 60, "outputType": "URL"},
        "outputType": {"outputType": "base64Data"},
        "outputFormat": {"outputFormat": "WEBP"},
        "outputQuality": {"outputFormat": "JPG", "outputQuality": 50},
        "deliveryMethod": {"deliveryMethod": "async"},
        "safety": {"safety": {"mode": "none"}},
        "safety.checkContent": {"safety": {"checkContent": True}},
        "safety.mode": {"safety": {"mode": "fast"}},
        "inputs": WITH_SEED,
        "inputs.seedImage": {"inputs": {"seedImage": SEED_B64}},
        "inputs.maskImage": WITH_MASK,
        "positivePrompt": {"positivePrompt": "a red bicycle against a white wall"},
        "negativePrompt": {"negativePrompt": "blurry"},
        "width": {"width": 192, "height": 128},
        "height": {"width": 128, "height": 192},
        "seed": {"seed": 12345},
        "steps": {"steps": 3},
        "scheduler": {"scheduler": "Euler"},
        "CFGScale": {"CFGScale": 3.5},
        "strength": {**WITH_SEED, "strength": 0.6},
        "maskMargin": {**WITH_MASK, "maskMargin": 32},
        "acceleration": {"model": TWINFLOW, "acceleration": "high"},
        "acceleratorOptions": {"steps": CACHE_STEPS, "acceleratorOptions": {"fbCache": True}},
        # The output is the seed image (128x128) plus the extensions, as Runware's page says.
        "outpaint": {**WITH_SEED, "height": 256, "outpaint": {"top": 64, "bottom": 64}},
        "lora": {"lora": [{"model": f"file:{lora}"}]},
        "lora[].model": {"lora": [{"model": f"file:{lora}"}]},
        "lora[].weight": {"lora": [{"model": f"file:{lora}", "weight": 0.5}]},
        "lora[].transformer": {"lora": [{"model": f"file:{lora}", "transformer": "both"}]},
        "controlNet": {"controlNet": [CONTROLNET]},
        "ultralytics": {"ultralytics": {"confidence": 0.5}},
    }
    for name, value in ACCELERATOR.items():
        examples[f"acceleratorOptions.{name}"] = {"steps": CACHE_STEPS, "acceleratorOptions": {name: value}}
    for side in ("top", "right", "bottom", "left"):
        grown = "height" if side in ("top", "bottom") else "width"
        examples[f"outpaint.{side}"] = {**WITH_SEED, grown: 192, "outpaint": {side: 64}}
    for name, extra in CONTROLNET_MEMBERS.items():
        examples[f"controlNet[].{name}"] = {"controlNet": [{**CONTROLNET, **extra}]}
    for name, value in ULTRALYTICS.items():
        model = "runware:z-image@0" if name == "inpaintSize" else TURBO  # page 000 only
        examples[f"ultralytics.{name}"] = {"model": model, "ultralytics": {name: value}}
    return examples
