"""One client, two servers: the executor must fail the way Runware does, or the provider decides wrongly.

The hook, the trigger and the outcome table read an answer the same way whoever sent it. A failure the
executor reports in another shape (another HTTP status, no item under the taskUUID, another error code)
turns into another decision: "fail, clear to reattach" instead of "generate again", a poll that fails
instead of an answer about one task. So every failure case runs against the Runware test server (the
stand-in for the seeds' contract) and a real executor process on the tiny model, and both must give the
same status code, the same item shapes and the same error codes.

The matrix below does the same for every row of the support table (runware/support.py): each seed
parameter is sent to both, and the executor must serve it (200, Runware's item fields, images of the
requested size and format) or refuse it naming the parameter, as the table says; the in-process column
is checked against the planner. Changing a backend means changing its row, or this fails.
"""

from __future__ import annotations

import base64
import io
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

pytest.importorskip("diffusers")

from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.executor.process import ExecutorProcess
from airflow_provider_zimage.local.inprocess import LocalZImageExecutor
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.runware.support import ROWS, Backend, find, refused_parameters
from airflow_provider_zimage.testing import tiny_model as tiny_model_kit
from airflow_provider_zimage.testing.runware_server import RunwareTestServer
from airflow_provider_zimage.testing.runware_server.sink import HTTPSink
from airflow_provider_zimage.testing.tiny_model import build_tiny_lora
from tests.conformance_rows import (
    CONTROLNET,
    TURBO,
    WITH_MASK,
    WITH_SEED,
    inference,
    row_examples,
)

pytestmark = pytest.mark.local

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
EXECUTOR_RESULT_TTL = 5.0  # seconds: short enough to see taskExpired, long enough to poll a failure

# What an item says about one task that failed after it was accepted, and what an error item of a
# refused request says (the ErrorResponse of the OpenAPI seed: code, message, parameter, task ids).
TASK_ERROR = ["code", "message", "status", "taskType", "taskUUID"]
REFUSAL = ["code", "message", "parameter", "taskType", "taskUUID"]


