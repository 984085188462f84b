"""Deprecated: the local backend moved to `airflow_provider_zimage.local` (it never was a hook).

This shim keeps `from airflow_provider_zimage.hooks.local import LocalZImageExecutor` working for one
release; import from `airflow_provider_zimage.local` instead.
"""

from __future__ import annotations

import warnings

from airflow_provider_zimage.local import *  # noqa: F403
from airflow_provider_zimage.local import __all__  # noqa: F401

warnings.warn(
    "airflow_provider_zimage.hooks.local is deprecated; import from airflow_provider_zimage.local",
    DeprecationWarning,
    stacklevel=2,
)
