"""How results reach Airflow: the operators' `delivery` arguments, and the fields a request gets when sent.

Delivery options only change how results arrive, never which image is made: `webhookURL` and
`uploadEndpoint` are left out of the request fingerprint and the ledger, and they are added to the
request at send time, derived from the taskUUID the ledger chose, so a re-sent submission carries the
same webhook URL and the same upload key. A job is given a `DeliveryFields` value (what the operator
read from the connection and its arguments) and finishes each request with it, in `DeliveryFields.finish`
alone; the hook then sets `deliveryMethod`, and nothing else does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlsplit

from airflow_provider_zimage.compat import AirflowFailException, storage_location
from airflow_provider_zimage.redaction import query_secrets
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.storage.artifacts import normalize_format
from airflow_provider_zimage.webhooks.tokens import configured_secret, token_expiry, webhook_url

if TYPE_CHECKING:
    from airflow_provider_zimage.hooks.runware import ConnectionSettings

Delivery = Literal["polling", "webhook"]

# A presigned PUT outlives the task's timeout by this much: Runware may upload a little after the wait
# that asked for it has started counting.
PRESIGN_SLACK_S = 900.0
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
"""SigV4 presigned URLs cannot live longer than seven days."""


class Submitter(Protocol):
    """What a job sends through: `ZImageHook.submit` (which alone sets `deliveryMethod`)."""

    def submit(self, requests: Sequence[ImageInferenceRequest]) -> list[str]: ...


def check_delivery(delivery: str, webhook_grace_period: float, webhook_check_interval: float) -> None:
    """The delivery arguments both operators take, refused at DAG parse time, before anything is paid."""
    if delivery not in ("polling", "webhook"):
        raise ValueError(f"delivery must be 'polling' or 'webhook' (got {delivery!r})")
    if webhook_grace_period < 0:
        raise ValueError(f"webhook_grace_period must be >= 0 seconds (got {webhook_grace_period})")
    if webhook_check_interval <= 0:
        raise ValueError(f"webhook_check_interval must be > 0 seconds (got {webhook_check_interval})")


def webhook_delivery_settings(settings: ConnectionSettings, conn_id: str) -> tuple[str, str]:
    """The public base URL and the secret for delivery="webhook", or a failure naming what to set, before
    anything is paid (both operators)."""
    if not settings.webhook_base_url:
        raise AirflowFailException(
            f"delivery='webhook' needs the webhook_base_url extra of connection {conn_id!r}: "
            "the public URL of the Airflow API server, e.g. https://airflow.example.com"
        )
    parts = urlsplit(settings.webhook_base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise AirflowFailException(
            f"the webhook_base_url extra of connection {conn_id!r} must be an http(s) URL "
            f"without a query string (got {settings.webhook_base_url!r})"
        )
    secret = settings.webhook_secret or configured_secret()
    if not secret:
        raise AirflowFailException(
            f"delivery='webhook' needs a webhook secret: set the webhook_secret extra of connection "
            f"{conn_id!r} or [zimage] webhook_secret"
        )
    return settings.webhook_base_url, secret


def uploaded_object(directory: Any, output_format: str | None, task_uuid: str) -> Any:
    """Where Runware PUTs a task's image: named after the taskUUID (deterministic, so a retry that
    reattaches looks where the first try told Runware to put it), under the format asked for."""
    return directory / f"{task_uuid}.{normalize_format(output_format or 'JPG')}"


def presign_put(target: Any, expires_in: float) -> str:
    """A presigned PutObject URL for `target`, signed with the credentials of its Airflow connection.

    No Content-Type is signed: Runware does not document which one its PUT sends, and a signed one
    that differs makes S3 refuse the upload.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook  # the amazon provider is optional

    conn_id, bucket, key = storage_location(target)
    hook = S3Hook(aws_conn_id=conn_id)
    url = hook.get_conn().generate_presigned_url(
        ClientMethod="put_object",
        Params={"Bucket": bucket, "Key": key},
        ExpiresIn=int(max(60, min(MAX_PRESIGN_SECONDS, expires_in))),
    )
    return str(url)


@dataclass(frozen=True)
class Finished:
    """A request as sent, the credentials inside it (to mask and scrub), and where an upload goes."""

    request: ImageInferenceRequest
    credentials: tuple[str, ...] = ()
    upload_target: Any = None


@dataclass(frozen=True)
class DeliveryFields:
    """What a job adds to each request it sends, as values the operator read before anything was paid.

    :param conn_id: the connection the webhook token is signed for (the API server checks it with
        that connection's secret and files the item in that connection's part of the inbox).
    :param lifetime: the task's timeout in seconds: the webhook token expires, and the presigned PUT
        lapses, that long after the send (plus a margin).
    :param webhook_base_url: the public URL of the Airflow API server; None: no webhook.
    :param webhook_secret: the secret the per-task token is signed with.
    :param upload_directory: Runware PUTs the image under this ObjectStoragePath; None: no upload.
    """

    conn_id: str = ""
    lifetime: float = 3600.0
    webhook_base_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    upload_directory: Any = None

    def finish(self, request: ImageInferenceRequest) -> Finished:
        """`request` (carrying the ledger's taskUUID) with its webhook URL and upload endpoint."""
        update: dict[str, Any] = {}
        credentials: list[str] = []
        target = None
        if self.webhook_base_url is not None and self.webhook_secret is not None:
            expires = token_expiry(self.lifetime)
            url = webhook_url(
                self.webhook_base_url, request.task_uuid, self.webhook_secret, self.conn_id, expires=expires
            )
            credentials += query_secrets(url)
            update["webhook_url"] = url
        if self.upload_directory is not None:
            target = uploaded_object(self.upload_directory, request.output_format, request.task_uuid)
            url = presign_put(target, self.lifetime + PRESIGN_SLACK_S)
            credentials += query_secrets(url)
            update["upload_endpoint"] = url
        finished = request.model_copy(update=update) if update else request
        return Finished(finished, tuple(credentials), target)