@dataclass
class Server:
    """What a test needs from either server: where to POST, the token, and how to script a failure."""

    name: str
    url: str
    token: str
    failing: dict[str, Any]  # request parameters that make an accepted task fail
    expire: Callable[[], None]  # make finished tasks expire from now on
    expiry: float  # seconds a finished task may take to expire

    def post(self, tasks: list[dict[str, Any]]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.post(self.url, json=tasks, headers=headers, timeout=120)

    def poll(self, task_uuid: str) -> httpx.Response:
        return self.post([{"taskType": "getResponse", "taskUUID": task_uuid}])

    def poll_until(
        self, task_uuid: str, done: Callable[[httpx.Response], bool], timeout: float
    ) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            answer = self.poll(task_uuid)
            if done(answer) or time.monotonic() > deadline:
                return answer
            time.sleep(0.05)


def finished(answer: httpx.Response) -> bool:
    """The task is no longer processing: some item is a result or an error, or the poll failed."""
    items = answer.json().get("data") or []
    return answer.status_code != 200 or any(i.get("status") != "processing" for i in items)


def shape(answer: httpx.Response) -> dict[str, Any]:
    """What a client decides on: the status, the body's keys, each item's keys, status and code."""
    body = answer.json()
    return {
        "status": answer.status_code,
        "body": sorted(body),
        "data": [(sorted(i), i.get("status"), i.get("code")) for i in body.get("data") or []],
        "errors": [(sorted(e), e.get("code"), e.get("parameter")) for e in body.get("errors") or []],
    }


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def executor_process(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExecutorProcess]:
    """One executor for the module. Its LoRA root holds a file that is not a LoRA: a request naming it
    is accepted (the file is allowed and exists) and fails when the LoRA is loaded, after acceptance."""
    workdir = tmp_path_factory.mktemp("conformance")
    loras = workdir / "loras"
    loras.mkdir()
    (loras / "broken.safetensors").write_bytes(b"these bytes are not a safetensors file")
    build_tiny_lora(tiny_model, loras / "good")  # a LoRA that loads, for the matrix's lora rows
    controlnet: tuple[str, ...] = ()
    builder = getattr(tiny_model_kit, "build_tiny_controlnet", None)
    if builder is not None:  # a provider that serves ControlNet: map the matrix's ControlNet AIR id
        controlnet = ("--controlnet", f"{CONTROLNET['model']}={builder(tiny_model, workdir / 'controlnet')}")
    process = ExecutorProcess(
        {TURBO: str(tiny_model)},
        workdir,
        "--devices",
        "cpu",
        "--fetch-grace",
        "0",
        "--result-ttl",
        str(EXECUTOR_RESULT_TTL),
        "--lora-root",
        str(loras),
        *controlnet,
        env=ONE_THREAD,
    ).start()
    yield process
    assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture(params=["runware", "executor"])
def server(request: pytest.FixtureRequest) -> Server:
    if request.param == "runware":
        runware: RunwareTestServer = request.getfixturevalue("zimage_server")
        return Server(
            "runware",
            runware.url,
            str(runware.api_key),
            {"positivePrompt": "a lighthouse on a cliff at dusk __fail__"},
            lambda: runware.configure(result_ttl=0.0),
            1.0,
        )
    process: ExecutorProcess = request.getfixturevalue("executor_process")
    assert process.url is not None
    broken = process.workdir / "loras" / "broken.safetensors"
    return Server(
        "executor",
        process.url,
        process.token,
        {"lora": [{"model": f"file:{broken}", "weight": 1}]},
        lambda: None,
        EXECUTOR_RESULT_TTL + 5.0,
    )


# --------------------------------------------------------------------------------------------------
# A task that was accepted and then failed: 200 and an error item under its taskUUID
# --------------------------------------------------------------------------------------------------


def test_a_failed_task_is_an_error_item_under_its_task_uuid(server: Server) -> None:
    task = inference(**server.failing)
    assert server.post([task]).status_code == 200, "accepted first: the failure comes later"
    answer = server.poll_until(task["taskUUID"], finished, timeout=120)
    assert shape(answer) == {
        "status": 200,
        "body": ["data", "errors"],
        "data": [(TASK_ERROR, "error", "taskFailed")],
        "errors": [(["code", "message", "taskType", "taskUUID"], "taskFailed", None)],
    }
    [item] = answer.json()["data"]
    assert item["taskUUID"] == task["taskUUID"] and item["taskType"] == "imageInference"


def test_a_failed_upload_is_an_error_item_under_its_task_uuid(server: Server) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}/bucket/key.png?X-Amz-Signature=secret-signature"
    task = inference(uploadEndpoint=endpoint)
    assert server.post([task]).status_code == 200
    answer = server.poll_until(task["taskUUID"], finished, timeout=120)
    assert shape(answer) == {
        "status": 200,
        "body": ["data", "errors"],
        "data": [(sorted([*TASK_ERROR, "imageUUID"]), "error", "uploadFailed")],
        "errors": [(["code", "imageUUID", "message", "taskType", "taskUUID"], "uploadFailed", None)],
    }
    assert answer.json()["data"][0]["taskUUID"] == task["taskUUID"]
    assert "secret-signature" not in answer.text, "a presigned URL's signature never comes back"


# --------------------------------------------------------------------------------------------------
# Answers about a taskUUID the server no longer has, or never had: 400 with a per-task error
# --------------------------------------------------------------------------------------------------


def test_an_expired_task_answers_task_expired(server: Server) -> None:
    task = inference()
    assert server.post([task]).status_code == 200
    made = server.poll_until(task["taskUUID"], finished, timeout=120)
    assert [i["status"] for i in made.json()["data"]] == ["success"]
    server.expire()
    expired = server.poll_until(task["taskUUID"], lambda a: a.status_code != 200, timeout=server.expiry)
    assert shape(expired) == {
        "status": 400,
        "body": ["data", "errors"],
        "data": [],
        "errors": [(REFUSAL, "taskExpired", "taskUUID")],
    }


def test_an_unknown_task_uuid_answers_task_not_found(server: Server) -> None:
    answer = server.poll(str(uuid.uuid4()))
    assert shape(answer) == {
        "status": 400,
        "body": ["data", "errors"],
        "data": [],
        "errors": [(REFUSAL, "taskNotFound", "taskUUID")],
    }
    assert answer.json()["errors"][0]["taskType"] == "getResponse"


