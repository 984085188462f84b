"""What a successful task prints besides its own lines: no secrets-masker warning, no progress bars.

Airflow's secrets masker logs "Skipping masking for a secret as it's too short" for any short value it
is handed, sensitive or not, and `Connection.extra_dejson` hands it every extra (`device` "cpu"). tqdm
bars from diffusers and transformers go to stderr, which the task log shows as ERROR lines. Both are
checked where a user sees them: the output of a real `dag.test()` run in a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_zimage.hooks.runware import ConnectionSettings

REPO = Path(__file__).resolve().parents[1]
SECRET = "webhook-secret-0f3c9a"
API_KEY = "rw-api-key-7d1e42b9"


@pytest.fixture
def masked(monkeypatch) -> list[Any]:
    """Every value handed to Airflow's secrets masker from now on, and its short-secret warning reset."""
    from airflow.sdk._shared.secrets_masker import _secrets_masker

    masker_class = type(_secrets_masker())
    handed: list[Any] = []
    add_mask = masker_class.add_mask

    def spy(self, secret, name=None):
        handed.append(secret)
        return add_mask(self, secret, name)

    monkeypatch.setattr(masker_class, "add_mask", spy)
    monkeypatch.setattr(masker_class, "_has_warned_short_secret", False)
    return handed


def strings(values: list[Any]) -> list[str]:
    """The strings among `values`, dicts and lists walked (the masker walks them the same way)."""
    found: list[str] = []
    for value in values:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            found += strings(list(value.values()))
        elif isinstance(value, list | tuple | set):
            found += strings(list(value))
    return found


@pytest.mark.parametrize(
    ("conn", "secrets"),
    [
        (
            {
                "extra": {
                    "backend": "local",
                    "device": "cpu",
                    "dtype": "auto",
                    "model_path": "/m",
                    "cpu_offload": 0,
                }
            },
            [],
        ),
        (
            {
                "host": "http://127.0.0.1:9/v1",
                "password": "exec-token-5b2f",
                "extra": {"backend": "executor"},
            },
            [],
        ),
        (
            {
                "extra": {
                    "api_key": API_KEY,
                    "webhook_secret": SECRET,
                    "webhook_base_url": "https://a.example",
                }
            },
            [API_KEY, SECRET],
        ),
        (
            {"password": API_KEY, "extra": {"extra__zimage__webhook_secret": SECRET, "max_retries": 3}},
            [SECRET],
        ),
        ({"password": API_KEY, "extra": {"webhook_secret": "", "timeout": ""}}, []),
    ],
    ids=["local", "executor", "runware-extras", "legacy-prefix", "empty-values"],
)
def test_reading_a_connection_hands_nothing_short_to_the_masker_and_masks_its_secret_extras(
    conn, secrets, masked
):
    from airflow.sdk import Connection
    from airflow.sdk._shared.secrets_masker import _secrets_masker

    ConnectionSettings.from_connection(
        Connection(
            conn_id="zimage_default",
            conn_type="zimage",
            host=conn.get("host"),
            password=conn.get("password"),
            extra=json.dumps(conn["extra"]),
        )
    )

    assert [s for s in strings(masked) if len(s) < 5] == []
    assert type(_secrets_masker())._has_warned_short_secret is False
    assert set(strings(masked)) == set(secrets)  # nothing but the credentials among the extras
    for secret in secrets:
        assert _secrets_masker().redact(f"token={secret}") == "token=***"


def test_a_short_webhook_secret_is_not_handed_to_the_masker(masked):
    from airflow_provider_zimage.redaction import mask_credentials

    mask_credentials("abc", "", None, SECRET)

    assert masked == [SECRET]


