"""The executor service, as a real process on loopback with the tiny model, spoken to the way the provider
speaks to Runware: through `ZImageHook`, raw task arrays, and a mapped deferrable DAG."""

from __future__ import annotations

import hashlib
import io
import json
import re
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("diffusers")

from PIL import Image

from airflow_provider_zimage.exceptions import ZImageAuthError, ZImagePermanentError
from airflow_provider_zimage.executor.process import ExecutorProcess
from airflow_provider_zimage.hooks.runware import ConnectionSettings, ZImageHook
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.runware.outcomes import Action, for_status
from airflow_provider_zimage.runware.protocol import RetryPolicy
from tests.image_server import ImageServer

pytestmark = pytest.mark.local

TURBO = "runware:z-image@turbo"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start(tiny_model: Path, workdir: Path, *args: str) -> ExecutorProcess:
    """Many tests leave results unfetched on purpose: by default their SIGTERM does not wait for them."""
    return ExecutorProcess(
        {TURBO: str(tiny_model)}, workdir, "--devices", "cpu", "--fetch-grace", "0", *args, env=ONE_THREAD
    ).start()


@pytest.fixture(autouse=True)
def _one_thread():
    """The executor runs with one thread; float kernels round differently with two, and the tests
    compare its bytes with images made in this process."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def executor(tiny_model, tmp_path_factory):
    """One executor for the read-mostly tests of this module (max batch 4, results in memory)."""
    process = start(tiny_model, tmp_path_factory.mktemp("executor"))
    yield process
    assert process.stop() == 0, process.log()[-3000:]


@pytest.fixture(scope="module")
def tiny_lora(tiny_model, tmp_path_factory):
    """A real LoRA of the tiny model, in a folder the module's executor was not told about."""
    from airflow_provider_zimage.testing.tiny_model import build_tiny_lora

    return build_tiny_lora(tiny_model, tmp_path_factory.mktemp("lora-elsewhere"))


def hook_for(process: ExecutorProcess, token: str | None = None) -> ZImageHook:
    settings = ConnectionSettings(
        base_url=process.url,
        api_key=token or process.token,
        backend="executor",
        retry=RetryPolicy(2, 0.01, 0.05),
    )
    return ZImageHook("executor_test", settings=settings)


def request(prompt: str = "a lighthouse at dusk", **overrides: Any) -> ImageInferenceRequest:
    params = {"model": TURBO, "positivePrompt": prompt, "width": 128, "height": 128, "steps": 2, "seed": 21}
    params.update(outputFormat="PNG", **overrides)
    return ImageInferenceRequest.build(**params)


def post(process: ExecutorProcess, tasks: list[dict[str, Any]], token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or process.token}"}
    return httpx.post(process.url, json=tasks, headers=headers, timeout=120)


