"""LoRA and ControlNet AIR ids mapped to local weights on a `zimage` connection (backend local), and
reuse that follows the weights behind those ids: swapped weights are another picture."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers", reason="the local backend needs the `local` extra")

from PIL import Image

from airflow_provider_zimage.testing.tiny_model import build_tiny_controlnet, build_tiny_lora
from tests.dagtest import FakeTI, run_dag, task_states

pytestmark = [pytest.mark.local, pytest.mark.usefixtures("airflow_db")]

CONTROLNET_AIR = "civitai:999@1"
LORA_AIR = "civitai:123@4"


def guide_uri(seed: int = 2) -> str:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def weights_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder `[zimage] local_weights_roots` allows: mapped weights must be inside it."""
    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setenv("AIRFLOW__ZIMAGE__LOCAL_WEIGHTS_ROOTS", str(root))
    return root


@pytest.fixture
def controlnet(tiny_model: Path, weights_root: Path) -> Path:
    return build_tiny_controlnet(tiny_model, weights_root / "controlnet")


@pytest.fixture
def lora(tiny_model: Path, weights_root: Path) -> Path:
    return build_tiny_lora(tiny_model, weights_root / "lora")


def local_connection(monkeypatch: pytest.MonkeyPatch, model: Path, **extra: Any) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_ZIMAGE_DEFAULT",
        json.dumps(
            {
                "conn_type": "zimage",
                "extra": {"backend": "local", "model_path": str(model), "device": "cpu", **extra},
            }
        ),
    )


CONTROLNET_DAG = """
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_provider_zimage.operators.generate import ZImageGenerateOperator


def remember_failure(context):
    Path(PARAMS["failure"]).write_text(str(context.get("exception")))


with DAG(PARAMS["dag_id"], schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    ZImageGenerateOperator(
        task_id="generate",
        prompt="a lighthouse drawn over the guide",
        width=128,
        height=128,
        steps=2,
        seed=5,
        output_format="PNG",
        control_net=[{"model": PARAMS["air"], "guideImage": PARAMS["guide"]}],
        output_path=PARAMS["output"],
        on_failure_callback=remember_failure,
    )
"""


def test_a_dag_with_a_controlnet_mapped_on_the_connection_generates(
    tiny_model, controlnet, output_dir, tmp_path, monkeypatch
):
    local_connection(monkeypatch, tiny_model, controlnet_paths=json.dumps({CONTROLNET_AIR: str(controlnet)}))
    failure = tmp_path / "failure.txt"
    run = run_dag(
        "local_controlnet_mapped",
        CONTROLNET_DAG,
        dag_id="local_controlnet_mapped",
        output=output_dir,
        air=CONTROLNET_AIR,
        guide=guide_uri(),
        failure=str(failure),
    )
    assert run.state == "success", (task_states(run), failure.read_text() if failure.exists() else "")
    root = Path(output_dir.removeprefix("file://"))
    [manifest] = [json.loads(p.read_text()) for p in root.rglob("manifest.json")]
    assert manifest["backend"] == "local"
    assert manifest["request"]["controlNet"][0]["model"] == CONTROLNET_AIR


def test_a_dag_with_an_unmapped_controlnet_is_refused_naming_the_parameter(
    tiny_model, controlnet, output_dir, tmp_path, monkeypatch, capfd, caplog
):
    local_connection(monkeypatch, tiny_model, controlnet_paths={CONTROLNET_AIR: str(controlnet)})
    failure = tmp_path / "failure.txt"
    run = run_dag(
        "local_controlnet_unmapped",
        CONTROLNET_DAG,
        dag_id="local_controlnet_unmapped",
        output=output_dir,
        air="civitai:555@5",
        guide=guide_uri(),
        failure=str(failure),
    )
    assert run.state == "failed"
    # Airflow 3.3 hands the callback the exception; 3.1's dag.test() only logs it.
    seen = failure.read_text() + capfd.readouterr().out + caplog.text
    assert "controlNet[0].model: cannot be resolved locally" in seen


