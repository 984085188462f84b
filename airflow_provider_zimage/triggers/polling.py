"""One `getResponse` POST for many deferred tasks: what lets one triggerer wait on thousands of images.

Each `ZImageTaskTrigger` polling on its own sends one request per task per interval; a thousand deferred
tasks then cost hundreds of requests a second and saturate the triggerer's CPU. Runware takes an array
of tasks in every POST, so the triggers of one event loop and connection hand their polls to a shared
`BatchPoller`, which waits a few milliseconds to collect them and sends up to `max_batch` taskUUIDs per
request. Every trigger still sees its own answer (items are matched by taskUUID in `TaskStatus.merge`).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from airflow_provider_zimage.exceptions import ZImageAuthError, ZImagePermanentError
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.runware.protocol import RunwareResponse

_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, BatchPoller]] = (
    weakref.WeakKeyDictionary()
)


class BatchPoller:
    """Coalesces concurrent polls of one connection into batched getResponse requests."""

    def __init__(self, zimage_conn_id: str, *, max_batch: int = 100, window: float = 0.02) -> None:
        self.hook = ZImageHook(zimage_conn_id)
        self.max_batch = max_batch
        self.window = window
        self._pending: dict[str, list[asyncio.Future[RunwareResponse]]] = {}
        self._flush: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    def reload(self) -> None:
        """Read the connection again on the next poll (a key rotated while tasks wait)."""
        self.hook.reload()

    async def poll(self, task_uuid: str) -> RunwareResponse:
        """The answer of the next batched poll that includes `task_uuid` (errors are raised to all)."""
        future: asyncio.Future[RunwareResponse] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(task_uuid, []).append(future)
        if self._flush is None:
            self._flush = asyncio.ensure_future(self._flush_soon())
        return await future

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.window)
        pending, self._pending, self._flush = self._pending, {}, None
        uuids = list(pending)
        for start in range(0, len(uuids), self.max_batch):
            chunk = {u: pending[u] for u in uuids[start : start + self.max_batch]}
            task = asyncio.ensure_future(self._send(chunk))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _send(self, chunk: dict[str, list[asyncio.Future[RunwareResponse]]]) -> None:
        try:
            response = await self.hook.aget_responses(list(chunk))
        except ZImagePermanentError as exc:
            if len(chunk) > 1 and not isinstance(exc, ZImageAuthError):
                # One bad task can make Runware refuse the whole batch (a 400): ask for each task on
                # its own, so only the task the refusal is about hears it.
                await asyncio.gather(*(self._send({uuid: futures}) for uuid, futures in chunk.items()))
                return
            _settle(chunk, exc)
            return
        except Exception as exc:
            _settle(chunk, exc)
            return
        _settle(chunk, response)


def _settle(
    chunk: dict[str, list[asyncio.Future[RunwareResponse]]], answer: RunwareResponse | BaseException
) -> None:
    for futures in chunk.values():
        for future in futures:
            if future.done():  # a cancelled trigger no longer waits
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)


def batch_poller(zimage_conn_id: str) -> BatchPoller:
    """The poller shared by every trigger of this event loop that uses `zimage_conn_id`."""
    loop = asyncio.get_running_loop()
    per_loop = _pollers.setdefault(loop, {})
    poller = per_loop.get(zimage_conn_id)
    if poller is None:
        poller = per_loop[zimage_conn_id] = BatchPoller(zimage_conn_id)
    return poller
