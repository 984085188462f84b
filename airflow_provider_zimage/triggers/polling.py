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

from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.protocol import RunwareResponse

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
        except Exception as exc:
            for futures in chunk.values():
                for future in futures:
                    if not future.done():  # a cancelled trigger no longer waits
                        future.set_exception(exc)
            return
        for futures in chunk.values():
            for future in futures:
                if not future.done():
                    future.set_result(response)


def batch_poller(zimage_conn_id: str) -> BatchPoller:
    """The poller shared by every trigger of this event loop that uses `zimage_conn_id`."""
    loop = asyncio.get_running_loop()
    per_loop = _pollers.setdefault(loop, {})
    poller = per_loop.get(zimage_conn_id)
    if poller is None:
        poller = per_loop[zimage_conn_id] = BatchPoller(zimage_conn_id)
    return poller
