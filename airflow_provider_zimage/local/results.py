"""What the local backend hands back: encoded images with Runware-shaped result items, and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow_provider_zimage.exceptions import LocalBackendUnavailable, LocalGenerationError

__all__ = ["GeneratedImage", "LocalBackendUnavailable", "LocalGenerationError"]


@dataclass(frozen=True)
class GeneratedImage:
    """One encoded image plus a result item shaped like Runware's, so callers store both backends alike."""

    result: dict[str, Any]
    data: bytes = field(repr=False)
    format: str

    @property
    def seed(self) -> int:
        return int(self.result["seed"])
