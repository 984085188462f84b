"""The views' FastAPI app, mounted by the plugin at `/zimage/ui` on the Airflow API server.

Every route needs the caller to be logged in to Airflow (the same JWT the UI holds in its `_token`
cookie, or an `Authorization: Bearer` header) and, for anything of a DAG, the auth manager's read
permission on that DAG's task instances: a user who cannot see a DAG cannot see its images either. An
anonymous request gets 401, a forbidden one 403. Only the webhook route (`/zimage/webhooks/...`, a
different app) is public.

Airflow core is imported inside the functions: the plugin module is imported by every Airflow process
(workers included), and only the API server ever calls these.

Routes are plain `def` where they touch storage: FastAPI runs them in its thread pool, which keeps
blocking object-storage calls off the event loop (the S3 filesystem factory refuses to run inside one).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from airflow_provider_zimage.storage.artifacts import ArtifactStore, default_output_path
from airflow_provider_zimage.storage.spend import read_spend
from airflow_provider_zimage.ui.gallery import IMAGE_TYPES, NotServed, image_path, read_run
from airflow_provider_zimage.ui.links import ui_base_url
from airflow_provider_zimage.ui.pages import error_page, run_page, spend_page
from airflow_provider_zimage.ui.thumbnails import thumbnail

log = logging.getLogger(__name__)

__all__ = ["PER_PAGE", "create_app"]

PER_PAGE = 100
MAX_PER_PAGE = 500
SPEND_DAYS = 30
_NO_STORE = {"Cache-Control": "no-store"}
_PRIVATE = {"Cache-Control": "private, max-age=3600"}


# -- who is asking -------------------------------------------------------------------------------------


async def current_user(request: Request) -> Any:
    """The Airflow user of this request, resolved the way the API server's own routes do (`get_user`).

    An explicit bearer token wins over the cookie; a user the API server's trusted JWT middleware
    already resolved is reused. Anything else is a 401 (no token) or 403 (invalid token) from Airflow.
    """
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN
    from airflow.api_fastapi.core_api import security

    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return await security.resolve_user_from_token(credentials.strip())
    marker = getattr(security, "USER_INJECTED_BY_TRUSTED_MIDDLEWARE", None)
    user = getattr(request.state, "user", None)
    via = getattr(request.state, "user_authenticated_via", None)
    if user is not None and marker is not None and via is marker:
        return user
    return await security.resolve_user_from_token(request.cookies.get(COOKIE_NAME_JWT_TOKEN))


def may_read_dag(user: Any, dag_id: str) -> bool:
    """Whether the auth manager lets `user` read the task instances (and so the images) of `dag_id`."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    team_name = None
    try:
        from airflow.models.dag import DagModel

        if hasattr(DagModel, "get_team_name"):
            team_name = DagModel.get_team_name(dag_id)
    except Exception:  # multi-team lookups need the metadata DB; without teams there is nothing to look up
        team_name = None
    return bool(
        get_auth_manager().is_authorized_dag(
            method="GET",
            access_entity=DagAccessEntity.TASK_INSTANCE,
            details=DagDetails(id=dag_id, team_name=team_name),
            user=user,
        )
    )


User = Annotated[Any, Depends(current_user)]


async def dag_reader(request: Request, user: User) -> str:
    """The path's `dag_id`, once the caller is known to be allowed to read it."""
    dag_id: str = request.path_params["dag_id"]
    if not await asyncio.to_thread(may_read_dag, user, dag_id):
        raise HTTPException(status_code=403, detail=f"not allowed to read DAG {dag_id!r}")
    return dag_id


ReadableDag = Annotated[str, Depends(dag_reader)]


# -- helpers ----------------------------------------------------------------------------------------------


def _store() -> Any:
    return ArtifactStore(default_output_path())


