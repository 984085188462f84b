"""Module paths of 0.2 that moved into the concern packages keep importing for one release.

One table and one `sys.meta_path` finder instead of a shim file per old path: importing an old name
warns once (DeprecationWarning naming the new path) and gives the new module object itself, so
`isinstance` checks, pickles and stored classpaths that name an old path resolve to the same classes.
`airflow_provider_zimage.storage` is now a package itself: its old names are served by that package's
`__getattr__` (see `storage/__init__.py`), not by this finder.

Installed by `airflow_provider_zimage/__init__.py`; imports nothing of the package, so it costs nothing
to `get_provider_info()`. Remove in the release after next (with the table's entries).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

_PACKAGE = "airflow_provider_zimage"

MOVED: dict[str, str] = {
    f"{_PACKAGE}.models": f"{_PACKAGE}.runware.models",
    f"{_PACKAGE}.protocol": f"{_PACKAGE}.runware.protocol",
    f"{_PACKAGE}.outcomes": f"{_PACKAGE}.runware.outcomes",
    f"{_PACKAGE}.generation": f"{_PACKAGE}.jobs.generation",
    f"{_PACKAGE}.state": f"{_PACKAGE}.jobs.ledger",
    f"{_PACKAGE}.batch_state": f"{_PACKAGE}.jobs.batch_ledger",
    f"{_PACKAGE}.waiting": f"{_PACKAGE}.jobs.waiting",
    f"{_PACKAGE}.content_index": f"{_PACKAGE}.jobs.content_index",
    f"{_PACKAGE}.uploads": f"{_PACKAGE}.jobs.uploads",
    f"{_PACKAGE}.spend": f"{_PACKAGE}.storage.spend",
    f"{_PACKAGE}.inbox": f"{_PACKAGE}.webhooks.inbox",
}
"""Old module path -> new module path (0.2 -> 0.3). `storage` -> `storage.artifacts` is served by
`airflow_provider_zimage.storage.__getattr__`, because the old path is the new package's own name."""


def warn_moved(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(
        f"{old} moved to {new}; import it from there ({old} stops working in the next release)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and loads it as the new module: the import system returns whatever
    `sys.modules` holds under the name once `exec_module` ran, so the new module object is
    returned without its own `__spec__` or `__name__` being touched."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default: a placeholder that exec_module swaps for the new module

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        new = MOVED[old]
        # The frames between the importing line and here are the import system's own (importlib
        # frames are skipped by warnings only from 3.12), so point the warning at this module.
        warn_moved(old, new, stacklevel=2)
        sys.modules[old] = importlib.import_module(new)


_FINDER = _Alias()


def install() -> None:
    # First in line: a finder that maps the package to a folder (setuptools' editable installs, a stale
    # copy of 0.2) would otherwise find an old module file there and load a second, different copy.
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)
