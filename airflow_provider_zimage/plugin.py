"""The provider's Airflow plugin: the webhook receiver and the Images / spend views, on the API server.

One FastAPI app at `/zimage`: `POST /zimage/webhooks/{taskUUID}` (public, token-checked, see
`webhooks.app`) and the views below `/zimage/ui` (Airflow login and DAG permissions, see `ui.app`).
The UI draws them through `external_views` (Airflow >= 3.1):

* "Images" on every DAG run and "Z-Image images" on every task instance (`dag_run` / `task_instance`
  destinations): the run's (or the task's) images, cost and failed requests, read from the manifests;
* "Z-Image spend" in the navigation: images and cost per DAG per day, from the spend index.

Registration, as for providers in the Apache repository: `get_provider_info()["plugins"]` names
`ZImagePlugin` for Airflow's providers manager. Airflow loads plugins of providers only with
`[core] lazy_discover_providers = False`, so the `airflow.plugins` entry point covers the default; it
points at `ENTRY_POINT_PLUGIN`, which is the same class when the providers manager will not load it and
None (silently ignored by Airflow) when it will, so the plugin is registered exactly once either way and
`airflow plugins` never reports it as a duplicate.

Every Airflow process that loads plugins imports this module (workers and `dag.test()` included): it
imports FastAPI and nothing heavier; the views import Airflow core per request.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from airflow_provider_zimage.compat import AirflowPlugin
from airflow_provider_zimage.ui.app import create_app as create_views_app
from airflow_provider_zimage.ui.links import APP_PREFIX, RUN_VIEW_ROUTE, SPEND_VIEW_ROUTE, TI_VIEW_ROUTE
from airflow_provider_zimage.webhooks.app import create_app as create_webhook_app
from airflow_provider_zimage.webhooks.tokens import ROUTE_PREFIX

__all__ = ["ENTRY_POINT_PLUGIN", "ZImagePlugin", "create_app"]

_VIEWS_MOUNT = APP_PREFIX.removeprefix(ROUTE_PREFIX)  # "/ui"
# Relative to the UI's <base href> (the API server's base URL), so a deployment below a path works.
_VIEWS = APP_PREFIX.lstrip("/")


def create_app() -> FastAPI:
    """The webhook app with the views mounted below it (one prefix, `/zimage`, on the API server)."""
    app = create_webhook_app()
    app.mount(_VIEWS_MOUNT, create_views_app())
    return app


class ZImagePlugin(AirflowPlugin):
    """Webhooks (public) and the Images / spend views (behind Airflow's login) of the Z-Image provider."""

    name = "zimage"
    fastapi_apps: list[Any] = [
        {"app": create_app(), "url_prefix": ROUTE_PREFIX, "name": "Z-Image webhooks and image views"}
    ]
    external_views: list[Any] = [
        {
            "name": "Images",
            "href": _VIEWS + "/dags/{DAG_ID}/runs/{RUN_ID}",
            "destination": "dag_run",
            "url_route": RUN_VIEW_ROUTE,
        },
        {
            "name": "Z-Image images",
            "href": _VIEWS + "/dags/{DAG_ID}/runs/{RUN_ID}/tasks/{TASK_ID}?map_index={MAP_INDEX}",
            "destination": "task_instance",
            "url_route": TI_VIEW_ROUTE,
        },
        {
            "name": "Z-Image spend",
            "href": _VIEWS + "/spend",
            "destination": "nav",
            "category": "browse",
            "url_route": SPEND_VIEW_ROUTE,
        },
    ]


def _providers_manager_loads_plugins() -> bool:
    try:
        from airflow.configuration import conf
    except ImportError:  # pragma: no cover - Airflow core is always there where plugins are loaded
        return False
    return not conf.getboolean("core", "lazy_discover_providers", fallback=True)


ENTRY_POINT_PLUGIN: type[ZImagePlugin] | None = None if _providers_manager_loads_plugins() else ZImagePlugin
"""What the `airflow.plugins` entry point loads (see the module docstring)."""