def test_a_reused_task_uuid_answers_conflict(server: Server) -> None:
    task = inference()
    assert server.post([task]).status_code == 200
    again = server.post([task])
    assert shape(again) == {
        "status": 400,
        "body": ["errors"],
        "data": [],
        "errors": [(REFUSAL, "conflictTaskUUID", "taskUUID")],
    }


# --------------------------------------------------------------------------------------------------
# Refused requests: 400, one item per parameter, the kind of mistake in the code; nothing accepted
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "parameter", "change"),
    [
        ("invalidParameter", "width", {"width": 4096}),
        ("unsupportedParameter", "notAParameter", {"notAParameter": 1}),
        ("missingParameter", "positivePrompt", {"positivePrompt": None}),
    ],
    ids=["invalid", "unsupported", "missing"],
)
def test_a_refused_parameter_is_named_with_the_same_code(
    server: Server, code: str, parameter: str, change: dict[str, Any]
) -> None:
    task = {k: v for k, v in inference(**change).items() if v is not None}
    answer = server.post([task])
    assert shape(answer) == {
        "status": 400,
        "body": ["errors"],
        "data": [],
        "errors": [(REFUSAL, code, parameter)],
    }
    unknown = server.poll(task["taskUUID"]).json()["errors"]
    assert [e["code"] for e in unknown] == ["taskNotFound"], "a refused request accepted nothing"


# --------------------------------------------------------------------------------------------------
# The matrix: every row of the support table (runware/support.py), valid and invalid, sync and async.
# What the table says the executor serves must come back as Runware's answer does (200, the same item
# keys, images of the requested size and format); what it says the executor refuses must be refused
# with that parameter named. So the table cannot claim what the executor does not do.
# --------------------------------------------------------------------------------------------------


# The executor answers about the model before anything else: TwinFlow's own parameter is refused there
# as the model (no diffusers pipeline), and Z-Image's (page 000 only) as a model it does not serve.
NAMED_FIRST = {"acceleration": "model", "ultralytics.inpaintSize": "model"}


@pytest.fixture(scope="module")
def sink() -> Iterator[HTTPSink]:
    with HTTPSink() as running:
        yield running


def image_of(item: dict[str, Any]) -> Image.Image:
    """The picture an item carries, whichever outputType delivered it."""
    if "imageBase64Data" in item:
        data = base64.b64decode(item["imageBase64Data"])
    elif "imageDataURI" in item:
        data = base64.b64decode(item["imageDataURI"].split(",", 1)[1])
    else:
        answer = httpx.get(item["imageURL"], timeout=30)
        answer.raise_for_status()
        data = answer.content
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def settled(server: Server, task: dict[str, Any], first: httpx.Response) -> httpx.Response:
    """The answer with the task's images: the sync answer itself, or getResponse until all are in."""
    if task.get("deliveryMethod") != "async" or first.status_code != 200:
        return first
    count = task.get("numberResults", 1)

    def done(answer: httpx.Response) -> bool:
        items = answer.json().get("data") or []
        return (
            answer.status_code != 200
            or sum(i.get("status") == "success" for i in items) >= count
            or any(i.get("status") == "error" for i in items)
        )

    return server.poll_until(task["taskUUID"], done, timeout=120)


def assert_images(answer: httpx.Response, task: dict[str, Any], who: str) -> None:
    items = [i for i in answer.json()["data"] if i.get("taskType") == "imageInference"]
    assert len(items) == task.get("numberResults", 1), f"{who}: {answer.text[:500]}"
    width, height = task.get("width", 128), task.get("height", 128)
    wanted = {"JPG": "JPEG", "PNG": "PNG", "WEBP": "WEBP"}[task.get("outputFormat", "JPG")]
    key = {"URL": "imageURL", "base64Data": "imageBase64Data", "dataURI": "imageDataURI"}[
        task.get("outputType", "URL")
    ]
    for item in items:
        assert key in item, f"{who}: no {key} in {sorted(item)}"
        image = image_of(item)
        assert (image.size, image.format) == ((width, height), wanted), f"{who}: {image.size} {image.format}"