def task(req: ImageInferenceRequest, delivery: str = "async") -> dict[str, Any]:
    return {**req.to_wire(), "deliveryMethod": delivery}


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def metric(process: ExecutorProcess, name: str) -> float:
    total = 0.0
    for line in process.metrics().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def poll_until(predicate: Any, timeout: float = 60.0) -> bool:
    """True once `predicate()` is; False after `timeout` seconds (generous: the suite runs under load)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_done(hook: ZImageHook, task_uuid: str, expected: int = 1):
    return hook.wait_for_task(task_uuid, expected, timeout=120, poll_interval=0.05, max_poll_interval=0.2)


# --------------------------------------------------------------------------------------------------
# Delivery
# --------------------------------------------------------------------------------------------------


def test_sync_delivery_returns_the_image_the_in_process_backend_makes(executor, tiny_model):
    from airflow_provider_zimage.local import LocalZImageExecutor

    hook = hook_for(executor)
    req = request(seed=5)
    [result] = hook.infer([req])
    data = hook.download(result)
    assert decoded(data).size == (128, 128) and decoded(data).format == "PNG"
    assert result.seed == 5 and result.task_uuid == req.task_uuid
    assert result.image_url.startswith(executor.origin + "/v1/image/")
    [local] = LocalZImageExecutor(tiny_model, local_files_only=True, device="cpu").generate(req)
    assert data == local.data, "same request, same seed: the same picture as in-process"


def test_async_delivery_and_inline_output(executor):
    hook = hook_for(executor)
    req = request(seed=6, outputType="base64Data", numberResults=2)
    assert hook.submit([req]) == [req.task_uuid]
    status = wait_done(hook, req.task_uuid, 2)
    assert status.complete and sorted(r.seed for r in status.results) == [6, 7]
    assert all(r.image_base64_data and not r.image_url for r in status.results)
    assert len({hook.download(r) for r in status.results}) == 2


def test_get_response_reports_partial_results(tiny_model, tmp_path):
    process = start(tiny_model, tmp_path, "--max-batch", "1")
    try:
        hook = hook_for(process)
        req = request(seed=40, numberResults=3, width=256, height=256, steps=4)
        hook.submit([req])
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            body = post(process, [{"taskType": "getResponse", "taskUUID": req.task_uuid}]).json()
            images = [i for i in body["data"] if i.get("imageUUID")]
            seen.append(len(images))
            if len(images) == 3:
                break
            time.sleep(0.02)
        assert seen[-1] == 3
        assert {1, 2} & set(seen), f"no partial answer was seen: {seen}"
        # A partial answer carries no 'processing' item once an image exists (Runware's shape).
        assert [i["seed"] for i in body["data"]] == [40, 41, 42]
    finally:
        process.stop()


def test_a_reused_task_uuid_answers_conflict_and_the_hook_reattaches(executor):
    hook = hook_for(executor)
    req = request(seed=8)
    before = metric(executor, "zimage_executor_images_total")
    hook.submit([req])
    again = post(executor, [task(req)])
    assert again.status_code == 400
    assert [e["code"] for e in again.json()["errors"]] == ["conflictTaskUUID"]
    assert hook.submit([req]) == [req.task_uuid]  # the ledger's re-send after a lost answer
    assert len(wait_done(hook, req.task_uuid).results) == 1
    assert metric(executor, "zimage_executor_images_total") == before + 1, "made once"


def test_wrong_or_missing_token_is_refused(executor):
    req = request()
    assert post(executor, [task(req)], token="not-the-token-at-all").status_code == 401
    assert httpx.post(executor.url, json=[task(req)], timeout=10).status_code == 401
    with pytest.raises(ZImageAuthError):
        hook_for(executor, token="wrong-token-wrong-token").submit([req])
    unknown = post(executor, [{"taskType": "getResponse", "taskUUID": req.task_uuid}]).json()
    assert unknown["errors"][0]["code"] == "taskNotFound", "a refused request accepted nothing"


@pytest.mark.parametrize(
    ("parameter", "overrides"),
    [
        # A ControlNet no --controlnet maps (the ids are the deployer's, never paths from a request)
        ("controlNet[0].model", {"controlNet": [{"model": "runware:25@1", "guideImage": "aGVsbG8="}]}),
        ("inputs.seedImage", {"inputs": {"seedImage": "file:///etc/hostname"}}),
        ("scheduler", {"scheduler": "DDIM"}),
    ],
)
def test_local_refusals_are_400s_naming_the_parameter(executor, parameter, overrides):
    req = request(**overrides)
    answer = post(executor, [task(req)])
    assert answer.status_code == 400
    assert [e["parameter"] for e in answer.json()["errors"]] == [parameter]
    with pytest.raises(ZImagePermanentError, match=re.escape(parameter)):
        hook_for(executor).submit([request(**overrides)])


def test_a_lora_file_outside_the_allowed_roots_is_refused_like_a_missing_one_and_never_loaded(
    executor, tiny_lora
):
    """A token holder must not make the GPU host open its files, nor learn which ones exist."""
    real = request(lora=[{"model": f"file:{tiny_lora}", "weight": 1}])
    missing = request(lora=[{"model": f"file:{tiny_lora.parent}/no-such-lora.safetensors", "weight": 1}])
    answers = [post(executor, [task(real)]), post(executor, [task(missing)])]
    assert [a.status_code for a in answers] == [400, 400]
    [[refused], [absent]] = [a.json()["errors"] for a in answers]
    assert refused["parameter"] == absent["parameter"] == "lora[0].model"
    assert refused["code"] == absent["code"] == "invalidParameter"
    assert refused["message"] == absent["message"], "one message for 'not allowed' and 'missing'"
    assert str(tiny_lora.parent) not in refused["message"]
    unknown = post(executor, [{"taskType": "getResponse", "taskUUID": real.task_uuid}]).json()
    assert unknown["errors"][0]["code"] == "taskNotFound", "refused before acceptance: nothing ran"
    assert "1 LoRA(s)" not in executor.log(), "no pipeline call ever loaded a LoRA"


def test_an_executor_refuses_a_seed_image_url_it_was_not_told_to_trust_and_fetches_nothing(executor):
    """Without --input-url-origin no URL input is fetched: a token holder must not make the GPU host
    fetch cloud metadata, a localhost admin port or another service of the private network."""
    with ImageServer() as images:
        req = request(inputs={"seedImage": images.url("/seed.png")}, strength=0.5)
        answer = post(executor, [task(req)])
    assert answer.status_code == 400
    [refused] = answer.json()["errors"]
    assert refused["parameter"] == "inputs.seedImage" and refused["code"] == "invalidParameter"
    assert "--input-url-origin" in refused["message"]
    assert images.hits == [], "the executor fetched nothing"
    unknown = post(executor, [{"taskType": "getResponse", "taskUUID": req.task_uuid}]).json()
    assert unknown["errors"][0]["code"] == "taskNotFound", "refused before acceptance: nothing ran"


def test_on_an_executor_an_untrusted_origin_a_redirect_a_missing_image_and_a_closed_port_answer_alike(
    tiny_model, tmp_path
):
    """A token holder learns "not fetched", never whether an address answered; an allowed origin's
    image is used. The executor's log keeps the reason, without the URL's query."""
    closed = f"http://127.0.0.1:{closed_port()}"
    with ImageServer() as images, ImageServer() as elsewhere:
        images.redirects["/away.png"] = elsewhere.url("/seed.png")
        process = start(
            tiny_model, tmp_path, "--input-url-origin", images.origin, "--input-url-origin", closed
        )
        try:
            urls = {
                "untrusted": elsewhere.url("/seed.png"),
                "redirected": images.url("/away.png"),
                "missing": images.url("/nothing.png?sig=s3cr3t"),
                "closed": f"{closed}/seed.png",
            }
            answers = {}
            for name, url in urls.items():
                answer = post(process, [task(request(inputs={"seedImage": url}, strength=0.5))])
                assert answer.status_code == 400, name
                [item] = answer.json()["errors"]
                answers[name] = {k: v for k, v in item.items() if k != "taskUUID"}
            assert answers["untrusted"] == answers["redirected"] == answers["missing"] == answers["closed"]
            assert elsewhere.hits == []
            hook = hook_for(process)
            [uuid_] = hook.submit([request(inputs={"seedImage": images.url("/seed.png")}, strength=0.5)])
            [result] = wait_done(hook, uuid_).results
            assert decoded(hook.download(result)).size == (128, 128)
            assert images.hits == ["/away.png", "/nothing.png?sig=s3cr3t", "/seed.png"]
        finally:
            assert process.stop() == 0, process.log()[-3000:]
    log = process.log()
    assert "404" in log and "s3cr3t" not in log


def test_an_unreadable_input_url_origin_stops_the_executor_naming_the_option(monkeypatch):
    from airflow_provider_zimage.executor.cli import parse_args

    monkeypatch.setenv("ZIMAGE_EXECUTOR_TOKEN", "a-token-of-twenty-characters")

    with pytest.raises(SystemExit, match="--input-url-origin"):
        parse_args(["serve", "--model", f"{TURBO}=/m", "--input-url-origin", "ftp://x.example"])


def test_a_task_whose_upload_failed_is_an_error_item_under_its_task_uuid_and_the_hook_regenerates(executor):
    """As on Runware: 200, an item with status "error" for the taskUUID; the hook's outcome is
    REGENERATE (a new generation), not a failed poll that clearing the task could only repeat."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hook = hook_for(executor)
    req = request(seed=11, uploadEndpoint=f"http://127.0.0.1:{port}/bucket/key.png?sig=secret-signature")
    hook.submit([req])
    poll = [{"taskType": "getResponse", "taskUUID": req.task_uuid}]

    def finished() -> bool:
        answer = post(executor, poll)
        return answer.status_code != 200 or answer.json()["data"][0]["status"] != "processing"

    assert poll_until(finished)
    answer = post(executor, poll)
    assert answer.status_code == 200, answer.text
    [item] = answer.json()["data"]
    assert (item["taskUUID"], item["status"], item["code"]) == (req.task_uuid, "error", "uploadFailed")
    assert [e["code"] for e in answer.json()["errors"]] == ["uploadFailed"]
    assert "secret-signature" not in answer.text
    outcome = for_status(hook.get_response(req.task_uuid))
    assert outcome.action is Action.REGENERATE, outcome.message


