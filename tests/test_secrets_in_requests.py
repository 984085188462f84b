"""A known secret templated (or copied) into a request is refused before anything is sent.

Airflow renders Jinja inside values mapped with `expand_kwargs` and inside the rows of a batch's
`requests`, so a table cell `{{ conn.zimage_default.password }}` becomes the API key in a prompt. It
must not reach Runware, a manifest, XCom or the Images tab: the task fails naming the parameter,
before any POST, and the message never repeats the secret.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_zimage.testing.pytest_plugin import connection_json
from airflow_provider_zimage.testing.runware_server.server import DEFAULT_API_KEY
from tests.dagtest import run_dag, task_states

pytestmark = pytest.mark.usefixtures("airflow_db")

WEBHOOK_SECRET = "whsec-connection-0123456789"
CONFIGURED_SECRET = "whsec-configured-9876543210"
PARTNER_KEY = "sk-partner-5f3c9a1b7e"

MAPPED_DAG = """
import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    @task
    def rows():
        return [{"prompt": prompt, "seed": 7 + i} for i, prompt in enumerate(PARAMS["prompts"])]

    ZImageGenerateOperator.partial(
        task_id="generate",
        width=256,
        height=256,
        output_path=PARAMS["output"],
        poll_interval=0.05,
        max_poll_interval=0.2,
    ).expand_kwargs(rows())
"""

BATCH_DAG = """
import pendulum
from airflow.sdk import DAG, task

from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator

with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    @task
    def rows():
        return [{"prompt": prompt, "seed": 7 + i} for i, prompt in enumerate(PARAMS["prompts"])]

    ZImageBatchGenerateOperator(
        task_id="generate",
        requests=rows() if PARAMS["from_xcom"] else [
            {"prompt": prompt, "seed": 7 + i} for i, prompt in enumerate(PARAMS["prompts"])
        ],
        width=256,
        height=256,
        output_path=PARAMS["output"],
        poll_interval=0.05,
        max_poll_interval=0.2,
    )
"""


def task_instances(run: Any, task_id: str) -> dict[int, Any]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == run.dag_id,
                TaskInstance.run_id == run.run_id,
                TaskInstance.task_id == task_id,
            )
        ).all()
        return {ti.map_index: (str(ti.state), ti.rendered_map_index) for ti in tis}


def xcom_values(run: Any, task_id: str) -> dict[tuple[int, str], Any]:
    """Every XCom the task's instances pushed (results and extra links), by (map index, key)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == run.dag_id,
                XComModel.run_id == run.run_id,
                XComModel.task_id == task_id,
            )
        ).all()
        return {(row.map_index, row.key): XComModel.deserialize_value(row) for row in rows}


def stored_text(output_dir: str) -> str:
    """Everything the run wrote under the output path (manifests, ledgers), as one string."""
    root = Path(output_dir.removeprefix("file://"))
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.suffix == ".json")


def manifests(output_dir: str) -> list[Path]:
    return sorted(Path(output_dir.removeprefix("file://")).rglob("manifest.json"))


def assert_nothing_left_with(secret: str, server: Any, output_dir: str, run: Any) -> None:
    assert secret not in json.dumps(server.request_bodies)
    assert secret not in stored_text(output_dir)
    assert secret not in json.dumps(list(xcom_values(run, "generate").values()), default=str)
    assert all(secret not in (label or "") for _, label in task_instances(run, "generate").values())


def test_a_connection_password_rendered_into_a_prompt_through_expand_kwargs_is_refused_before_sending(
    zimage_conn, output_dir
):
    prompts = ["a red mug on a table", "a mug labelled {{ conn.zimage_default.password }}"]
    run = run_dag("secret_mapped", MAPPED_DAG, dag_id="secret_mapped", output=output_dir, prompts=prompts)
    states = task_instances(run, "generate")
    assert states[0][0] == "success" and states[1][0] == "failed", task_states(run)
    assert zimage_conn.stats["total_accepted"] == 1  # the ordinary row only
    assert len(manifests(output_dir)) == 1
    assert_nothing_left_with(DEFAULT_API_KEY, zimage_conn, output_dir, run)
    assert (0, "return_value") in xcom_values(run, "generate")
    assert (1, "return_value") not in xcom_values(run, "generate")


@pytest.mark.parametrize(
    ("rows_from_a_task", "cell"),
    [(False, "{{ conn.zimage_default.password }}"), (True, DEFAULT_API_KEY)],
    ids=["templated-row-in-the-dag-file", "key-copied-into-a-table-row"],
)
def test_a_batch_row_holding_the_connection_password_is_refused_before_any_post(
    zimage_conn, output_dir, rows_from_a_task, cell
):
    """Rows written in the DAG file are rendered; rows an upstream task returns are not, but a key
    copied into the table itself is the same leak."""
    prompts = [f"catalogue item {i}" for i in range(5)]
    prompts[3] = f"item {cell}"
    dag_id = f"secret_batch_{int(rows_from_a_task)}"  # two shapes of DAG: Airflow 3.1 caches one per id
    run = run_dag(
        dag_id,
        BATCH_DAG,
        dag_id=dag_id,
        output=output_dir,
        prompts=prompts,
        from_xcom=rows_from_a_task,
    )
    assert task_instances(run, "generate")[-1][0] == "failed", task_states(run)
    assert zimage_conn.request_bodies == []  # not one POST: the other rows wait for a fixed table
    assert manifests(output_dir) == []
    assert_nothing_left_with(DEFAULT_API_KEY, zimage_conn, output_dir, run)


