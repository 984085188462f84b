"""The `[zimage]` section of Airflow's configuration: the one module that reads it.

One typed accessor per option, with its default, parsing and validation, so an option means the same
to the operator, the trigger, the webhook plugin and the local backend, and a new one is declared in
`get_provider_info()` and read here and nowhere else (tests/test_architecture.py checks both). Each
call reads Airflow's configuration again: tests and workers that set `AIRFLOW__ZIMAGE__*` late are
honoured.

Importing this module imports no Airflow: the local backend and the `zimage-executor` service use
modules that import it, and they run without Airflow's configuration (see `_option`).
"""

from __future__ import annotations

import math
from urllib.parse import unquote, urlparse

SECTION = "zimage"

DEFAULT_DEFERRAL_SETTLE_S = 10.0
"""Seconds a deferred task's trigger holds an early answer (apache/airflow#66374)."""
DEFAULT_INBOX_TTL = 86400.0
"""A day: far longer than a delivery waits for its trigger, short enough that junk does not pile up."""
MIN_INBOX_TTL = 60.0

__all__ = [
    "DEFAULT_DEFERRAL_SETTLE_S",
    "DEFAULT_INBOX_TTL",
    "SECTION",
    "allowed_image_hosts",
    "deferral_settle_seconds",
    "local_input_origins",
    "local_input_roots",
    "local_weights_roots",
    "output_path",
    "webhook_inbox",
    "webhook_inbox_ttl",
    "webhook_secret",
]


def _read(section: str, key: str) -> str | None:
    """A configured value without surrounding blanks; None when unset or blank."""
    # why: Airflow's configuration is loaded on first use, not when the executor service imports us.
    from airflow_provider_zimage.compat import conf

    value = conf.get(section, key, fallback=None)
    return (value.strip() or None) if isinstance(value, str) else None


def _option(key: str) -> str | None:
    """`[zimage] key`; every read of the section goes through here (the architecture test counts them)."""
    return _read(SECTION, key)


def _seconds(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"[zimage] {key} must be a number of seconds (got {value!r})") from None


def _listed(value: str | None) -> list[str]:
    return [entry.strip() for entry in (value or "").split(",") if entry.strip()]


def output_path() -> str | None:
    """`[zimage] output_path`: where images and manifests go (an ObjectStoragePath URL or a folder).

    None when unset: `storage.default_output_path()` then uses a folder under AIRFLOW_HOME.
    """
    return _option("output_path")


def webhook_secret() -> str | None:
    """`[zimage] webhook_secret`: signs webhook tokens for connections without a `webhook_secret` extra."""
    return _option("webhook_secret")


def webhook_inbox() -> str | None:
    """`[zimage] webhook_inbox`: where the webhook plugin stores accepted payloads.

    None when unset: `inbox.default_inbox_path()` then uses a folder under AIRFLOW_HOME.
    """
    return _option("webhook_inbox")


def webhook_inbox_ttl() -> float:
    """`[zimage] webhook_inbox_ttl` in seconds (default a day).

    :raises ValueError: naming the option, for a value that is not a number of seconds of at least 60.
    """
    configured = _option("webhook_inbox_ttl")
    if not configured:
        return DEFAULT_INBOX_TTL
    try:
        ttl = float(configured)
    except ValueError:
        ttl = -1.0
    if not ttl >= MIN_INBOX_TTL:  # also refuses NaN
        raise ValueError(f"[zimage] webhook_inbox_ttl must be a number of seconds >= 60 (got {configured!r})")
    return ttl


def allowed_image_hosts() -> list[str]:
    """`[zimage] allowed_image_hosts`: the comma-separated entries, as written.

    Each entry is parsed (and refused when it cannot be read) by `hooks.runware.allowed_image_origins`,
    which raises the error a task shows.
    """
    return _listed(_option("allowed_image_hosts"))


def local_input_origins() -> list[str]:
    """`[zimage] local_input_origins`: the comma-separated origins the in-process local backend may fetch
    `seedImage` / `maskImage` URLs from, as written (unset: none). Parsed by `origins.parse_origins`."""
    return _listed(_option("local_input_origins"))


def deferral_settle_seconds() -> float:
    """`[zimage] deferral_settle_seconds`: how long a deferred trigger holds a fast answer (default 10;
    a negative value means 0).

    :raises ValueError: naming the option, for a value that is not a number.
    """
    configured = _option("deferral_settle_seconds")
    if configured is None:
        return DEFAULT_DEFERRAL_SETTLE_S
    seconds = _seconds("deferral_settle_seconds", configured)
    return 0.0 if math.isnan(seconds) else max(0.0, seconds)


def local_input_roots() -> list[str]:
    """`[zimage] local_input_roots` (comma-separated), else the local output path and the DAGs folder:
    the folders the in-process local backend may read `seedImage` / `maskImage` files from."""
    configured = _option("local_input_roots")
    if configured:
        return _listed(configured)
    roots = []
    output = output_path()
    if output and (output.startswith("file://") or "://" not in output):
        roots.append(unquote(urlparse(output).path) if output.startswith("file://") else output)
    dags = _read("core", "dags_folder")
    if dags:
        roots.append(dags)
    return roots


def local_weights_roots() -> list[str]:
    """`[zimage] local_weights_roots` (comma-separated), else `local_input_roots()`: the folders the LoRA
    and ControlNet weights a `zimage` connection maps (`lora_paths`, `controlnet_paths`) and the `file:`
    LoRAs a request names may be in, in-process (the executor's `--lora-root`). Deployment
    configuration: a connection edited in the UI cannot widen it."""
    configured = _option("local_weights_roots")
    return _listed(configured) if configured else local_input_roots()
