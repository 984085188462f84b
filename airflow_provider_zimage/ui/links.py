"""Where the Images tabs are, in the Airflow UI and in the plugin app.

Kept free of FastAPI and of Airflow core so the operator's extra link can build them on a worker.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

__all__ = [
    "APP_PREFIX",
    "RUN_VIEW_ROUTE",
    "SPEND_VIEW_ROUTE",
    "TI_VIEW_ROUTE",
    "images_tab_url",
    "ui_base_url",
]

APP_PREFIX = "/zimage/ui"
"""Mount point of the views on the API server (below the webhook app at `/zimage`)."""

RUN_VIEW_ROUTE = "zimage-images"
TI_VIEW_ROUTE = "zimage-task-images"
SPEND_VIEW_ROUTE = "zimage-spend"


def _q(value: str) -> str:
    return quote(value, safe="")


def ui_base_url() -> str:
    """`[api] base_url` without its trailing slash, or "" (links then stay root-relative, same origin).

    The Airflow UI draws an extra link only when it is http(s) or same-origin, so a root-relative path
    works on any single-host deployment and an absolute one behind a proxy that sets `base_url`.
    """
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # early Airflow 3 releases have no SDK configuration module
        from airflow.configuration import conf  # type: ignore[no-redef]
    value = conf.get("api", "base_url", fallback=None)
    return value.strip().rstrip("/") if isinstance(value, str) else ""


def images_tab_url(
    dag_id: str,
    run_id: str,
    task_id: str | None = None,
    map_index: int | None = -1,
    *,
    base_url: str | None = None,
    same_origin: bool = False,
) -> str:
    """The Airflow UI page of a run's Images tab, or of a task instance's when `task_id` is given.

    `same_origin` keeps only the path of the base URL: what the operator's extra link needs, because
    Airflow stores that link when the task ends and the UI resolves a path against the origin it is
    served from, so a host or port that changes later (a proxy, `make demo-ui` on another port) never
    leaves a stale link behind.
    """
    base = ui_base_url() if base_url is None else base_url.rstrip("/")
    if same_origin:
        base = urlsplit(base).path.rstrip("/")
    url = f"{base}/dags/{_q(dag_id)}/runs/{_q(run_id)}"
    if task_id is None:
        return f"{url}/plugin/{RUN_VIEW_ROUTE}"
    url += f"/tasks/{_q(task_id)}"
    if map_index is not None and map_index >= 0:
        url += f"/mapped/{int(map_index)}"
    return f"{url}/plugin/{TI_VIEW_ROUTE}"
