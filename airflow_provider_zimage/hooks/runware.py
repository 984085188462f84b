"""Transport to the Runware API: the only place that reads the API key or opens HTTP connections.

Request building and answer parsing live in `protocol`; this module only moves bytes. The sync methods
(`infer`, `submit`, `get_response`, `download`) serve workers; their `a`-prefixed twins serve the
triggerer's event loop and share one `httpx.AsyncClient` per loop, so a thousand deferred tasks do not
open a thousand connection pools.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import httpx

from airflow_provider_zimage import config, get_provider_info
from airflow_provider_zimage.compat import BaseHook
from airflow_provider_zimage.exceptions import (
    ZImageAPIError,
    ZImageAuthError,
    ZImageConflictError,
    ZImageError,
    ZImagePermanentError,
    ZImageTaskFailed,
    ZImageTransientError,
)
from airflow_provider_zimage.origins import (
    DEFAULT_PORTS,
    MAX_REDIRECTS,
    ImageOrigin,
    check_image_url,
    parse_origins,
)
from airflow_provider_zimage.redaction import connection_extras, mask_credentials, redact, without_query
from airflow_provider_zimage.runware import protocol
from airflow_provider_zimage.runware.models import ImageInferenceRequest, ImageResult
from airflow_provider_zimage.runware.protocol import RetryPolicy, RunwareResponse, TaskStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionSettings:
    """What a `zimage` connection holds, resolved once. The API key never appears in its repr."""

    base_url: str = protocol.DEFAULT_BASE_URL
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    connect_timeout: float = 10.0
    retry: RetryPolicy = RetryPolicy()
    # "runware", "local" (in-process diffusers), "executor" (zimage-executor) or "openai_images" (an
    # OpenAI-compatible image server: SGLang, vLLM-Omni, a router in front of them)
    backend: str = "runware"
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_base_url: str | None = None
    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cpu_offload: bool = False
    # backend=openai_images: the model name the server knows (a string) or {model: served name}
    served_model: Any = None
    # backend=local: AIR id -> local weights, as written (JSON text or an object); `local.weight_maps`
    # checks them when a task runs, naming the extra
    lora_paths: Any = None
    controlnet_paths: Any = None

    # Set when the connection's host had no scheme and https:// was assumed: said in transport errors.
    assumed_scheme: bool = False

    @property
    def secrets(self) -> tuple[str | None, ...]:
        return (self.api_key, self.webhook_secret)

    @property
    def scheme_hint(self) -> str:
        if not self.assumed_scheme:
            return ""
        return (
            "; the connection host has no scheme, so https:// was assumed: write http://... if the "
            "server speaks plain HTTP"
        )

    @classmethod
    def from_connection(cls, conn: Any) -> ConnectionSettings:
        extra = connection_extras(conn)
        # Airflow < 3.2 UIs store form fields with an `extra__zimage__` prefix.
        for key in list(extra):
            if key.startswith("extra__zimage__"):
                extra.setdefault(key.removeprefix("extra__zimage__"), extra.pop(key))
        # The extras that are credentials; Airflow has masked the password already.
        mask_credentials(extra.get("api_key"), extra.get("webhook_secret"))

        def num(name: str, default: float) -> float:
            value = extra.get(name)
            return default if value in (None, "") else float(value)

        retry = RetryPolicy(
            max_retries=int(num("max_retries", RetryPolicy.max_retries)),
            base_delay=num("backoff_base", RetryPolicy.base_delay),
            max_delay=num("backoff_max", RetryPolicy.max_delay),
        )
        base_url = _base_url(conn, extra)
        return cls(
            base_url=base_url,
            assumed_scheme=bool((conn.host or "").strip())
            and "://" not in conn.host
            and not extra.get("base_url"),
            api_key=conn.password or extra.get("api_key") or None,
            timeout=num("timeout", 60.0),
            connect_timeout=num("connect_timeout", 10.0),
            retry=retry,
            backend=(extra.get("backend") or "runware").lower(),
            webhook_secret=extra.get("webhook_secret") or None,
            webhook_base_url=extra.get("webhook_base_url") or None,
            model_path=extra.get("model_path") or None,
            device=extra.get("device") or "auto",
            dtype=extra.get("dtype") or "auto",
            cpu_offload=str(extra.get("cpu_offload", "")).lower() in ("1", "true", "yes", "on"),
            served_model=extra.get("served_model") or None,
            lora_paths=extra.get("lora_paths") or None,
            controlnet_paths=extra.get("controlnet_paths") or None,
        )

    def timeouts(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, connect=self.connect_timeout, pool=self.timeout)


def _base_url(conn: Any, extra: dict[str, Any]) -> str:
    if extra.get("base_url"):
        return str(extra["base_url"]).rstrip("/")
    host = (conn.host or "").strip()
    if not host:
        return protocol.DEFAULT_BASE_URL
    if "://" in host:
        return host.rstrip("/")
    url = f"https://{host}"
    if conn.port:
        url += f":{conn.port}"
    if conn.schema:
        url += "/" + conn.schema.strip("/")
    return url.rstrip("/")


# One AsyncClient per event loop and transport settings: triggers share connection pools.
_async_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[Any, ...], httpx.AsyncClient]
] = weakref.WeakKeyDictionary()

# protocol.parse_response or parse_poll_response: (status code, body, headers) -> the parsed answer.
Parser = Callable[[int, bytes, Mapping[str, str]], RunwareResponse]

_LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=100)
_loop_users: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def loop_clients() -> AsyncIterator[None]:
    """Hold this loop's shared AsyncClients open while in use; the last user out closes them.

    Triggers of one loop share connection pools; a loop that ends (a test, `asyncio.run` on a worker)
    must not leave sockets behind, and a triggerer with no Z-Image triggers left holds none open.
    """
    loop = asyncio.get_running_loop()
    _loop_users[loop] = _loop_users.get(loop, 0) + 1
    try:
        yield
    finally:
        _loop_users[loop] -= 1
        if _loop_users[loop] == 0:
            for client in _async_clients.pop(loop, {}).values():
                await client.aclose()


class ZImageHook(BaseHook):
    """Runware API client for the `zimage` connection (password = API key, host = base URL).

    :param zimage_conn_id: connection id; `zimage_default` by default.
    :param retry_policy: overrides the connection's retry settings (tests use short delays).
    """

    conn_name_attr = "zimage_conn_id"
    default_conn_name = "zimage_default"
    conn_type = "zimage"
    hook_name = "Z-Image (Runware / local)"

    def __init__(
        self,
        zimage_conn_id: str = default_conn_name,
        *,
        retry_policy: RetryPolicy | None = None,
        settings: ConnectionSettings | None = None,
    ) -> None:
        super().__init__()
        self.zimage_conn_id = zimage_conn_id
        self._retry_override = retry_policy
        self._explicit_settings = settings
        self._settings = settings
        self._client: httpx.Client | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(zimage_conn_id={self.zimage_conn_id!r})"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        behaviour = get_provider_info()["connection-types"][0]["ui-field-behaviour"]
        return {
            "hidden_fields": behaviour["hidden-fields"],
            "relabeling": behaviour["relabeling"],
            "placeholders": behaviour["placeholders"],
        }

    # -- settings -----------------------------------------------------------------------------------

    def _with_override(self, settings: ConnectionSettings) -> ConnectionSettings:
        if self._retry_override is None:
            return settings
        from dataclasses import replace

        return replace(settings, retry=self._retry_override)

    @cached_property
    def settings(self) -> ConnectionSettings:
        if self._settings is not None:
            return self._with_override(self._settings)
        conn = self.get_connection(self.zimage_conn_id)
        return self._with_override(ConnectionSettings.from_connection(conn))

    async def asettings(self) -> ConnectionSettings:
        if self._settings is None:
            conn = await self.aget_connection(self.zimage_conn_id)
            self._settings = ConnectionSettings.from_connection(conn)
        return self._with_override(self._settings)

    def _auth_headers(self, settings: ConnectionSettings) -> dict[str, str]:
        if not settings.api_key:
            # Permanent: no retry can conjure a key, and every try would fail the same way.
            raise ZImageAuthError(
                f"connection {self.zimage_conn_id!r} has no API key: set its password to your Runware "
                "API key (Admin > Connections, or AIRFLOW_CONN_" + self.zimage_conn_id.upper() + ")"
            )
        return {"Authorization": f"Bearer {settings.api_key}", "Accept": "application/json"}

    # -- sync transport ----------------------------------------------------------------------------

    def get_conn(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=self.settings.timeouts(), limits=_LIMITS)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> ZImageHook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reload(self) -> None:
        """Forget the cached connection, so the next call reads it again (a key rotated in Airflow)."""
        self.__dict__.pop("settings", None)
        self._settings = self._explicit_settings

    def _post(
        self, payload: list[dict[str, Any]], parse: Parser = protocol.parse_response
    ) -> RunwareResponse:
        settings = self.settings
        headers = self._auth_headers(settings)
        attempt = 0
        while True:
            try:
                resp = self.get_conn().post(settings.base_url, json=payload, headers=headers)
                return parse(resp.status_code, resp.content, resp.headers)
            except Exception as exc:
                delay = self._retry_delay(settings, attempt, exc, payload, settings.base_url)
            time.sleep(delay)
            attempt += 1

    # -- async transport ---------------------------------------------------------------------------

    async def get_async_conn(self) -> httpx.AsyncClient:
        settings = await self.asettings()
        loop = asyncio.get_running_loop()
        clients = _async_clients.setdefault(loop, {})
        key = (settings.timeout, settings.connect_timeout)
        client = clients.get(key)
        if client is None or client.is_closed:
            client = clients[key] = httpx.AsyncClient(timeout=settings.timeouts(), limits=_LIMITS)
        return client

    async def _apost(
        self, payload: list[dict[str, Any]], parse: Parser = protocol.parse_response
    ) -> RunwareResponse:
        settings = await self.asettings()
        headers = self._auth_headers(settings)
        client = await self.get_async_conn()
        attempt = 0
        while True:
            try:
                resp = await client.post(settings.base_url, json=payload, headers=headers)
                return parse(resp.status_code, resp.content, resp.headers)
            except Exception as exc:
                delay = self._retry_delay(settings, attempt, exc, payload, settings.base_url)
            await asyncio.sleep(delay)
            attempt += 1

    # -- shared by both paths ----------------------------------------------------------------------

    def _retry_delay(
        self,
        settings: ConnectionSettings,
        attempt: int,
        exc: Exception,
        payload: list[dict[str, Any]],
        url: str,
    ) -> float:
        """Return how long to wait before retrying `exc`, or raise it (secrets removed) when it is final."""
        task = payload[0].get("taskType") if payload else "?"
        error = classify_exception(exc, url, settings)
        return self._delay_or_raise(settings, attempt, exc, error, f"Runware {task}")

    @staticmethod
    def _delay_or_raise(
        settings: ConnectionSettings, attempt: int, exc: Exception, error: Exception, what: str
    ) -> float:
        """The retry decision of every transport this connection drives (Runware, an OpenAI images
        server): `error` is `exc` classified; the wait before the next attempt, or the error raised,
        secrets removed, when it is final."""
        delay = settings.retry.next_delay(attempt, error)
        if delay is None:
            if isinstance(error, ZImageAPIError):
                error.args = (redact(str(error), settings.secrets),)
                raise error from None
            raise exc
        log.warning(
            "%s attempt %d failed (%s); retrying in %.2fs",
            what,
            attempt + 1,
            redact(str(error), settings.secrets),
            delay,
        )
        return delay

    # -- API: sync ---------------------------------------------------------------------------------

    def infer(self, requests: Sequence[ImageInferenceRequest]) -> list[ImageResult]:
        """Run tasks with `deliveryMethod=sync` and return their images (one POST, several tasks)."""
        sync = [r.model_copy(update={"delivery_method": "sync"}) for r in requests]
        try:
            response = self._post(protocol.inference_payload(sync))
        except ZImageConflictError:
            # A retry after a lost answer: the first POST landed, so fetch instead of paying again.
            return [r for req in sync for r in self.wait_for_task(req.task_uuid, _expected(req)).results]
        return _results_or_raise(response)

    def submit(self, requests: Sequence[ImageInferenceRequest]) -> list[str]:
        """Submit tasks with `deliveryMethod=async`; returns their taskUUIDs.

        `conflictTaskUUID` on a re-sent submission means the first one landed: reported as submitted.
        """
        tasks = [r.model_copy(update={"delivery_method": "async"}) for r in requests]
        try:
            response = self._post(protocol.inference_payload(tasks))
        except ZImageConflictError as exc:
            log.info("Runware already holds %s: reattaching instead of submitting again", exc.task_uuids)
            return [t.task_uuid for t in tasks]
        _raise_task_errors(response)
        return [t.task_uuid for t in tasks]

    def get_response(self, task_uuid: str, status: TaskStatus | None = None) -> TaskStatus:
        """One `getResponse` poll merged into `status` (partial results accumulate, deduplicated).

        An unknown or expired task comes back as a failed status (code taskNotFound / taskExpired), the
        same answer a batched poll gives, so every waiting path decides about lost results in one place.
        """
        status = status or TaskStatus(task_uuid)
        payload = protocol.get_response_payload(task_uuid)
        return status.merge(self._post(payload, protocol.parse_poll_response))

    def get_responses(self, task_uuids: Sequence[str]) -> RunwareResponse:
        """Poll many tasks in one POST (the sync twin of `aget_responses`); unknown or expired tasks come
        back as their own errors."""
        return self._post(protocol.get_response_payload(*task_uuids), protocol.parse_poll_response)

    # wait_for_task / await_task are sync and async twins on purpose (httpx's Client / AsyncClient
    # shape): the waiting rules they share live in protocol.poll_waits, only the I/O differs.
    def wait_for_task(
        self,
        task_uuid: str,
        expected_results: int = 1,
        *,
        timeout: float = 3600.0,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
    ) -> TaskStatus:
        """Poll in-process until the task finishes; the non-deferrable twin of `ZImageTaskTrigger`."""
        status = TaskStatus(task_uuid, expected_results)
        for wait in protocol.poll_waits(task_uuid, timeout, poll_interval, max_poll_interval):
            time.sleep(wait)
            if self.get_response(task_uuid, status).finished:
                return status
        raise AssertionError("unreachable")  # pragma: no cover

    def download(self, result: ImageResult) -> bytes:
        """The image bytes of a result, whatever `outputType` delivered them as."""
        inline = decode_inline_image(result)
        if inline is not None:
            return inline
        url = _require_url(result)
        settings = self.settings
        origins = allowed_image_origins(settings)
        attempt = 0
        while True:
            try:
                # No Authorization header: image URLs are public and may live on another host.
                return fetch_image(self.get_conn().get, check_image_url(url, origins), origins)
            except Exception as exc:
                delay = self._retry_delay(settings, attempt, exc, [{"taskType": "download"}], url)
            time.sleep(delay)
            attempt += 1

    def executor_health(self) -> dict[str, Any]:
        """`GET /health` of a zimage-executor (`backend: executor`): its models and the weights they use.

        The base URL ends in `/v1`; the health route sits beside it. One attempt: the caller decides.
        """
        base = self.settings.base_url.rstrip("/")
        url = (base[: -len("/v1")] if base.endswith("/v1") else base) + "/health"
        try:
            resp = self.get_conn().get(url, headers=self._auth_headers(self.settings))
        except httpx.HTTPError as exc:
            raise classify_exception(exc) from None
        if resp.status_code >= 400:
            raise protocol.error_for_status(resp.status_code, None, resp.headers)
        body = resp.json()
        if not isinstance(body, dict):
            raise ZImageTransientError(f"{url} did not answer a JSON object")
        return body

    def test_connection(self) -> tuple[bool, str]:
        """Checks the key for free: getResponse of an unknown task is `taskNotFound` with a valid key."""
        try:
            status = self.get_response(str(uuid.uuid4()))
        except ZImageError as exc:
            return False, redact(str(exc), self.settings.secrets)
        if any(e.code == protocol.TASK_NOT_FOUND for e in status.errors):
            return True, "Connection to Runware works and the API key is accepted."
        return True, "Connection to Runware works."

    # -- API: async --------------------------------------------------------------------------------

    async def ainfer(self, requests: Sequence[ImageInferenceRequest]) -> list[ImageResult]:
        sync = [r.model_copy(update={"delivery_method": "sync"}) for r in requests]
        try:
            response = await self._apost(protocol.inference_payload(sync))
        except ZImageConflictError:
            statuses = [await self.await_task(r.task_uuid, _expected(r)) for r in sync]
            return [r for s in statuses for r in s.results]
        return _results_or_raise(response)

    async def asubmit(self, requests: Sequence[ImageInferenceRequest]) -> list[str]:
        tasks = [r.model_copy(update={"delivery_method": "async"}) for r in requests]
        try:
            response = await self._apost(protocol.inference_payload(tasks))
        except ZImageConflictError as exc:
            log.info("Runware already holds %s: reattaching instead of submitting again", exc.task_uuids)
            return [t.task_uuid for t in tasks]
        _raise_task_errors(response)
        return [t.task_uuid for t in tasks]

    async def aget_response(self, task_uuid: str, status: TaskStatus | None = None) -> TaskStatus:
        status = status or TaskStatus(task_uuid)
        return status.merge(await self.aget_responses([task_uuid]))

    async def aget_responses(self, task_uuids: Sequence[str]) -> RunwareResponse:
        """Poll many tasks in one POST; unknown or expired tasks come back as their own errors."""
        return await self._apost(protocol.get_response_payload(*task_uuids), protocol.parse_poll_response)

    async def await_task(
        self,
        task_uuid: str,
        expected_results: int = 1,
        *,
        timeout: float = 3600.0,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
    ) -> TaskStatus:
        status = TaskStatus(task_uuid, expected_results)
        for wait in protocol.poll_waits(task_uuid, timeout, poll_interval, max_poll_interval):
            await asyncio.sleep(wait)
            if (await self.aget_response(task_uuid, status)).finished:
                return status
        raise AssertionError("unreachable")  # pragma: no cover

    async def adownload(self, result: ImageResult) -> bytes:
        inline = decode_inline_image(result)
        if inline is not None:
            return inline
        url = _require_url(result)
        settings = await self.asettings()
        client = await self.get_async_conn()
        origins = allowed_image_origins(settings)
        attempt = 0
        while True:
            try:
                return await afetch_image(client.get, check_image_url(url, origins), origins)
            except Exception as exc:
                delay = self._retry_delay(settings, attempt, exc, [{"taskType": "download"}], url)
            await asyncio.sleep(delay)
            attempt += 1


def classify_exception(
    exc: Exception, url: str = "", settings: ConnectionSettings | None = None
) -> Exception:
    """Transport failures are transient: the request may or may not have landed, and a re-send is safe
    because the taskUUID makes it idempotent (a landed one answers `conflictTaskUUID`).

    The message names the URL tried (without its query, which may hold a credential), so a connection
    pointing at the wrong place says where it pointed."""
    where = f" at {without_query(url)}" if url else ""
    hint = settings.scheme_hint if settings is not None else ""
    if isinstance(exc, httpx.TimeoutException):
        return ZImageTransientError(f"Runware request{where} timed out ({type(exc).__name__}){hint}")
    if isinstance(exc, httpx.TransportError):
        detail = redact(str(exc), settings.secrets if settings else ())
        return ZImageTransientError(
            f"connection to Runware{where} failed ({type(exc).__name__}: {detail or 'no detail'}){hint}"
        )
    return exc


def _expected(request: ImageInferenceRequest) -> int:
    return request.number_results or 1


def _raise_task_errors(response: RunwareResponse) -> None:
    if response.errors:
        first = response.errors[0]
        raise ZImageTaskFailed(
            protocol.describe(first), code=first.code, parameter=first.parameter, task_uuid=first.task_uuid
        )


def _results_or_raise(response: RunwareResponse) -> list[ImageResult]:
    _raise_task_errors(response)
    return response.results


def decode_inline_image(result: ImageResult) -> bytes | None:
    if result.image_base64_data:
        return base64.b64decode(result.image_base64_data)
    if result.image_data_uri:
        _, _, data = result.image_data_uri.partition(",")
        return base64.b64decode(data)
    return None


def _require_url(result: ImageResult) -> str:
    if not result.image_url:
        raise ZImageTaskFailed(f"result {result.image_uuid} carries no image (no URL, base64 or data URI)")
    return result.image_url


# Runware serves result images from this origin; a connection's own origin (a proxy, the test server, a
# local executor) serves them too. Anything else must be named in `[zimage] allowed_image_hosts`.
_MAX_REDIRECTS = MAX_REDIRECTS
RUNWARE_IMAGE_ORIGINS = frozenset({ImageOrigin("https", "im.runware.ai", 443)})


def allowed_image_origins(settings: ConnectionSettings) -> frozenset[ImageOrigin]:
    """Where a worker may fetch image bytes: a webhook item or a poll answer names the URL, and must not
    be able to make a worker fetch an internal address (cloud metadata, another port of the API host)."""
    origins = set(RUNWARE_IMAGE_ORIGINS)
    with contextlib.suppress(httpx.InvalidURL, UnicodeError):
        own = httpx.URL(settings.base_url)
        if own.scheme in DEFAULT_PORTS and own.raw_host:
            origins.add(ImageOrigin.of(own))
    return frozenset(origins | parse_origins(config.allowed_image_hosts(), "[zimage] allowed_image_hosts"))


def _redirect_target(resp: httpx.Response, origins: frozenset[ImageOrigin]) -> httpx.URL | None:
    """The next hop of a redirect, checked like the first URL (httpx has already resolved a relative
    Location against the request); None when the answer is not a redirect."""
    if not resp.is_redirect or resp.next_request is None:
        return None
    return check_image_url(resp.next_request.url, origins)


def fetch_image(
    get: Callable[[httpx.URL], httpx.Response], target: httpx.URL, origins: frozenset[ImageOrigin]
) -> bytes:
    """The bytes behind an already-checked image URL, every redirect hop checked against `origins`:
    the one download loop of every backend (`get` decides the headers a hop gets)."""
    for _ in range(_MAX_REDIRECTS + 1):
        resp = get(target)
        hop = _redirect_target(resp, origins)
        if hop is None:
            _raise_for_download(resp)
            return resp.content
        target = hop
    raise _too_many_redirects()


async def afetch_image(
    get: Callable[[httpx.URL], Awaitable[httpx.Response]], target: httpx.URL, origins: frozenset[ImageOrigin]
) -> bytes:
    """`fetch_image` for an async client (kept beside it: the two differ only by `await`)."""
    for _ in range(_MAX_REDIRECTS + 1):
        resp = await get(target)
        hop = _redirect_target(resp, origins)
        if hop is None:
            _raise_for_download(resp)
            return resp.content
        target = hop
    raise _too_many_redirects()


def _too_many_redirects() -> ZImagePermanentError:
    return ZImagePermanentError(f"image download stopped after {_MAX_REDIRECTS} redirects")


def _raise_for_download(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        raise protocol.error_for_status(resp.status_code, None, resp.headers)
