"""Data flows down: an operator calls a job, the job calls the hook; nothing calls back up.

A job is given values (the delivery fields, the hook, a batch's settings) and finishes the request
itself; the hook alone sets `deliveryMethod`. A module below the operators never imports one, so a
job can be run, and tested, without an operator.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import pytest

from airflow_provider_zimage.exceptions import ZImagePermanentError
from airflow_provider_zimage.jobs.delivery import DeliveryFields
from airflow_provider_zimage.jobs.generation import GenerationJob, TaskInstanceRef
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.storage.artifacts import ArtifactStore

PACKAGE = Path(__file__).resolve().parents[1] / "airflow_provider_zimage"
SECRET = "a-webhook-secret-long-enough-to-mask"


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_module_below_the_operators_imports_one():
    climbing = {
        str(path.relative_to(PACKAGE)): sorted(m for m in imported_modules(path) if ".operators" in m)
        for path in PACKAGE.rglob("*.py")
        if "operators" not in path.relative_to(PACKAGE).parts
    }
    assert {k: v for k, v in climbing.items() if v} == {}


def test_the_batch_operator_does_not_import_the_other_operator():
    assert "airflow_provider_zimage.operators.generate" not in imported_modules(
        PACKAGE / "operators" / "batch.py"
    )


class RecordingHook:
    def __init__(self) -> None:
        self.sent: list[ImageInferenceRequest] = []

    def submit(self, requests: Sequence[ImageInferenceRequest]) -> list[str]:
        self.sent.extend(requests)
        return [r.task_uuid for r in requests]


def job(tmp_path: Path) -> GenerationJob:
    request = ImageInferenceRequest.build(
        model="turbo", positive_prompt="a lighthouse", width=256, height=256
    )
    ref = TaskInstanceRef("flows", "generate", "manual__1", -1)
    return GenerationJob(
        ref, request, backend="runware", origin="zimage_default", store=ArtifactStore(str(tmp_path))
    )


WEBHOOK = DeliveryFields(
    conn_id="zimage_default",
    lifetime=600.0,
    webhook_base_url="https://airflow.example.com",
    webhook_secret=SECRET,
)


def test_a_job_sends_its_request_with_the_webhook_url_of_the_ledgers_task_uuid(tmp_path):
    hook = RecordingHook()
    submission = job(tmp_path).submit(hook, WEBHOOK)
    [sent] = hook.sent
    assert sent.task_uuid == submission.task_uuid
    assert str(sent.webhook_url).startswith(
        f"https://airflow.example.com/zimage/webhooks/{submission.task_uuid}?token="
    )
    assert sent.delivery_method is None  # the hook sets it, and nothing else does
    assert submission.request is not None and "webhookURL" not in submission.request  # a credential


def test_a_job_without_delivery_fields_sends_the_request_as_built(tmp_path):
    hook = RecordingHook()
    the_job = job(tmp_path)
    submission = the_job.submit(hook)
    assert hook.sent == [the_job.request_for(submission)]


def test_a_refused_submission_never_shows_the_webhook_token(tmp_path):
    class EchoingHook:
        def submit(self, requests: Sequence[ImageInferenceRequest]) -> list[str]:
            raise ZImagePermanentError(f"refused: {requests[0].to_wire()}")

    with pytest.raises(ZImagePermanentError) as refused:
        job(tmp_path).submit(EchoingHook(), WEBHOOK)
    finished = WEBHOOK.finish(job(tmp_path).request)
    assert finished.credentials and all(c not in str(refused.value) for c in finished.credentials)


@pytest.mark.parametrize(
    ("next_poll", "inbox_interval", "deadline", "expected"),
    [
        (15.0, None, None, 5.0),  # until the next poll
        (15.0, 0.25, None, 0.25),  # a watched inbox is looked at sooner
        (15.0, None, 12.0, 2.0),  # never past the deadline
        (9.0, None, None, 0.0),  # a poll already due: no sleep, never a negative one
    ],
)
def test_every_path_that_waits_sleeps_by_one_rule(next_poll, inbox_interval, deadline, expected):
    now = 10.0
    assert protocol.next_pause(next_poll, now, inbox_interval=inbox_interval, deadline=deadline) == expected
