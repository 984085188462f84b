"""Apache Airflow provider for the Z-Image model family (Runware API or local diffusers).

`get_provider_info()` (in `get_provider_info.py`) is what Airflow's ProvidersManager reads through the
`apache_airflow_provider` entry point; it must stay importable without Airflow, httpx or torch being
imported, and so must this module.
"""

from __future__ import annotations

from airflow_provider_zimage import _moved
from airflow_provider_zimage._version import __version__
from airflow_provider_zimage.get_provider_info import (
    CONN_FIELDS,
    LOCAL_DEVICES,
    LOCAL_DTYPES,
    get_provider_info,
)

_moved.install()  # 0.2's module paths (models, state, storage...) keep importing for one release

__all__ = ["CONN_FIELDS", "LOCAL_DEVICES", "LOCAL_DTYPES", "__version__", "get_provider_info"]
