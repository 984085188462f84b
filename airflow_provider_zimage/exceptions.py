"""Typed errors, so callers decide between failing, retrying and reattaching without parsing text.

The split that matters to money: a *permanent* error means Runware refused the request and re-sending it
would be refused again (fail the task, no retries); a *transient* error means nothing is known to be wrong
with the request (retry with backoff; Airflow's own retries apply once ours are spent).
"""

from __future__ import annotations

from typing import Any


class ZImageError(Exception):
    """Base class for every error this provider raises on purpose."""


class ZImageValidationError(ZImageError, ValueError):
    """A request broke a rule of the API or of the chosen model; raised before any network call.

    `errors` keeps one entry per offending parameter, named as on the wire (`CFGScale`, `width`):
    `parameter`, `message`, `value`, and `code` (`missingParameter`, `unsupportedParameter`) when the
    mistake is not a bad value.
    """

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []

    @property
    def parameters(self) -> list[str]:
        return [e["parameter"] for e in self.errors if e.get("parameter")]


class ZImageAPIError(ZImageError):
    """An error answer from the API: HTTP status plus the first error item of the body."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        parameter: str | None = None,
        task_uuid: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.parameter = parameter
        self.task_uuid = task_uuid
        self.retry_after = retry_after


class ZImagePermanentError(ZImageAPIError):
    """400, 401, 402, 403 and task-level refusals: sending the same request again cannot succeed."""


class ZImageAuthError(ZImagePermanentError):
    """401/403: the API key is missing, wrong or lacks permission."""


class ZImageInsufficientCreditsError(ZImagePermanentError):
    """402: the account balance cannot pay for the request."""


class ZImageTransientError(ZImageAPIError):
    """429, 5xx, timeouts and dropped connections: the same request may succeed later."""


class ZImageTaskFailed(ZImagePermanentError):
    """Runware accepted the task but reported it failed (status `error`, NSFW refusal, upload failure)."""


class ZImageTimeout(ZImageError):
    """Waiting for a task outlived the caller's deadline; the task may still finish at Runware."""


class ZImageConflictError(ZImagePermanentError):
    """Runware already holds these taskUUIDs: after a lost answer this means the first submission landed."""

    def __init__(self, message: str, task_uuids: list[str], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.task_uuids = task_uuids


class ZImageTaskNotFound(ZImagePermanentError):
    """getResponse does not know the taskUUID: it never landed, or it expired at Runware."""


class ZImageStorageError(ZImageError):
    """Refused or unreadable artifact: bad image bytes, wrong format or size, unusable name, bad JSON.

    Raised before anything is written when the input is at fault, so a failed call leaves storage as
    it was.
    """


class ForeignTaskError(ValueError):
    """A webhook body names another task than its URL: its token was issued for the URL's task only."""


class LocalBackendUnavailable(ZImageError, ImportError):
    """torch/diffusers are missing or too old; an ImportError so `except ImportError` callers still work."""


class LocalGenerationError(ZImageError):
    """The pipeline ran but produced no usable image (NaN or all-black output). Retrying will not help."""


class UploadFailed(ZImageError):
    """`zimage-executor` could not PUT an image to a request's `uploadEndpoint`: the task ends with
    Runware's `uploadFailed` for that image."""

    def __init__(self, message: str, image_uuid: str) -> None:
        super().__init__(message)
        self.image_uuid = image_uuid


class RequestTooLarge(ZImageError):
    """An HTTP request body over the server's limit (`executor.transport`): answered 413, then closed."""


class NotServed(LookupError):
    """A requested file the UI does not serve (outside the output folder, not an image, malformed)."""
