"""Transport to an OpenAI-compatible image server (`backend: openai_images`): SGLang Diffusion,
vLLM-Omni, or a router in front of several (an HTTP load balancer such as nginx, NVIDIA Dynamo).

The connection is the `zimage` connection: host = the server or router URL, password = its API key if
it has one (sent as `Authorization: Bearer`), extra `served_model` = the model name the server knows.
Bodies and answers are `openai_images.wire`'s; this module only moves bytes, with the retry policy
the Runware hook uses (429/5xx/dropped connections, backoff with jitter, a longer Retry-After wins),
in a sync and an async twin that differ only where I/O happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from airflow_provider_zimage.exceptions import ZImageTransientError
from airflow_provider_zimage.hooks.runware import (
    ConnectionSettings,
    ZImageHook,
    afetch_image,
    allowed_image_origins,
    fetch_image,
)
from airflow_provider_zimage.openai_images import wire
from airflow_provider_zimage.openai_images.wire import ImageAnswer, ImageCall
from airflow_provider_zimage.origins import check_image_url
from airflow_provider_zimage.redaction import redact, without_query

log = logging.getLogger(__name__)


def transport_error(exc: Exception, url: str, settings: ConnectionSettings) -> Exception:
    """Timeouts and dropped connections are transient: the image was maybe made, maybe not, and making
    it again with the same seed makes the same picture (costing GPU time, never a second stored file)."""
    where = without_query(url)
    if isinstance(exc, httpx.TimeoutException):
        return ZImageTransientError(f"the image server at {where} timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.TransportError):
        detail = redact(str(exc), settings.secrets) or "no detail"
        return ZImageTransientError(
            f"connection to the image server at {where} failed ({type(exc).__name__}: {detail})"
        )
    return exc


class OpenAIImagesHook(ZImageHook):
    """The `zimage` connection used as an OpenAI images client; settings, clients and redaction are
    `ZImageHook`'s, so a key rotated in Airflow and the retry extras work the same way."""

    def __enter__(self) -> OpenAIImagesHook:
        return self

    def _headers(self, settings: ConnectionSettings) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if settings.api_key:  # a server without a key (a private network) takes none
            headers["Authorization"] = f"Bearer {settings.api_key}"
        return headers

    def _key_for(self, target: httpx.URL, settings: ConnectionSettings) -> dict[str, str] | None:
        """The key goes only to the server's own origin, never to wherever a URL answer points."""
        return self._headers(settings) if _same_origin(target, settings) else None

    def _delay(
        self, settings: ConnectionSettings, attempt: int, exc: Exception, url: str, what: str
    ) -> float:
        """How long to wait before the next attempt, or raise the error (secrets removed) when final."""
        return self._delay_or_raise(settings, attempt, exc, transport_error(exc, url, settings), what)

    # -- sync --------------------------------------------------------------------------------------

    def generate(self, call: ImageCall) -> bytes:
        """The image bytes of one call, retried on transient errors; a URL answer is fetched under the
        same origin rules as Runware's image downloads."""
        settings = self.settings
        url = wire.generations_url(settings.base_url)
        attempt = 0
        while True:
            try:
                resp = self.get_conn().post(url, json=call.body, headers=self._headers(settings))
                answer = wire.parse_answer(resp.status_code, resp.content, resp.headers)
                return answer.data if answer.data is not None else self._fetch(answer, settings)
            except Exception as exc:
                delay = self._delay(settings, attempt, exc, url, f"image (seed {call.seed})")
            time.sleep(delay)
            attempt += 1

    def _fetch(self, answer: ImageAnswer, settings: ConnectionSettings) -> bytes:
        origins = allowed_image_origins(settings)
        # A relative URL (SGLang's `/v1/images/<id>/content`) is the server's own: resolved against it.
        target = check_image_url(httpx.URL(settings.base_url).join(str(answer.url)), origins)
        client = self.get_conn()
        return fetch_image(lambda url: client.get(url, headers=self._key_for(url, settings)), target, origins)

    # -- async -------------------------------------------------------------------------------------

    async def agenerate(self, call: ImageCall) -> bytes:
        settings = await self.asettings()
        client = await self.get_async_conn()
        url = wire.generations_url(settings.base_url)
        attempt = 0
        while True:
            try:
                resp = await client.post(url, json=call.body, headers=self._headers(settings))
                answer = wire.parse_answer(resp.status_code, resp.content, resp.headers)
                return (
                    answer.data if answer.data is not None else await self._afetch(answer, settings, client)
                )
            except Exception as exc:
                delay = self._delay(settings, attempt, exc, url, f"image (seed {call.seed})")
            await asyncio.sleep(delay)
            attempt += 1

    async def _afetch(
        self, answer: ImageAnswer, settings: ConnectionSettings, client: httpx.AsyncClient
    ) -> bytes:
        origins = allowed_image_origins(settings)
        target = check_image_url(httpx.URL(settings.base_url).join(str(answer.url)), origins)
        return await afetch_image(
            lambda url: client.get(url, headers=self._key_for(url, settings)), target, origins
        )

    def test_connection(self) -> tuple[bool, str]:
        """`GET /v1/models` (free: no image is made); the key is checked when the server has one."""
        settings = self.settings
        base = wire.generations_url(settings.base_url).removesuffix(wire.GENERATIONS_PATH)
        try:
            resp = self.get_conn().get(base + "/models", headers=self._headers(settings))
        except httpx.HTTPError as exc:
            return False, redact(str(transport_error(exc, base, settings)), settings.secrets)
        if resp.status_code >= 400:
            return False, redact(
                str(wire.error_for_answer(resp.status_code, resp.content, resp.headers)), settings.secrets
            )
        return True, "The image server answers and accepts the key."


def _same_origin(target: Any, settings: ConnectionSettings) -> bool:
    """The key goes only to the server's own origin, never to wherever a URL answer points."""
    try:
        own, there = httpx.URL(settings.base_url), httpx.URL(str(target))
    except httpx.InvalidURL:
        return False
    return (own.scheme, own.host, own.port) == (there.scheme, there.host, there.port)


__all__ = ["OpenAIImagesHook", "transport_error"]