@pytest.mark.local
def test_a_local_quickstart_run_prints_no_masker_warning_and_no_progress_bars(tmp_path, tiny_zimage_model):
    """One `dag.test()` of zimage_quickstart on the tiny local model, in a process of its own so that
    loading the pipeline (where the bars come from) really happens in it."""
    home = tmp_path / "airflow"
    shutil.copytree(REPO / "dags", tmp_path / "dags", ignore=shutil.ignore_patterns("__pycache__"))
    # device and dtype left to `auto` (the CPU here): a value as short as "cpu" in the extras makes
    # Airflow itself warn when it loads the connection (README, Troubleshooting).
    connection = {"conn_type": "zimage", "extra": {"backend": "local", "model_path": str(tiny_zimage_model)}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTEST_", "ZIMAGE_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__ZIMAGE__OUTPUT_PATH": (tmp_path / "out").as_uri(),
            "AIRFLOW_CONN_ZIMAGE_DEFAULT": json.dumps(connection),
            "ZIMAGE_IMAGE_SIZE": "128",
            "OMP_NUM_THREADS": "1",
        }
    )
    script = (
        "from airflow.utils import db\n"
        "db.initdb()\n"
        "from tests.dagtest import dag_bag_class\n"
        "run = dag_bag_class()().get_dag('zimage_quickstart').test()\n"
        "print('RUN STATE', run.state)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr

    assert done.returncode == 0 and "RUN STATE success" in output, output[-4000:]
    assert "too short" not in output
    assert not re.search(r"\d+%\|[^|\n]*\||\d+(\.\d+)?(it/s|s/it)\]", output), "a progress bar was printed"
    assert re.search(r"step \d+/\d+", output), "the provider's own per-step lines are the progress"
    assert not re.search(r"\[error\s*\]|ERROR", done.stderr), done.stderr[-4000:]


# -- what the generate task's log says about where the images went ---------------------------------------


@pytest.mark.parametrize(
    ("backend", "named", "not_named"),
    [("runware", "Runware task", "zimage-executor"), ("executor", "zimage-executor task", "Runware")],
)
def test_the_submission_line_names_the_service_the_task_really_went_to(
    backend, named, not_named, tmp_path, caplog
):
    from airflow_provider_zimage.jobs.generation import GenerationJob, TaskInstanceRef
    from airflow_provider_zimage.runware.models import ImageInferenceRequest
    from airflow_provider_zimage.storage.artifacts import ArtifactStore

    job = GenerationJob(
        TaskInstanceRef("shop", "generate", "manual__1", -1),
        ImageInferenceRequest.build(model="runware:z-image@turbo", positive_prompt="a red ceramic mug"),
        backend=backend,
        origin="zimage_default",
        store=ArtifactStore(tmp_path.as_uri()),
    )
    hook = SimpleNamespace(submit=lambda requests: [r.task_uuid for r in requests])
    with caplog.at_level("INFO", logger="airflow_provider_zimage"):
        submission = job.submit(hook)
        job.submit(hook)  # a retry reattaches to the same task

    lines = [r.getMessage() for r in caplog.records if submission.task_uuid in r.getMessage()]
    assert lines == [
        f"Submitted {named} {submission.task_uuid} (generation 0)",
        f"Reattaching to {named} {submission.task_uuid} (generation 0)",
    ]
    assert not any(not_named in line for line in lines)


def test_a_generate_task_prints_its_images_tab_once_with_the_configured_base_url(
    zimage_conn, tmp_path, capfd, monkeypatch
):
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator
    from tests.dagtest import FakeTI

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8093/")
    op = ZImageGenerateOperator(
        task_id="generate", prompt="a teapot on a desk", output_path=tmp_path.as_uri(), poll_interval=0.02
    )
    ti = FakeTI("manual__2026-03-01T10:00:00+00:00", dag_id="shop", map_index=2)
    op.execute({"ti": ti})
    op.execute({"ti": ti})  # a re-run that reuses the stored images says where they are too

    tab = (
        "http://127.0.0.1:8093/dags/shop/runs/manual__2026-03-01T10%3A00%3A00%2B00%3A00"
        "/tasks/generate/mapped/2/plugin/zimage-task-images"
    )
    captured = capfd.readouterr()
    lines = (captured.out + captured.err).splitlines()  # the task log as Airflow's structlog prints it
    assert len([line for line in lines if f"Images tab: {tab} " in line]) == 2
    assert sum("/plugin/zimage-task-images" in line for line in lines) == 2
    assert not any(zimage_conn.api_key in line for line in lines)
