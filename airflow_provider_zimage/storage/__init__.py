"""Where bytes land: image artifacts and manifests (`artifacts`), and the day's spend (`spend`).

* `artifacts`  `ArtifactStore` on ObjectStoragePath: atomic writes, sha256, manifest.json; shared readers
* `spend`      the day's spend per connection, summed from manifests as they are written

0.2's `airflow_provider_zimage.storage` module is this package's `artifacts` now. Its names keep importing
from here for one release, with a DeprecationWarning (the package cannot be swapped for the module as
`_moved.py` swaps the other old paths, because the old path is the package's own name).
"""

from __future__ import annotations

import importlib
from typing import Any

from airflow_provider_zimage._moved import warn_moved

_SUBMODULES = frozenset({"artifacts", "spend"})


def __getattr__(name: str) -> Any:
    if name.startswith("__") or name in _SUBMODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Imported on first use only: `storage.spend` alone must not pull in the artifact store.
    artifacts = importlib.import_module(f"{__name__}.artifacts")
    try:
        value = getattr(artifacts, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    warn_moved(f"{__name__}.{name}", f"{artifacts.__name__}.{name}", stacklevel=3)
    return value