def _prefix(request: Request) -> str:
    """This app's path as the browser sees it (mount points included), for links that survive proxies."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _run_url(request: Request, dag_id: str, run_id: str) -> str:
    from urllib.parse import quote

    return f"{_prefix(request)}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def _map_index(raw: str | None) -> int | None:
    """`{MAP_INDEX}` as the UI fills it in: a number, or left literal when the view has none."""
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _file(dag_id: str, run_id: str, task: str, index: str, name: str, *, thumb: bool) -> Response:
    try:
        path = image_path(_store(), dag_id, run_id, task, index, name)
    except NotServed as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    try:
        if thumb:
            return Response(thumbnail(path), media_type="image/jpeg", headers=_PRIVATE)
        data = bytes(path.fs.cat_file(path.path))
    except FileNotFoundError:
        raise HTTPException(status_code=404, detail=f"{name!r} is not stored for this run") from None
    return Response(data, media_type=IMAGE_TYPES[name.rsplit(".", 1)[-1].lower()], headers=_PRIVATE)


async def _refusal(request: Request, exc: Exception) -> Response:
    """A 401/403/404 as the page the tab's iframe shows; the `.json` routes keep FastAPI's JSON answer.

    Only the status and the exception's own message are shown (escaped): Airflow's and this app's
    messages name the DAG or file, never a token or a stack.
    """
    from fastapi.exception_handlers import http_exception_handler

    if not isinstance(exc, StarletteHTTPException):  # registered for that class only
        raise exc
    if request.url.path.endswith(".json"):
        return await http_exception_handler(request, exc)
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    headers = {**(exc.headers or {}), **_NO_STORE}
    return HTMLResponse(error_page(exc.status_code, message), status_code=exc.status_code, headers=headers)


# -- the app -------------------------------------------------------------------------------------------------


def create_app() -> FastAPI:
    """The views; see the module docstring for who may call them."""
    app = FastAPI(title="Z-Image views", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(StarletteHTTPException, _refusal)

    @app.get("/dags/{dag_id}/runs/{run_id}", response_class=HTMLResponse)
    def run_images(
        request: Request,
        dag_id: ReadableDag,
        run_id: str,
        page: Annotated[int, Query(ge=1)] = 1,
        per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = PER_PAGE,
    ) -> HTMLResponse:
        run = read_run(_store(), dag_id, run_id)
        files = _run_url(request, dag_id, run_id)
        html = run_page(run, files=files, here=files, page=page, per_page=per_page, scope=f"run {run_id}")
        return HTMLResponse(html, headers=_NO_STORE)

    @app.get("/dags/{dag_id}/runs/{run_id}/tasks/{task_id}", response_class=HTMLResponse)
    def task_images(
        request: Request,
        dag_id: ReadableDag,
        run_id: str,
        task_id: str,
        map_index: str | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
        per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE)] = PER_PAGE,
    ) -> HTMLResponse:
        from urllib.parse import quote

        index = _map_index(map_index)
        run = read_run(_store(), dag_id, run_id, task_id=task_id, map_index=index)
        files = _run_url(request, dag_id, run_id)
        here = f"{files}/tasks/{quote(task_id, safe='')}"
        mapped = index is not None and index >= 0
        scope = f"task {task_id}[{index}]" if mapped else f"task {task_id}"
        html = run_page(
            run,
            files=files,
            here=here,
            page=page,
            per_page=per_page,
            scope=scope,
            all_url=here if mapped else None,
            query={"map_index": index} if mapped else None,
        )
        return HTMLResponse(html, headers=_NO_STORE)

    @app.get("/dags/{dag_id}/runs/{run_id}/summary.json")
    def run_summary(dag_id: ReadableDag, run_id: str, task_id: str | None = None) -> JSONResponse:
        """The header of the Images tab as data: count, total cost, failures."""
        run = read_run(_store(), dag_id, run_id, task_id=task_id)
        return JSONResponse(
            {
                "dag_id": dag_id,
                "run_id": run_id,
                "images": run.count,
                "manifests": run.manifests,
                "total_cost": run.total_cost,
                "failed": [f.__dict__ for f in run.failures],
                "skipped_nsfw": run.skipped_nsfw,
            },
            headers=_NO_STORE,
        )

    @app.get("/dags/{dag_id}/runs/{run_id}/images/{task}/{index}/{name}")
    def full_image(dag_id: ReadableDag, run_id: str, task: str, index: str, name: str) -> Response:
        return _file(dag_id, run_id, task, index, name, thumb=False)

    @app.get("/dags/{dag_id}/runs/{run_id}/thumbnails/{task}/{index}/{name}")
    def thumbnail_image(dag_id: ReadableDag, run_id: str, task: str, index: str, name: str) -> Response:
        return _file(dag_id, run_id, task, index, name, thumb=True)

    def _readable_spend(user: Any, days: int) -> list[Any]:
        rows = read_spend(_store().base, days=days)
        allowed = {dag_id: may_read_dag(user, dag_id) for dag_id in {r.dag_id for r in rows}}
        return [r for r in rows if allowed[r.dag_id]]

    @app.get("/spend", response_class=HTMLResponse)
    def spend(user: User, days: Annotated[int, Query(ge=1, le=366)] = SPEND_DAYS) -> HTMLResponse:
        rows = _readable_spend(user, days)
        return HTMLResponse(spend_page(rows, days=days, ui_base=ui_base_url()), headers=_NO_STORE)

    @app.get("/spend.json")
    def spend_json(user: User, days: Annotated[int, Query(ge=1, le=366)] = SPEND_DAYS) -> JSONResponse:
        return JSONResponse([r.__dict__ for r in _readable_spend(user, days)], headers=_NO_STORE)

    return app
