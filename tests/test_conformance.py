"""One client, two servers: the executor must fail the way Runware does, or the provider decides wrongly.

The hook, the trigger and the outcome table read an answer the same way whoever sent it. A failure the
executor reports in another shape (another HTTP status, no item under the taskUUID, another error code)
turns into another decision: "fail, clear to reattach" instead of "generate again", a poll that fails
instead of an answer about one task. So every failure case runs against the Runware test server (the
stand-in for the seeds' contract) and a real executor process on the tiny model, and both must give the
same status code, the same item shapes and the same error codes.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("diffusers")

from airflow_provider_zimage.executor.process import ExecutorProcess
from airflow_provider_zimage.testing.runware_server import RunwareTestServer

pytestmark = pytest.mark.local

TURBO = "runware:z-image@turbo"
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
