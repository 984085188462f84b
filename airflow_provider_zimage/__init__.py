"""Apache Airflow provider for the Z-Image model family (Runware API or local diffusers).

`get_provider_info()` (in `get_provider_info.py`) is what Airflow's ProvidersManager reads through the
`apache_airflow_provider` entry point; it must stay importable without Airflow, httpx or torch being
imported, and so must this module.
"""

from __future__ import annotations

from airflow_provider_zimage import _moved

__version__ = "0.1.0"

_moved.install()  # 0.2's module paths (models, state, storage...) keep importing for one release

# Defined after __version__, which get_provider_info reads.
from airflow_provider_zimage.get_provider_info import (  # noqa: E402
    CONN_FIELDS,
    LOCAL_DEVICES,
    LOCAL_DTYPES,
    get_provider_info,
)

__all__ = ["CONN_FIELDS", "LOCAL_DEVICES", "LOCAL_DTYPES", "__version__", "get_provider_info"]
