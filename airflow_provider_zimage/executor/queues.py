"""One queue and one thread per device: images are denoised in order, compatible ones together.

A queue holds single images (`WorkUnit`: a task's plan and one of its seeds). The device thread takes
the oldest unit and, when its plan can be batched (`local.batch_key`), every queued unit with the same
key, up to `max_batch`, and makes them in ONE pipeline call of the shared `LocalZImageExecutor`; each
image keeps its own generator, so its bytes depend on its seed only. The thread hands the outcome back
through `on_done`, called on the thread; the server moves it to its event loop.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_zimage.local import GeneratedImage, LocalZImageExecutor, Plan, batch_key

log = logging.getLogger(__name__)

__all__ = ["DeviceQueue", "WorkUnit"]


@dataclass
class WorkUnit:
    task_uuid: str
    plan: Plan = field(repr=False)
    seed: int
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> Hashable | None:
        return batch_key(self.plan)


Outcome = list[GeneratedImage] | BaseException
OnDone = Callable[["DeviceQueue", list[WorkUnit], Outcome, float], None]


class DeviceQueue:
    """The work of one device, served by one thread."""

    def __init__(
        self, device: str, engines: dict[str, LocalZImageExecutor], max_batch: int, on_done: OnDone
    ) -> None:
        self.device = device
        self.engines = engines  # model AIR -> the executor of that model on this device
        self.max_batch = max_batch
        self._on_done = on_done
        self._units: collections.deque[WorkUnit] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.busy = 0  # units in the pipeline call now
        self._thread = threading.Thread(target=self._serve, name=f"zimage-{device}", daemon=True)

    @property
    def depth(self) -> int:
        """Images waiting or being made on this device."""
        with self._cond:
            return len(self._units) + self.busy

    def start(self) -> None:
        self._thread.start()

    def put(self, units: Sequence[WorkUnit]) -> None:
        """Enqueue every unit of a request at once, so the thread sees them together and can batch them."""
        with self._cond:
            self._units.extend(units)
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return not self._units and not self.busy

    def stop(self, timeout: float) -> list[WorkUnit]:
        """Stop taking work; wait up to `timeout` for the running call; return the units never started."""
        with self._cond:
            self._stopping = True
            left = list(self._units)
            self._units.clear()
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "The pipeline call on %s did not end within %.0fs; exiting anyway", self.device, timeout
            )
        return left

    def _take(self) -> list[WorkUnit] | None:
        with self._cond:
            while not self._units and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._units.popleft()
            batch = [first]
            key = first.key
            if key is not None and self.max_batch > 1:
                for unit in list(self._units):
                    if len(batch) >= self.max_batch:
                        break
                    if unit.key == key:
                        self._units.remove(unit)
                        batch.append(unit)
            self.busy = len(batch)
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            started = time.monotonic()
            outcome: Any
            try:
                engine = self.engines[batch[0].plan.spec.air]
                outcome = engine.generate_batch([(u.plan, u.seed) for u in batch])
            except BaseException as exc:  # reported to the tasks, never kills the device thread
                log.warning("Batch of %d on %s failed: %s", len(batch), self.device, exc)
                outcome = exc
            try:
                self._on_done(self, batch, outcome, started)
            except Exception:
                log.exception("Recording a finished batch failed")
            finally:
                with self._cond:
                    self.busy = 0
