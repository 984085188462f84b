"""0.2's module paths keep working for one release after the move into concern packages (issue 20).

A DAG, a plugin or a pickle that names `airflow_provider_zimage.models` (or `.state`, `.storage`...)
still gets the same classes, told once where they went; and a trigger that 0.2 serialized into the
metadata DB deserializes after the upgrade, because the trigger classpaths did not move.
"""

from __future__ import annotations

import importlib
import pickle
import sys
import warnings

import pytest

PACKAGE = "airflow_provider_zimage"

# Old path -> (new path, one public name that must be the same object through both).
MOVED = {
    "models": ("runware.models", "ImageInferenceRequest"),
    "protocol": ("runware.protocol", "RunwareResponse"),
    "outcomes": ("runware.outcomes", "TaskWait"),
    "generation": ("jobs.generation", "GenerationJob"),
    "state": ("jobs.ledger", "Ledger"),
    "batch_state": ("jobs.batch_ledger", "BatchLedger"),
    "waiting": ("jobs.waiting", "end_try"),
    "content_index": ("jobs.content_index", "reuse"),
    "uploads": ("jobs.uploads", "store_uploaded"),
    "spend": ("storage.spend", "read_spend"),
    "inbox": ("webhooks.inbox", "WebhookInbox"),
}


def _forget(name: str) -> None:
    """As if this process had never imported the old path (the new module stays loaded)."""
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    if parent in sys.modules and child in vars(sys.modules[parent]):
        delattr(sys.modules[parent], child)


def _deprecations(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_imports_the_new_module_and_says_where_it_went_once(old: str) -> None:
    new_path, name = MOVED[old]
    new = importlib.import_module(f"{PACKAGE}.{new_path}")
    _forget(f"{PACKAGE}.{old}")

    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        module = importlib.import_module(f"{PACKAGE}.{old}")
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        scope: dict[str, object] = {}
        exec(f"from {PACKAGE}.{old} import {name}", scope)
        exec(f"import {PACKAGE}.{old}", scope)

    assert module is new
    assert scope[name] is getattr(new, name)
    assert module.__name__ == f"{PACKAGE}.{new_path}"  # the new module itself, not a copy
    messages = _deprecations(first)
    assert len(messages) == 1 and f"{PACKAGE}.{new_path}" in messages[0], messages
    assert _deprecations(again) == []


def test_old_storage_names_come_from_the_storage_package_with_a_warning() -> None:
    """`storage` is now a package, so its 0.2 names are served by the package itself."""
    from airflow_provider_zimage.storage import artifacts

    with pytest.warns(DeprecationWarning, match=r"airflow_provider_zimage\.storage\.artifacts"):
        from airflow_provider_zimage.storage import ArtifactStore
    with pytest.warns(DeprecationWarning):
        import airflow_provider_zimage.storage as old_storage

        write_json_atomic = old_storage.write_json_atomic

    assert ArtifactStore is artifacts.ArtifactStore
    assert write_json_atomic is artifacts.write_json_atomic
    with pytest.raises(AttributeError):
        old_storage.no_such_name  # noqa: B018


def test_isinstance_holds_across_the_old_and_new_paths() -> None:
    from airflow_provider_zimage.runware.models import ImageInferenceRequest

    _forget(f"{PACKAGE}.models")
    with pytest.warns(DeprecationWarning):
        old_models = importlib.import_module(f"{PACKAGE}.models")
    request = old_models.ImageInferenceRequest.build(
        positive_prompt="a red fox", model="runware:z-image@turbo"
    )
    assert isinstance(request, ImageInferenceRequest)


@pytest.mark.parametrize(("old", "name"), [("models", "ImageResult"), ("state", "Submission")])
def test_a_pickle_naming_an_old_path_loads_the_moved_class(old: str, name: str) -> None:
    new_path, _ = MOVED[old]
    # Protocol 0's GLOBAL opcode: what a 0.2 pickle of the class holds, module and name as text.
    legacy = f"c{PACKAGE}.{old}\n{name}\n.".encode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = pickle.loads(legacy)
    assert loaded is getattr(importlib.import_module(f"{PACKAGE}.{new_path}"), name)


# What 0.2's serialize() returned, as the triggerer stores it in the metadata DB (classpath, kwargs).
TRIGGERS_0_2 = [
    (
        "airflow_provider_zimage.triggers.task.ZImageTaskTrigger",
        {
            "task_uuid": "0b2e8f3c-5d1a-4c6e-9f7b-2a3d4e5f6a7b",
            "zimage_conn_id": "zimage_default",
            "expected_results": 2,
            "deadline": 1_900_000_000.0,
            "poll_interval": 1.0,
            "max_poll_interval": 10.0,
            "max_consecutive_errors": 5,
            "webhook_inbox": "file:///tmp/zimage-inbox",
            "poll_after": 1_899_999_000.0,
            "inbox_interval": 0.25,
            "not_before": 1_899_998_000.0,
        },
    ),
    (
        "airflow_provider_zimage.triggers.batch.ZImageBatchTrigger",
        {
            "task_uuids": {
                "0b2e8f3c-5d1a-4c6e-9f7b-2a3d4e5f6a7b": 1,
                "1c3f9a4d-6e2b-4d7f-8a8c-3b4e5f6a7b8c": 2,
            },
            "zimage_conn_id": "zimage_default",
            "deadline": 1_900_000_000.0,
            "poll_interval": 1.0,
            "max_poll_interval": 10.0,
            "max_consecutive_errors": 5,
            "webhook_inbox": None,
            "poll_after": 0.0,
            "inbox_interval": 1.0,
            "not_before": 0.0,
        },
    ),
]


@pytest.mark.parametrize(("classpath", "kwargs"), TRIGGERS_0_2, ids=["task", "batch"])
def test_a_trigger_serialized_by_0_2_deserializes_after_the_upgrade(classpath: str, kwargs: dict) -> None:
    try:  # what the triggerer uses to load a stored classpath (its home moved in 3.2)
        from airflow.sdk.module_loading import import_string
    except ImportError:
        from airflow.utils.module_loading import import_string  # type: ignore[no-redef]

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the classpath itself did not move
        trigger = import_string(classpath)(**kwargs)

    assert trigger.serialize() == (classpath, kwargs)
