"""The request of one image, from operator-style arguments: shared by both operators, checked once.

`ZImageGenerateOperator` takes the request parameters as its own arguments and
`ZImageBatchGenerateOperator` as the keys of each row; both build the request here, so a parameter is
validated, and a secret rendered into it refused, the same way on either path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow_provider_zimage.exceptions import ZImageValidationError
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.redaction import REDACTED, SecretValues, secret_paths
from airflow_provider_zimage.runware.models import ImageInferenceRequest
from airflow_provider_zimage.webhooks.tokens import configured_secret


def _rendered_number(value: Any, kind: type[int] | type[float]) -> Any:
    """Jinja renders `seed="{{ ds_nodash }}"` as the string "20260101"; the request models are strict
    about types, so a templated number is converted back here. Anything else is left for validation to
    refuse with the parameter named."""
    if not isinstance(value, str):
        return value
    try:
        return kind(value.strip())
    except ValueError:
        return value


# The operator arguments that make up one image request (the batch operator takes the same keys).
REQUEST_ARGUMENTS = (
    "prompt",
    "model",
    "negative_prompt",
    "width",
    "height",
    "seed",
    "steps",
    "scheduler",
    "cfg_scale",
    "strength",
    "mask_margin",
    "seed_image",
    "mask_image",
    "outpaint",
    "lora",
    "control_net",
    "ultralytics",
    "number_results",
    "output_type",
    "output_format",
    "output_quality",
    "safety",
    "ttl",
    "include_cost",
    "acceleration",
    "accelerator_options",
    "upload_endpoint",
)


# Operator arguments whose wire name is not their field's alias (see `refuse_secrets`).
_WIRE_NAMES = {"prompt": "positivePrompt", "seed_image": "inputs.seedImage", "mask_image": "inputs.maskImage"}


def known_secrets(conn_id: str) -> list[str | None]:
    """The credentials a task of `conn_id` can reach besides what Airflow's secrets masker holds: the
    connection's password (Runware key or executor token) and secret extras, and `[zimage]
    webhook_secret`. A connection that cannot be read (a local run) leaves the configured secret."""
    secrets: list[str | None] = [configured_secret()]
    try:
        secrets += ZImageHook(conn_id).settings.secrets
    except Exception:  # AirflowNotFoundException and friends: the operator reports it where it needs one
        pass
    return secrets


def row_secrets(conn_id: str) -> SecretValues:
    """`known_secrets` sifted once for all the rows of a batch (see `SecretValues`)."""
    return SecretValues.of(known_secrets(conn_id))


def refuse_secrets(args: Mapping[str, Any], secrets: Sequence[str | None] = ()) -> None:
    """Refuse a request argument holding a known secret, before it is validated, sent or stored.

    Airflow renders Jinja inside mapped values and batch rows, so a table cell
    `{{ conn.zimage_default.password }}` becomes the API key in a prompt; Runware, the manifest and the
    Images tab would get it in clear (only the task log is masked). Checked before building, so not
    even a validation error quotes it. `upload_endpoint` is a credential-bearing URL by design
    (presigned), meant for Runware, and recorded without its query.
    """
    fields = ImageInferenceRequest.model_fields
    by_wire_name: dict[str, Any] = {}
    for name, value in args.items():
        if name in REQUEST_ARGUMENTS and name != "upload_endpoint":
            field = fields.get(name)
            by_wire_name[_WIRE_NAMES.get(name) or (field.alias if field and field.alias else name)] = value
    named = secret_paths(by_wire_name, secrets)
    if not named:
        return
    raise ZImageValidationError(
        f"refused: {', '.join(named)} {'holds' if len(named) == 1 else 'hold'} a known secret (a connection "
        "password or secret extra, a webhook secret, or a value Airflow's secrets masker hides), which "
        "would be sent to Runware and "
        "shown in the manifest and the Images tab. A templated value was probably rendered: wrap data "
        "that is not a template in airflow.sdk.literal() (docs/troubleshooting.md)",
        [{"parameter": p, "message": "holds a known secret", "value": REDACTED} for p in named],
    )


def build_image_request(args: Mapping[str, Any], secrets: Sequence[str | None] = ()) -> ImageInferenceRequest:
    """The validated request from operator-style arguments (`prompt`, `seed_image`, ...), written once for
    `ZImageGenerateOperator` and every request of `ZImageBatchGenerateOperator`.

    An argument holding one of `secrets` or a value Airflow's secrets masker holds is refused first
    (`refuse_secrets`)."""
    refuse_secrets(args, secrets)
    inputs = {k: v for k in ("seed_image", "mask_image") if (v := args.get(k))}
    fields: dict[str, Any] = {
        "model": args.get("model"),
        "positive_prompt": args.get("prompt"),
        "negative_prompt": args.get("negative_prompt"),
        "width": _rendered_number(args.get("width"), int),
        "height": _rendered_number(args.get("height"), int),
        "seed": _rendered_number(args.get("seed"), int),
        "steps": _rendered_number(args.get("steps"), int),
        "scheduler": args.get("scheduler"),
        "cfg_scale": _rendered_number(args.get("cfg_scale"), float),
        "strength": args.get("strength"),
        "mask_margin": args.get("mask_margin"),
        "inputs": inputs or None,
        "outpaint": args.get("outpaint"),
        "lora": args.get("lora"),
        "control_net": args.get("control_net"),
        "ultralytics": args.get("ultralytics"),
        "number_results": args.get("number_results"),
        "output_type": args.get("output_type"),
        "output_format": args.get("output_format"),
        "output_quality": args.get("output_quality"),
        "safety": args.get("safety"),
        "ttl": args.get("ttl"),
        "include_cost": args.get("include_cost"),
        "acceleration": args.get("acceleration"),
        "accelerator_options": args.get("accelerator_options"),
        "upload_endpoint": args.get("upload_endpoint"),
    }
    return ImageInferenceRequest.build(**{k: v for k, v in fields.items() if v is not None})
