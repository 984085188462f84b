"""The Airflow plugin that mounts the webhook app on the API server at `/zimage`.

Registered through the `airflow.plugins` entry point, so every Airflow process that loads plugins
imports this module (workers and `dag.test()` included): it imports FastAPI and nothing heavier.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_zimage.compat import AirflowPlugin
from airflow_provider_zimage.webhooks.app import create_app
from airflow_provider_zimage.webhooks.tokens import ROUTE_PREFIX


class ZImageWebhookPlugin(AirflowPlugin):
    """Serves `POST /zimage/webhooks/{taskUUID}?token=...` (see `webhooks.app`)."""

    name = "zimage_webhooks"
    fastapi_apps: list[Any] = [
        {"app": create_app(), "url_prefix": ROUTE_PREFIX, "name": "Z-Image Runware webhooks"}
    ]