@pytest.mark.parametrize(
    ("secret", "prompt", "setting"),
    [
        (WEBHOOK_SECRET, f"a mug, {WEBHOOK_SECRET}", "connection"),
        (CONFIGURED_SECRET, f"a mug, {CONFIGURED_SECRET}", "config"),
        (PARTNER_KEY, "a mug, {{ var.value.partner_api_key }}", "variable"),
    ],
    ids=["connection-webhook-secret", "configured-webhook-secret", "variable-the-masker-holds"],
)
def test_a_webhook_secret_or_a_value_the_secrets_masker_holds_in_a_prompt_is_refused_before_any_request(
    zimage_server, output_dir, monkeypatch, secret, prompt, setting
):
    extra = {"webhook_secret": WEBHOOK_SECRET} if setting == "connection" else {}
    monkeypatch.setenv("AIRFLOW_CONN_ZIMAGE_DEFAULT", connection_json(zimage_server, **extra))
    if setting == "config":
        monkeypatch.setenv("AIRFLOW__ZIMAGE__WEBHOOK_SECRET", CONFIGURED_SECRET)
    if setting == "variable":
        # A Variable whose name says "api_key": Airflow's secrets masker holds its value once read.
        monkeypatch.setenv("AIRFLOW_VAR_PARTNER_API_KEY", PARTNER_KEY)
    prompts = ["a red mug on a table", prompt]
    run = run_dag(
        f"secret_{setting}", MAPPED_DAG, dag_id=f"secret_{setting}", output=output_dir, prompts=prompts
    )
    states = task_instances(run, "generate")
    assert states[0][0] == "success" and states[1][0] == "failed", task_states(run)
    assert zimage_server.stats["total_accepted"] == 1
    assert len(manifests(output_dir)) == 1
    assert_nothing_left_with(secret, zimage_server, output_dir, run)


def test_the_refusal_names_the_row_and_the_parameter_and_never_repeats_the_secret(zimage_conn):
    from airflow_provider_zimage.compat import AirflowFailException
    from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    rows = [{"prompt": f"item {i}"} for i in range(5)]
    rows[3]["negative_prompt"] = f"blurry, {DEFAULT_API_KEY}"
    batch = ZImageBatchGenerateOperator(task_id="batch", requests=rows)
    with pytest.raises(AirflowFailException) as refused:
        batch.build_requests()
    assert str(refused.value).startswith("requests[3].negativePrompt:")
    assert DEFAULT_API_KEY not in str(refused.value)

    single = ZImageGenerateOperator(task_id="single", prompt=f"a mug {DEFAULT_API_KEY} " + "x" * 3000)
    with pytest.raises(AirflowFailException) as refused:  # too long as well: the secret is named first
        single.execute({})  # type: ignore[arg-type]
    assert "positivePrompt" in str(refused.value) and DEFAULT_API_KEY not in str(refused.value)
    assert zimage_conn.request_bodies == []


def test_a_mapped_instance_label_never_shows_a_secret_its_prompt_holds():
    """The default map index label is the start of the prompt, and Airflow renders it for a failed
    instance too: a refused prompt must not put the secret into the grid instead."""
    import jinja2
    from airflow.sdk.log import mask_secret

    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    mask_secret(PARTNER_KEY)
    op = ZImageGenerateOperator(task_id="g", prompt=f"a mug with {PARTNER_KEY} on it")
    label = jinja2.Environment().from_string(op.map_index_template).render(task=op)
    assert label == "a mug with *** on it"


def test_a_manifest_never_records_a_secret_even_from_a_request_that_was_not_refused():
    """Defence in depth: a request built some other way (the sensor, a subclass) holding a value the
    masker hides is recorded with "***" in the manifest the Images tab reads."""
    from airflow.sdk.log import mask_secret

    from airflow_provider_zimage.jobs.generation import public_request
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

    mask_secret(PARTNER_KEY)
    request = ImageInferenceRequest.build(
        model="runware:z-image@turbo", positive_prompt=f"a mug, {PARTNER_KEY}", negative_prompt="blurry"
    )
    recorded = public_request(request)
    assert recorded["positivePrompt"] == "a mug, ***" and recorded["negativePrompt"] == "blurry"


def test_a_batch_of_many_rows_sifts_its_secrets_once_and_still_refuses_the_last_row(
    zimage_conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalogue of 100,000 rows is checked against the same credentials: the masker's minimum length
    is read once per batch, not once per row (it cost more than the check), and row 199 is still caught."""
    from airflow_provider_zimage import compat
    from airflow_provider_zimage.compat import AirflowFailException
    from airflow_provider_zimage.operators.batch import ZImageBatchGenerateOperator

    reads: list[tuple[str, str]] = []
    real_getint = compat.conf.getint

    def getint(section: str, key: str, *args: Any, **kwargs: Any) -> int:
        if key == "min_length_masked_secret":
            reads.append((section, key))
        return int(real_getint(section, key, *args, **kwargs))

    monkeypatch.setattr(compat.conf, "getint", getint)
    few = [{"prompt": f"item {i}", "seed": i} for i in range(2)]
    assert len(ZImageBatchGenerateOperator(task_id="batch", requests=few).build_requests()) == 2
    per_batch = len(reads)
    reads.clear()
    rows = [{"prompt": f"item {i}", "seed": i} for i in range(200)]
    assert len(ZImageBatchGenerateOperator(task_id="batch", requests=rows).build_requests()) == 200
    assert len(reads) == per_batch <= 3  # a few times for the batch, not once per row
    rows[199]["prompt"] = f"item {DEFAULT_API_KEY}"
    with pytest.raises(AirflowFailException) as refused:
        ZImageBatchGenerateOperator(task_id="batch", requests=rows).build_requests()
    assert str(refused.value).startswith("requests[199].positivePrompt:")
    assert zimage_conn.request_bodies == []