def generate(output_dir: str, run_id: str = "manual__one", **kwargs: Any) -> list[dict[str, Any]]:
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    op = ZImageGenerateOperator(
        task_id="generate",
        prompt="the same request",
        seed=9,
        width=128,
        height=128,
        steps=2,
        output_format="PNG",
        output_path=output_dir,
        **kwargs,
    )
    result: list[dict[str, Any]] = op.execute({"ti": FakeTI(run_id)})
    return result


def test_a_lora_mapped_on_the_connection_changes_the_picture(tiny_model, lora, output_dir, monkeypatch):
    local_connection(monkeypatch, tiny_model)
    [plain] = generate(output_dir, "manual__plain")
    local_connection(monkeypatch, tiny_model, lora_paths={LORA_AIR: str(lora)})
    [styled] = generate(output_dir, "manual__styled", lora=[{"model": LORA_AIR, "weight": 1.0}])
    assert styled["sha256"] != plain["sha256"]


@pytest.mark.parametrize(
    ("extra", "value", "words"),
    [
        ("controlnet_paths", "{not json", "JSON object"),
        ("controlnet_paths", '["civitai:1@1"]', "JSON object"),
        ("controlnet_paths", {CONTROLNET_AIR: 7}, "folder path"),
        ("controlnet_paths", {CONTROLNET_AIR: "/etc"}, "local_weights_roots"),
        ("controlnet_paths", {CONTROLNET_AIR: "relative/folder"}, "absolute"),
        ("lora_paths", {LORA_AIR: "/etc/passwd"}, "local_weights_roots"),
        ("lora_paths", {"": "/x"}, "AIR id"),
    ],
)
def test_a_bad_map_on_the_connection_is_refused_naming_the_extra(
    tiny_model, weights_root, output_dir, monkeypatch, extra, value, words
):
    from airflow_provider_zimage import local
    from airflow_provider_zimage.compat import AirflowFailException

    local_connection(monkeypatch, tiny_model, **{extra: value})
    loads = local.load_count()
    with pytest.raises(AirflowFailException) as caught:
        generate(output_dir)
    assert extra in str(caught.value) and words in str(caught.value)
    assert local.load_count() == loads, "refused after loading the model"


def test_a_mapped_controlnet_folder_without_config_is_refused_naming_the_extra(
    tiny_model, weights_root, output_dir, monkeypatch
):
    from airflow_provider_zimage.compat import AirflowFailException

    empty = weights_root / "empty"
    empty.mkdir()
    local_connection(monkeypatch, tiny_model, controlnet_paths={CONTROLNET_AIR: str(empty)})
    with pytest.raises(AirflowFailException, match=r"controlnet_paths.*config\.json"):
        generate(output_dir)


def test_a_symlink_out_of_the_weights_roots_is_refused(
    tiny_model, weights_root, output_dir, monkeypatch, tmp_path
):
    from airflow_provider_zimage.compat import AirflowFailException

    outside = build_tiny_controlnet(tiny_model, tmp_path / "outside" / "cn")
    (weights_root / "link").symlink_to(outside)
    local_connection(monkeypatch, tiny_model, controlnet_paths={CONTROLNET_AIR: str(weights_root / "link")})
    with pytest.raises(AirflowFailException, match="local_weights_roots"):
        generate(output_dir)


# -- reuse follows the weights behind the ids ---------------------------------------------------------


def replace_with_other_weights(folder: Path, build: Any) -> None:
    """Same architecture, same file names and sizes, other numbers: what a retrained checkpoint is."""
    shutil.rmtree(folder)
    build(folder)