def test_webhook_and_upload_endpoint_are_honoured(executor):
    received: dict[str, list[Any]] = {"webhook": [], "put": []}

    class Sink(BaseHTTPRequestHandler):
        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("content-length", 0)))

        def do_POST(self):
            received["webhook"].append((self.path, json.loads(self._body())))
            self.send_response(200)
            self.end_headers()

        def do_PUT(self):
            received["put"].append((self.path, self.headers.get("content-type"), self._body()))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{sink.server_address[1]}"
    try:
        hook = hook_for(executor)
        req = request(
            seed=9, webhookURL=f"{base}/hook?token=abc", uploadEndpoint=f"{base}/bucket/key.png?sig=xyz"
        )
        hook.submit([req])
        [result] = wait_done(hook, req.task_uuid).results
        assert result.image_url == f"{base}/bucket/key.png", "the upload location, without its signature"
        [(path, content_type, data)] = received["put"]
        assert path == "/bucket/key.png?sig=xyz" and content_type == "image/png"
        assert decoded(data).size == (128, 128)
        deadline = time.monotonic() + 10
        while not received["webhook"] and time.monotonic() < deadline:
            time.sleep(0.05)
        [(path, body)] = received["webhook"]
        assert path == "/hook?token=abc"
        assert body["data"][0]["taskUUID"] == req.task_uuid and body["data"][0]["status"] == "success"
    finally:
        sink.shutdown()


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def test_compatible_requests_share_one_pipeline_call(executor, tiny_model):
    """Two tasks in one POST: one pipeline call of two images, each from its own generator."""
    from airflow_provider_zimage.local import LocalZImageExecutor

    hook = hook_for(executor)
    calls = metric(executor, "zimage_executor_pipeline_calls_total")
    a, b = request("a red fox in snow", seed=3), request("a blue whale at sea", seed=9)
    assert post(executor, [task(a), task(b)]).status_code == 200
    results = [wait_done(hook, r.task_uuid).results[0] for r in (a, b)]
    assert metric(executor, "zimage_executor_pipeline_calls_total") == calls + 1
    assert 'zimage_executor_batch_size_bucket{le="1"} ' in executor.metrics()
    batched = [hook.download(r) for r in results]

    local = LocalZImageExecutor(tiny_model, local_files_only=True, device="cpu")
    units = [(local.plan(a), 3), (local.plan(b), 9)]
    same_batch = [g.data for g in local.generate_batch(units)]
    alone = [local.generate_batch([unit])[0].data for unit in units]
    # The same batch is reproduced byte for byte ...
    assert batched == same_batch
    # ... and each image is the picture of its seed alone: a batched float kernel may round the last
    # bit differently, so at most 1/255 on a few pixels (bench/executor_throughput.py prints the share).
    for got, want in zip(batched, alone, strict=True):
        diff = [abs(x - y) for x, y in zip(decoded(got).tobytes(), decoded(want).tobytes(), strict=True)]
        assert max(diff) <= 1 and sum(d > 0 for d in diff) / len(diff) < 0.01


