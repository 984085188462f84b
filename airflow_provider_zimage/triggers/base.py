"""What the provider's triggers share: `serialize()` is exactly the constructor's keyword arguments.

The triggerer re-creates a deferred task's trigger from the row `serialize()` wrote to the metadata DB
(classpath and kwargs), after a restart or an upgrade. Reading the kwargs from the constructor's own
keyword-only parameters (each stored under its name) leaves no second list to keep in step with it;
the classpath is the class's own module, so moving a trigger class changes what is stored and
tests/test_trigger_serialization.py fails.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from airflow.triggers.base import BaseTrigger


@cache
def _init_parameters(cls: type) -> tuple[str, ...]:
    parameters = inspect.signature(cls).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


class ZImageBaseTrigger(BaseTrigger):
    """A trigger whose keyword-only constructor arguments are attributes of the same names."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        cls = type(self)
        return (
            f"{cls.__module__}.{cls.__qualname__}",
            {name: getattr(self, name) for name in _init_parameters(cls)},
        )