@pytest.mark.parametrize("reuse", ["task", "content"])
def test_a_swapped_controlnet_folder_is_not_reused(tiny_model, controlnet, output_dir, monkeypatch, reuse):
    local_connection(monkeypatch, tiny_model, controlnet_paths={CONTROLNET_AIR: str(controlnet)})
    request = {"control_net": [{"model": CONTROLNET_AIR, "guideImage": guide_uri()}], "reuse": reuse}
    second_run = "manual__one" if reuse == "task" else "manual__two"
    [first] = generate(output_dir, "manual__one", **request)
    [same] = generate(output_dir, second_run, **request)
    assert same["sha256"] == first["sha256"]
    assert same["image_uuid"] == first["image_uuid"]  # the same weights: reused, not generated again

    replace_with_other_weights(controlnet, lambda f: build_tiny_controlnet(tiny_model, f, seed=1))
    [swapped] = generate(output_dir, second_run, **request)
    assert swapped["image_uuid"] != first["image_uuid"]
    assert swapped["sha256"] != first["sha256"]


def test_a_swapped_lora_is_not_reused(tiny_model, lora, output_dir, monkeypatch):
    local_connection(monkeypatch, tiny_model, lora_paths={LORA_AIR: str(lora)})
    request = {"lora": [{"model": LORA_AIR}], "reuse": "content"}
    [first] = generate(output_dir, "manual__one", **request)
    [same] = generate(output_dir, "manual__two", **request)
    assert same["image_uuid"] == first["image_uuid"]

    replace_with_other_weights(lora.parent, lambda f: build_tiny_lora(tiny_model, f, seed=1))
    [swapped] = generate(output_dir, "manual__three", **request)
    assert swapped["image_uuid"] != first["image_uuid"]
    assert swapped["sha256"] != first["sha256"]


# -- the executor ------------------------------------------------------------------------------------


def test_the_executor_health_lists_its_controlnets_and_their_weights(tiny_model, controlnet, tmp_path):
    from airflow_provider_zimage.executor.config import ExecutorConfig
    from airflow_provider_zimage.executor.server import ExecutorServer

    def health() -> dict[str, Any]:
        config = ExecutorConfig(
            models={"runware:z-image@turbo": str(tiny_model)},
            token="t" * 16,
            controlnets={CONTROLNET_AIR: str(controlnet)},
        )
        return ExecutorServer(config).health()

    before = health()
    [listed] = before["controlNets"]
    assert (listed["model"], listed["source"]) == (CONTROLNET_AIR, str(controlnet))
    replace_with_other_weights(controlnet, lambda f: build_tiny_controlnet(tiny_model, f, seed=1))
    after = health()
    assert after["controlNets"][0]["weights"] != listed["weights"]


def test_the_executor_fingerprint_changes_with_the_controlnet_weights(monkeypatch, output_dir):
    """The operator's origin on backend executor: the model's weights and, for a ControlNet request, the
    weights the executor reports for that id."""
    from airflow_provider_zimage.hooks.runware import ZImageHook
    from airflow_provider_zimage.operators.generate import ZImageGenerateOperator

    monkeypatch.setenv(
        "AIRFLOW_CONN_ZIMAGE_DEFAULT",
        json.dumps({"conn_type": "zimage", "host": "http://127.0.0.1:9", "extra": {"backend": "executor"}}),
    )
    weights = {"cn": "A"}

    def health(self: Any) -> dict[str, Any]:
        return {
            "models": [{"model": "runware:z-image@turbo", "weights": "/m@1"}],
            "controlNets": [{"model": CONTROLNET_AIR, "weights": f"/cn@{weights['cn']}"}],
        }

    monkeypatch.setattr(ZImageHook, "executor_health", health)
    op = ZImageGenerateOperator(
        task_id="generate",
        prompt="a lighthouse",
        seed=1,
        control_net=[{"model": CONTROLNET_AIR, "guideImage": guide_uri()}],
        output_path=output_dir,
    )
    request = op.build_request()
    before = op._executor_origin(request)
    weights["cn"] = "B"
    assert op._executor_origin(request) != before