def item_keys(answer: httpx.Response, *, checked: bool = True) -> list[list[str]]:
    """The keys of each result item. `status` aside: the executor also puts it on the items of a sync
    answer, where the seeds' examples have none; an extra field no client reads there. `NSFWContent`
    aside when no check was asked (`checked=False`): the local backends report it only after running
    their classifier, rather than a `false` nobody computed."""
    ignored = {"status"} if checked else {"status", "NSFWContent"}
    return sorted(sorted(set(i) - ignored) for i in answer.json().get("data") or [])


def asks_check(task: dict[str, Any]) -> bool:
    safety = task.get("safety") or {}
    return bool(safety.get("checkContent")) or safety.get("mode") == "fast"


def sent(server: Server, **fragment: Any) -> tuple[dict[str, Any], httpx.Response]:
    task = inference(**{"deliveryMethod": "sync", "steps": 1, **fragment})
    first = server.post([task])
    return task, settled(server, task, first)


def named(answer: httpx.Response) -> set[str]:
    """The parameters an answer's error items name, list indexes written `[]` as the table does."""
    return {re.sub(r"\[\d+\]", "[]", e.get("parameter") or "") for e in answer.json().get("errors") or []}


def refused_as(parameter: str, backend: Backend = "executor") -> str:
    """The parameter a refusal names: the row itself, or the refused group it belongs to."""
    return next(
        group
        for group in refused_parameters(backend)
        if parameter == group or parameter.startswith((f"{group}.", f"{group}[]."))
    )


@pytest.fixture(scope="module")
def examples(sink: HTTPSink, executor_process: ExecutorProcess) -> dict[str, dict[str, Any]]:
    lora = executor_process.workdir / "loras" / "good" / "pytorch_lora_weights.safetensors"
    return row_examples(sink.url, str(lora))


def test_every_row_has_an_example() -> None:
    missing = {row.parameter for row in ROWS} - set(row_examples("http://sink", "/lora"))
    assert not missing, f"add a request fragment for these rows to row_examples(): {sorted(missing)}"


@pytest.mark.parametrize("parameter", [row.parameter for row in ROWS])
def test_the_executor_serves_or_refuses_each_parameter_as_the_table_says(
    parameter: str,
    examples: dict[str, dict[str, Any]],
    zimage_server: RunwareTestServer,
    executor_process: ExecutorProcess,
) -> None:
    runware = Server("runware", zimage_server.url, str(zimage_server.api_key), {}, lambda: None, 1.0)
    assert executor_process.url is not None
    executor = Server("executor", executor_process.url, executor_process.token, {}, lambda: None, 1.0)
    fragment = examples[parameter]
    task, answer = sent(runware, **fragment)
    assert answer.status_code == 200, f"the example is not valid for Runware: {answer.text[:500]}"
    assert_images(answer, task, "runware")

    support = find(parameter).executor
    task, local = sent(executor, **fragment)
    if support.status == "refused":
        expected = NAMED_FIRST.get(parameter) or refused_as(parameter)
        assert local.status_code == 400 and expected in named(local), (
            f"the table says the executor refuses {parameter} (as {expected}); it answered {local.text[:500]}"
        )
        assert {e["code"] for e in local.json()["errors"]} <= {"invalidParameter", "unsupportedParameter"}
        if expected not in NAMED_FIRST.values():
            assert find(expected).executor.text in local.text, "refused with the table's words"
        unknown = executor.poll(task["taskUUID"]).json()["errors"]
        assert [e["code"] for e in unknown] == ["taskNotFound"], "a refused request accepted nothing"
        return
    assert local.status_code == 200, (
        f"the table says the executor serves {parameter}; it answered {local.text[:500]}"
    )
    assert_images(local, task, "executor")
    checked = asks_check(task)
    assert item_keys(local, checked=checked) == item_keys(answer, checked=checked), (
        "the same result fields as Runware's"
    )


@pytest.mark.parametrize(
    ("delivery", "output_type", "output_format"),
    [
        ("sync", "URL", "JPG"),
        ("async", "base64Data", "PNG"),
        ("sync", "dataURI", "WEBP"),
        ("async", "URL", "WEBP"),
    ],
)
def test_both_deliver_images_of_the_requested_size_and_format(
    delivery: str, output_type: str, output_format: str, server: Server
) -> None:
    fragment = {"deliveryMethod": delivery, "outputType": output_type, "outputFormat": output_format}
    task, answer = sent(server, width=192, height=128, numberResults=2, **fragment)
    assert answer.status_code == 200, answer.text[:500]
    assert_images(answer, task, server.name)
    assert all(i.get("status", "success") == "success" for i in answer.json()["data"])
    assert {i["taskUUID"] for i in answer.json()["data"]} == {task["taskUUID"]}


