"""`make demo` / `make demo-ui` (scripts/demo.py) without running a demo: the port a user asks for is the
one served and linked, and the task logs that `airflow dags test` prints land where the UI reads them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "manual__2026-12-06T02:00:26.846610+00:00"


@pytest.fixture
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zimage_demo_script", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_make_demo_ui_serves_and_links_the_port_asked_for_now_not_the_one_of_the_first_demo(
    demo, tmp_path, monkeypatch
):
    # What an earlier `make demo` (on the default port) left behind.
    last = tmp_path / "last-run.json"
    env = demo.airflow_env(
        demo.choose_backend({}, tmp_path / "tiny"), tmp_path / "home", tmp_path / "out", {"PATH": "/bin"}
    )
    assert env["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:8080"
    tab = demo.images_tab(env, {"dag_id": "zimage_content_pipeline", "run_id": RUN_ID})
    keep = {k: env[k] for k in ("AIRFLOW_HOME", "AIRFLOW__API__BASE_URL", "AIRFLOW__ZIMAGE__OUTPUT_PATH")}
    last.write_text(json.dumps({"images_tab": tab, "env": keep}))
    monkeypatch.setattr(demo, "LAST_RUN", last)
    served: dict[str, Any] = {}
    monkeypatch.setattr(demo, "serve_ui", lambda env, home, urls: served.update(env=env, urls=urls) or 0)

    monkeypatch.setenv("ZIMAGE_DEMO_PORT", "9123")
    assert demo.serve_last_run() == 0

    assert served["env"]["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:9123"
    assert served["env"]["AIRFLOW_HOME"] == str(tmp_path / "home")  # the demo's Airflow, as before
    [tab_line] = [line for line in served["urls"] if "http" in line]
    assert "http://127.0.0.1:9123/dags/zimage_content_pipeline/runs/" in tab_line
    assert not any(":8080" in line for line in served["urls"])


DAG = "[airflow.sdk.definitions.dag]"
TAB = "http://127.0.0.1:8080/dags/d/runs/r/tasks/generate/mapped/3/plugin/zimage-task-images"
TRANSCRIPT = [
    "2026-12-06T02:00:26.990000Z [info     ] Filling up the DagBag from /dags [airflow.models.dagbag]",
    f"2026-12-06T02:00:27.086655Z [info     ] [DAG TEST] starting task_id=generate map_index=3 {DAG}",
    "2026-12-06T02:00:31.431039Z [info     ] Submitted zimage-executor task a63b (generation 0) [x]",
    "2026-12-06T02:00:31.500000Z [error    ] Task failed with exception     [task]",
    "Traceback (most recent call last):",
    '  File "x.py", line 1, in <module>',
    f"2026-12-06T02:00:31.533462Z [info     ] [DAG TEST] end task task_id=generate map_index=3 {DAG}",
    f"2026-12-06T02:00:32.086655Z [info     ] [DAG TEST] starting task_id=generate map_index=3 {DAG}",
    f"2026-12-06T02:00:33.000000Z [info     ] Images tab: {TAB} [task]",
    f"2026-12-06T02:00:33.533462Z [info     ] [DAG TEST] end task task_id=generate map_index=3 {DAG}",
    f"2026-12-06T02:00:33.539035Z [info     ] [DAG TEST] starting task_id=show_manifest map_index=-1 {DAG}",
    "Manifest file:///out/manifest.json:",
    f"2026-12-06T02:00:33.634843Z [info     ] [DAG TEST] end task task_id=show_manifest map_index=-1 {DAG}",
    "2026-12-06T02:00:33.751985Z [info     ] Marking run <DagRun zimage_quickstart> successful [dagrun]",
]


def test_each_task_log_of_a_demo_run_is_written_where_the_airflow_ui_reads_it(demo, tmp_path):
    from airflow.configuration import conf
    from airflow.utils.log.file_task_handler import _log_stream_to_parsed_log_stream

    logs = tmp_path / "logs"
    template = conf.get("logging", "log_filename_template")
    written = demo.write_task_logs(TRANSCRIPT, "zimage_quickstart", RUN_ID, logs, template)

    # Airflow's default log_filename_template, as its FileTaskHandler renders it for these attempts.
    where = f"dag_id=zimage_quickstart/run_id={RUN_ID}/task_id="
    assert sorted(str(p.relative_to(logs)) for p in written) == [
        f"{where}generate/map_index=3/attempt=1.log",
        f"{where}generate/map_index=3/attempt=2.log",
        f"{where}show_manifest/attempt=1.log",
    ]

    def read(path: str) -> list[Any]:
        text = (logs / path).read_text()
        return [log for _, _, log in _log_stream_to_parsed_log_stream(iter(text.splitlines()))]

    first = read(f"{where}generate/map_index=3/attempt=1.log")
    assert [m.event for m in first][1].startswith("Submitted zimage-executor task a63b")
    assert first[1].level == "info" and first[1].timestamp is not None
    assert first[2].level == "error" and "Traceback (most recent call last):" in [m.event for m in first]
    second = [m.event for m in read(f"{where}generate/map_index=3/attempt=2.log")]
    assert any(e.startswith("Images tab: http://127.0.0.1:8080/") for e in second)
    assert not any("Submitted" in e for e in second)
    manifest = [m.event for m in read(f"{where}show_manifest/attempt=1.log")]
    assert "Manifest file:///out/manifest.json:" in manifest
    everything = "".join(p.read_text() for p in written)
    assert "Filling up the DagBag" not in everything and "Marking run" not in everything
