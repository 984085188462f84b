"""What Airflow's ProvidersManager reads through the `apache_airflow_provider` entry point.

It must stay importable without Airflow, httpx or torch being imported: the connection form
(`CONN_FIELDS`) is rendered by the UI from this dictionary, without importing the hook.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_zimage._version import __version__

_INTEGRATION = "Z-Image"

LOCAL_DTYPES = ("auto", "bfloat16", "float32")
"""What the connection form offers for `dtype` (float16 overflows in Z-Image; an operator argument only)."""
LOCAL_DEVICES = ("auto", "cpu", "mps", "cuda", *(f"cuda:{i}" for i in range(8)))
"""What the connection form offers for `device`; an operator's `device=` takes any torch device string."""

# Connection form fields (Airflow 3 declarative `conn-fields`): rendered by the UI without importing
# the hook. Keys are read back from `Connection.extra_dejson` by `ZImageHook`.
CONN_FIELDS: dict[str, dict[str, Any]] = {
    "backend": {
        "label": "Backend",
        "description": "runware (the Runware API), executor (a zimage-executor at the base URL), local "
        "(diffusers on this worker's GPU) or openai_images (an OpenAI-compatible image server or router "
        "at the base URL: SGLang, vLLM-Omni).",
        "schema": {
            "type": ["string", "null"],
            "enum": ["runware", "executor", "local", "openai_images", None],
            "default": "runware",
        },
    },
    "timeout": {
        "label": "Request timeout (s)",
        "description": "Read timeout of one HTTP request to Runware.",
        "schema": {"type": ["number", "null"], "default": 60},
    },
    "connect_timeout": {
        "label": "Connect timeout (s)",
        "schema": {"type": ["number", "null"], "default": 10},
    },
    "max_retries": {
        "label": "Max retries",
        "description": "Retries of transient errors (429, 5xx, timeouts, dropped connections) per request.",
        "schema": {"type": ["integer", "null"], "default": 5},
    },
    "backoff_base": {
        "label": "Backoff base (s)",
        "description": "First retry delay; doubles each retry, with full jitter.",
        "schema": {"type": ["number", "null"], "default": 0.5},
    },
    "backoff_max": {
        "label": "Backoff cap (s)",
        "schema": {"type": ["number", "null"], "default": 30},
    },
    "webhook_secret": {
        "label": "Webhook secret",
        "description": "Signs the per-task token in webhook URLs (HMAC-SHA256).",
        "schema": {"type": ["string", "null"], "format": "password"},
    },
    "webhook_base_url": {
        "label": "Public base URL for webhooks",
        "description": "Where Runware can reach this Airflow API server, e.g. https://airflow.example.com",
        "schema": {"type": ["string", "null"]},
    },
    "served_model": {
        "label": "Served model name",
        "description": "backend=openai_images only: the model name the server knows (e.g. Z-Image-Turbo), "
        'or a JSON object {"z-image-turbo": "Z-Image-Turbo", ...}.',
        "schema": {"type": ["string", "null"]},
    },
    "model_path": {
        "label": "Local model (HF id or folder)",
        "description": "backend=local only: overrides the Hugging Face id of the requested model.",
        "schema": {"type": ["string", "null"]},
    },
    "dtype": {
        "label": "Local dtype",
        "description": "backend=local only: auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32.",
        "schema": {"type": ["string", "null"], "enum": [*LOCAL_DTYPES, None], "default": "auto"},
    },
    "cpu_offload": {
        "label": "Local CPU offload",
        "description": "backend=local only: offload idle components to CPU (for GPUs with little memory).",
        "schema": {"type": ["boolean", "null"], "default": False},
    },
    "device": {
        "label": "Local device",
        "description": "backend=local only: auto (cuda, then mps, then cpu), a CUDA device, mps or cpu.",
        "schema": {"type": ["string", "null"], "enum": [*LOCAL_DEVICES, None], "default": "auto"},
    },
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-zimage",
        "name": "Z-Image",
        "description": "Generate images with Z-Image, Z-Image-Turbo and TwinFlow Z-Image-Turbo "
        "on the Runware API or on local GPUs with diffusers.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": _INTEGRATION,
                "external-doc-url": "https://runware.ai/docs/models/alibaba-z-image-turbo",
                "tags": ["ai"],
            }
        ],
        "hooks": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": ["airflow_provider_zimage.hooks.runware"],
            }
        ],
        "operators": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": [
                    "airflow_provider_zimage.operators.generate",
                    "airflow_provider_zimage.operators.batch",
                ],
            }
        ],
        "sensors": [
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_provider_zimage.sensors.task"]}
        ],
        "triggers": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": [
                    "airflow_provider_zimage.triggers.task",
                    "airflow_provider_zimage.triggers.batch",
                ],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_zimage.hooks.runware.ZImageHook",
                "hook-name": "Z-Image (Runware / local)",
                "connection-type": "zimage",
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API key", "host": "Base URL"},
                    "placeholders": {"host": "https://api.runware.ai/v1", "password": "Runware API key"},
                },
                "conn-fields": CONN_FIELDS,
            }
        ],
        "extra-links": ["airflow_provider_zimage.operators.generate.ZImageImageLink"],
        # As Apache providers declare theirs; see airflow_provider_zimage.plugin for the entry point.
        "plugins": [{"name": "zimage", "plugin-class": "airflow_provider_zimage.plugin.ZImagePlugin"}],
        "config": {
            "zimage": {
                "description": "Defaults of the Z-Image provider.",
                "options": {
                    "output_path": {
                        "description": "Where images and manifests go (any ObjectStoragePath URL).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://aws_default@my-bucket/zimage",
                        "default": None,
                    },
                    "webhook_secret": {
                        "description": "Secret for webhook tokens when the connection has none.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "sensitive": True,
                        "example": None,
                        "default": None,
                    },
                    "local_input_roots": {
                        "description": "Comma-separated folders the local backend may read seed_image / "
                        "mask_image files from (default: output_path when it is a local folder, and the "
                        "DAGs folder).",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "/data/zimage-inputs,/opt/airflow/dags",
                        "default": None,
                    },
                    "local_input_origins": {
                        "description": "Comma-separated origins that the local backend may fetch "
                        "seed_image / mask_image URLs from, every redirect hop included; entries are "
                        "written as for allowed_image_hosts. Unset: none, so URL inputs are refused "
                        "(base64, data URIs and files under local_input_roots keep working). The "
                        "zimage-executor service takes --input-url-origin instead.",
                        "version_added": "0.3.0",
                        "type": "string",
                        "example": "images.example.com, http://minio.internal:9000",
                        "default": None,
                    },
                    "allowed_image_hosts": {
                        "description": "Comma-separated origins, besides https://im.runware.ai and the "
                        "connection's own origin (scheme, host and port of its base URL), that result images "
                        "may be downloaded from, every redirect hop included. An entry is host (https on 443 "
                        "only), host:port (https), or http(s)://host[:port]; a bare host never opens its "
                        "other ports or plain HTTP.",
                        "version_added": "0.2.0",
                        "type": "string",
                        "example": "images.example.com, http://minio.internal:9000",
                        "default": None,
                    },
                    "deferral_settle_seconds": {
                        "description": "Seconds a deferred task's trigger holds an early answer, so the "
                        "scheduler has processed the deferral first (apache/airflow#66374); 10 when unset.",
                        "version_added": "0.2.0",
                        "type": "float",
                        "example": "10",
                        "default": None,
                    },
                    "webhook_inbox": {
                        "description": "Where the webhook plugin stores accepted payloads.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://aws_default@my-bucket/zimage-inbox",
                        "default": None,
                    },
                    "webhook_inbox_ttl": {
                        "description": "Seconds after which the webhook plugin removes inbox items that "
                        "no task collected (late, replayed or unknown deliveries); at least 60, a day when "
                        "unset.",
                        "version_added": "0.3.0",
                        "type": "float",
                        "example": "86400",
                        "default": None,
                    },
                },
            }
        },
    }