# One out-of-range value per group: both refuse it before accepting anything, naming the same
# parameter with the same code.
INVALID = {
    "height": {"width": 128, "height": 4096},
    "steps": {"steps": 51},
    "CFGScale": {"CFGScale": 25},
    "strength": {**WITH_SEED, "strength": 1.5},
    "numberResults": {"numberResults": 21},
    "outputQuality": {"outputQuality": 10},
    "outputType": {"outputType": "GIF"},
    "outputFormat": {"outputFormat": "BMP"},
    "ttl": {"ttl": 30},
    "scheduler": {"scheduler": "NotAScheduler"},
    "seed": {"seed": -1},
    "safety.mode": {"safety": {"mode": "paranoid"}},
    "lora[].weight": {"lora": [{"model": "runware:1@1", "weight": 5}]},
    "controlNet[].weight": {"controlNet": [{**CONTROLNET, "weight": 5}]},
    "acceleratorOptions.fbCacheThreshold": {"acceleratorOptions": {"fbCacheThreshold": 2}},
    "outpaint.top": {**WITH_SEED, "outpaint": {"top": -1}},
    "ultralytics.confidence": {"ultralytics": {"confidence": 2}},
    "maskMargin": {**WITH_MASK, "maskMargin": 8},
    "positivePrompt": {"positivePrompt": ""},
}


@pytest.mark.parametrize("delivery", ["sync", "async"])
@pytest.mark.parametrize("parameter", sorted(INVALID))
def test_an_invalid_value_is_refused_alike(
    parameter: str, delivery: str, zimage_server: RunwareTestServer, executor_process: ExecutorProcess
) -> None:
    assert executor_process.url is not None
    answers = {}
    for name, url, token in (
        ("runware", zimage_server.url, str(zimage_server.api_key)),
        ("executor", executor_process.url, executor_process.token),
    ):
        server = Server(name, url, token, {}, lambda: None, 1.0)
        answer = server.post([inference(deliveryMethod=delivery, **INVALID[parameter])])
        answers[name] = answer
        assert answer.status_code == 400, f"{name}: {answer.text[:500]}"
        assert parameter in named(answer), f"{name} names {named(answer)}: {answer.text[:500]}"
    assert shape(answers["runware"]) == shape(answers["executor"])


def test_the_in_process_planner_serves_or_refuses_each_parameter_as_the_table_says(
    tiny_model: Path, tmp_path: Path, sink: HTTPSink
) -> None:
    # The in-process column, checked where the in-process backend decides: its planner, which loads
    # nothing (a refusal there comes before any model load).
    loras = tmp_path / "loras"
    lora = build_tiny_lora(tiny_model, loras / "good")
    # The ControlNet rows are served for an AIR id the deployer mapped, as the executor's --controlnet.
    builder = getattr(tiny_model_kit, "build_tiny_controlnet", None)
    controlnets = {CONTROLNET["model"]: str(builder(tiny_model, tmp_path / "controlnet"))} if builder else {}
    executor = LocalZImageExecutor(
        tiny_model, device="cpu", input_roots=[], lora_roots=[str(loras)], controlnet_paths=controlnets
    )
    wrong = []
    for parameter, fragment in row_examples(sink.url, str(lora)).items():
        try:
            executor.validate(ImageInferenceRequest.build(**{**inference(steps=1), **fragment}))
            answer = "served"
        except ZImageValidationError as exc:
            answer = "refused " + ",".join(re.sub(r"\[\d+\]", "[]", str(e["parameter"])) for e in exc.errors)
        if find(parameter).in_process.status == "refused":
            expected = {"acceleration": "model"}.get(parameter) or refused_as(parameter, "in-process")
            if answer.split(" ")[0] != "refused" or expected not in answer.split(" ")[1].split(","):
                wrong.append(f"{parameter}: the table says refused as {expected}, the planner: {answer}")
        elif answer != "served":
            wrong.append(f"{parameter}: the table says served, the planner: {answer}")
    assert not wrong, "\n".join(wrong)