def test_max_batch_one_makes_the_exact_bytes_of_unbatched_runs(tiny_model, tmp_path):
    from airflow_provider_zimage.local import LocalZImageExecutor

    process = start(tiny_model, tmp_path, "--max-batch", "1")
    try:
        hook = hook_for(process)
        a, b = request("a red fox in snow", seed=3), request("a blue whale at sea", seed=9)
        post(process, [task(a), task(b)])
        got = [hook.download(wait_done(hook, r.task_uuid).results[0]) for r in (a, b)]
        assert metric(process, "zimage_executor_pipeline_calls_total") == 2
        local = LocalZImageExecutor(tiny_model, local_files_only=True, device="cpu")
        assert got == [local.generate(r)[0].data for r in (a, b)]
    finally:
        process.stop()


# --------------------------------------------------------------------------------------------------
# Shutdown and restart
# --------------------------------------------------------------------------------------------------


def test_sigterm_finishes_queued_work_and_refuses_new_tasks(tiny_model, tmp_path):
    process = start(tiny_model, tmp_path, "--max-batch", "1", "--drain-timeout", "120", "--fetch-grace", "30")
    hook = hook_for(process)
    reqs = [request(f"queued {i}", seed=i, width=256, height=256, steps=4) for i in range(4)]
    hook.submit(reqs)
    assert process.process is not None
    process.process.send_signal(signal.SIGTERM)
    assert poll_until(lambda: process.health()["status"] == "draining"), "SIGTERM did not start a drain"
    refused = post(process, [task(request("too late"))])
    assert refused.status_code == 503 and refused.json()["errors"][0]["code"] == "serviceUnavailable"
    # The clients look only once every queued image is made, as a trigger between two polls or a worker
    # resuming from deferral would: results held in memory must still be there to poll and download.
    assert poll_until(lambda: process.health()["queueDepth"] == 0), "the queued work did not finish"
    time.sleep(1.0)  # a trigger's next poll is about a second away
    results = [wait_done(hook, r.task_uuid).results for r in reqs]
    assert [len(r) for r in results] == [1, 1, 1, 1]
    assert [decoded(hook.download(r[0])).size for r in results] == [(256, 256)] * 4
    assert process.process.wait(60) == 0, "the drain ends once every result was fetched"


