"""How the local backend says no: one `ZImageValidationError` naming every wire parameter it cannot honour.

The in-process backend raises it before loading anything; the executor service turns the same entries
into a Runware-style 400 (`code`, `message`, `parameter`), so both refuse with the same words.
"""

from __future__ import annotations

import json
import re
from typing import Any

from airflow_provider_zimage.exceptions import ZImageValidationError

__all__ = ["issue", "raise_issues"]

_URL_QUERY = re.compile(r"(?i)\b(https?://[^\s?#'\"]*)\?[^\s#'\"]*")


def issue(parameter: str, message: str, value: Any = None) -> dict[str, Any]:
    """One entry of `ZImageValidationError.errors`, safe to log: URL queries (presigned URLs and webhook
    tokens carry secrets there) are dropped and long values (base64 images) cut short."""
    if value is not None and not isinstance(value, (str, int, float, bool)):
        value = json.dumps(_plain(value), default=repr)
    if isinstance(value, str):
        value = _URL_QUERY.sub(r"\1?<redacted>", value)
        if len(value) > 80:
            value = f"{value[:60]}... ({len(value)} characters)"
    return {"parameter": parameter, "message": message, "value": value}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    return dump(by_alias=True, exclude_none=True, mode="json") if dump else value


def raise_issues(issues: list[dict[str, Any]]) -> None:
    if issues:
        detail = "; ".join(f"{i['parameter']}: {i['message']}" for i in issues)
        raise ZImageValidationError(f"The local Z-Image backend cannot run this request: {detail}", issues)
