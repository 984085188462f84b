"""Run a DAG written as source through `dag.test()`, the way Airflow 3.3 needs it.

`dag.test()` serializes the DAG by re-parsing the DAGs folder, so a DAG built inside a test function is
not enough: the source goes to a file in this worker's DAGS_FOLDER, parameters go in as JSON literals,
and the DAG object comes back from a DagBag of that file.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any


def dags_folder() -> Path:
    folder = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_dag(name: str, source: str, **params: Any) -> Path:
    """Write `source` (using the name PARAMS for `params`) as `<dag_id>.py` in the DAGs folder."""
    header = f"PARAMS = {json.dumps(params)!r}\nimport json as _json\nPARAMS = _json.loads(PARAMS)\n"
    path = dags_folder() / f"{name}.py"
    path.write_text(header + textwrap.dedent(source))
    return path


def dag_bag_class() -> Any:
    """Airflow's DagBag, wherever the installed release keeps it (imported late: it loads Airflow core)."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1 keeps it in models (3.2+ still does, with a deprecation warning)
        from airflow.models.dagbag import DagBag
    return DagBag


def load_dag(path: Path, dag_id: str) -> Any:
    DagBag = dag_bag_class()
    bag = DagBag(dag_folder=str(path))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


def run_dag(name: str, source: str, *, logical_date: Any = None, **params: Any) -> Any:
    """Write, load and `dag.test()` a DAG; returns the finished DagRun.

    The same `logical_date` twice re-runs the same run_id (as clearing a run does in production).
    """
    dag = load_dag(write_dag(name, source, **params), params.get("dag_id", name))
    if logical_date is None:
        return dag.test()
    return dag.test(logical_date=logical_date, run_after=logical_date)


class FakeTI:
    """The parts of a task instance the operator reads when a test calls `execute()` directly: its
    identity (where the ledger and artifacts live) and `xcom_push` (recorded for assertions)."""

    def __init__(
        self,
        run_id: str = "manual__behaviour",
        *,
        dag_id: str = "behaviour",
        task_id: str = "generate",
        map_index: int = -1,
    ) -> None:
        self.run_id, self.dag_id, self.task_id, self.map_index = run_id, dag_id, task_id, map_index
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def task_states(run: Any) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id)
        ).all()
        return {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in tis}
