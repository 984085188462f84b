"""Airflow names whose home moved between the Airflow releases we support (3.1 up to the newest).

Each name is taken from the Task SDK where the installed Airflow has it there, else from where the
older release keeps it, so the rest of the package imports one spelling and runs on every tested
version (README "Compatibility"). Only names that actually moved live here; names every supported
release exports from `airflow.sdk` (BaseOperator, ObjectStoragePath, ...) are imported from it
directly. This module imports nothing heavier than Airflow's configuration, because the webhook plugin
(loaded by every Airflow process) imports it too.
"""

from __future__ import annotations

import importlib
import re

try:
    from airflow.sdk import conf
except ImportError:  # Airflow < 3.2: the Task SDK has no configuration of its own yet
    from airflow.configuration import conf  # type: ignore[assignment,no-redef]

try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
except ImportError:  # Airflow < 3.2: only AirflowException is in the SDK, and the same class in core
    from airflow.exceptions import (  # type: ignore[assignment,no-redef,attr-defined]
        AirflowException,
        AirflowFailException,
        TaskDeferred,
    )

try:
    from airflow.sdk.bases.hook import BaseHook
except ImportError:  # Airflow 3.0: hooks were still core
    from airflow.hooks.base import BaseHook  # type: ignore[no-redef,assignment,attr-defined]

try:
    from airflow.sdk.plugins_manager import AirflowPlugin
except ImportError:  # Airflow < 3.2: plugins are declared against core's manager
    from airflow.plugins_manager import AirflowPlugin  # type: ignore[no-redef,assignment]


def storage_location(path: object) -> tuple[str | None, str, str]:
    """(connection id, bucket, key) of an ObjectStoragePath such as `s3://aws_default@bucket/a/b.png`.

    Airflow 3.2 added the `conn_id` property and strips the connection from `bucket`; 3.1 keeps the id
    only in `storage_options` and returns `aws_default@bucket` as the bucket, so an upload to S3 was
    refused by botocore ("Invalid bucket name") before it started.
    """
    options = getattr(path, "storage_options", None) or {}
    conn_id = options["conn_id"] if "conn_id" in options else getattr(path, "conn_id", None)
    bucket = str(getattr(path, "bucket", "")).rpartition("@")[2]
    return conn_id, bucket, str(getattr(path, "key", ""))


def secrets_masker_patterns() -> list[re.Pattern[str]]:
    """What Airflow's secrets maskers of this process hide (connection passwords, sensitive Variables,
    `mask_secret` values), as the compiled patterns they redact task logs with.

    Airflow exposes no public reader. The Task SDK's masker (`airflow.sdk._shared.secrets_masker`,
    3.1 and 3.3; `airflow.sdk.execution_time.secrets_masker` is a deprecated alias of it) is the one
    a task's `mask_secret` and connection loads feed; core keeps its own instance
    (`airflow._shared.secrets_masker`, configuration secrets). Each keeps a `replacer` regex of every
    pattern, None until something was masked; a release that renames them gives no patterns, never an
    error.
    """
    patterns = []
    for module in ("airflow.sdk._shared.secrets_masker", "airflow._shared.secrets_masker"):
        try:
            masker = importlib.import_module(module)._secrets_masker()
        except Exception:  # ImportError, or a masker that moved again
            continue
        replacer = getattr(masker, "replacer", None)
        if isinstance(replacer, re.Pattern):
            patterns.append(replacer)
    return patterns


__all__ = [
    "AirflowException",
    "AirflowFailException",
    "AirflowPlugin",
    "BaseHook",
    "TaskDeferred",
    "conf",
    "secrets_masker_patterns",
    "storage_location",
]