def test_unstarted_work_resumes_after_a_restart_with_an_output_dir(tiny_model, tmp_path):
    out = tmp_path / "state"
    first = start(
        tiny_model, tmp_path / "a", "--max-batch", "1", "--drain-timeout", "0", "--output-dir", str(out)
    )
    hook = hook_for(first)
    reqs = [request(f"resume {i}", seed=i, width=256, height=256, steps=4) for i in range(4)]
    hook.submit(reqs)
    assert first.stop() == 0
    assert "resumed at next start" in first.log()

    second = ExecutorProcess(
        {TURBO: str(tiny_model)}, tmp_path / "b", "--devices", "cpu", "--output-dir", str(out), env=ONE_THREAD
    )
    second.token = first.token
    second.start()
    try:
        hook = hook_for(second)
        results = [wait_done(hook, r.task_uuid).results for r in reqs]
        assert [[x.seed for x in r] for r in results] == [[0], [1], [2], [3]]
        for r in results:
            assert decoded(hook.download(r[0])).size == (256, 256)
        assert post(second, [task(reqs[0])]).json()["errors"][0]["code"] == "conflictTaskUUID"
    finally:
        second.stop()


def test_without_an_output_dir_a_restart_forgets_and_says_task_not_found(tiny_model, tmp_path):
    first = start(tiny_model, tmp_path / "a")
    req = request(seed=1)
    hook_for(first).infer([req])
    first.stop()
    second = ExecutorProcess(
        {TURBO: str(tiny_model)}, tmp_path / "b", "--devices", "cpu", "--fetch-grace", "0", env=ONE_THREAD
    )
    second.token = first.token
    second.start()
    try:
        status = hook_for(second).get_response(req.task_uuid)
        assert status.failed and status.errors[0].code == "taskNotFound"
    finally:
        second.stop()


# --------------------------------------------------------------------------------------------------
# In Airflow
# --------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("airflow_db")
def test_a_mapped_deferrable_dag_runs_on_the_executor_and_loads_the_model_once(
    executor, output_dir, monkeypatch
):
    from airflow_provider_zimage import local
    from tests.dagtest import run_dag, task_states
    from tests.test_operator_dag import MAPPED_DAG

    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(executor.connection(max_retries=3)))
    loads_here = local.load_count()
    prompts = [f"an executor painting {i}" for i in range(4)]
    run = run_dag(
        "executor_map",
        MAPPED_DAG,
        dag_id="executor_map",
        output=output_dir,
        prompts=prompts,
        op_kwargs={"seed": 7, "steps": 2, "output_format": "PNG", "deferrable": True, "max_cost_usd": 0.0},
    )
    assert run.state == "success", task_states(run)
    root = Path(output_dir.removeprefix("file://"))
    collected = json.loads((root / "collected.json").read_text())
    assert len(collected) == 4 and len({e["sha256"] for e in collected}) == 4
    for entry in collected:
        data = Path(entry["uri"].removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert entry["cost"] in (0.0, None) and entry["seed"] == 7
    manifests = [json.loads(p.read_text()) for p in root.rglob("manifest.json")]
    assert {m["backend"] for m in manifests} == {"executor"}
    assert executor.health()["loads"] == 1, "the executor loaded the weights once for every task"
    assert local.load_count() == loads_here, "no task process loaded a model"


def test_unknown_model_or_dead_executor_fail_naming_the_cause(executor, output_dir, monkeypatch):
    from airflow_provider_zimage.compat import AirflowFailException
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.dagtest import FakeTI

    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", json.dumps(executor.connection()))
    op = ZImageGenerateOperator(
        task_id="generate", prompt="a base model picture", model="runware:z-image@0", output_path=output_dir
    )
    with pytest.raises(AirflowFailException, match="does not serve runware:z-image@0"):
        op.execute({"ti": FakeTI(run_id=f"manual__{uuid.uuid4().hex}")})


def test_gpu_check_tiny_path_runs_and_batches(tmp_path):
    """`bench/gpu_check.sh --tiny`, the CPU path of the GPU check, end to end (CI)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--tiny", "--runs", "1", "--work-dir", str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable, **ONE_THREAD},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # gpu_check.sh prints gpu_check.py's JSON report, then bench/accel_check.py's figures.
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    report = next(r for r in reports if "batched" in r)
    assert report["mode"] == "tiny" and report["batched"] is True
    assert report["seconds_per_image_batch1"] > 0 and report["images_per_minute_batch4"] > 0
