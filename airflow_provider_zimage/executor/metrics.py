"""The executor's counters, rendered in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

__all__ = ["Metrics"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1


class Metrics:
    """Thread-safe: the device threads observe, the event loop renders."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.images: dict[str, int] = defaultdict(int)  # by device
        self.image_seconds: dict[str, float] = defaultdict(float)
        self.pipeline_calls: dict[str, int] = defaultdict(int)
        self.batch_sizes = _Histogram(BATCH_BUCKETS)
        self.queue_wait = _Histogram(WAIT_BUCKETS)
        self.tasks: dict[str, int] = defaultdict(int)  # by outcome
        self.peak_memory: dict[str, int] = {}

    def batch(self, device: str, size: int, seconds: float, waits: list[float], ok: bool) -> None:
        with self._lock:
            self.pipeline_calls[device] += 1
            self.batch_sizes.observe(size)
            for wait in waits:
                self.queue_wait.observe(wait)
            if ok:
                self.images[device] += size
                self.image_seconds[device] += seconds

    def task(self, outcome: str) -> None:
        with self._lock:
            self.tasks[outcome] += 1

    def gpu_memory(self, device: str, peak_bytes: int) -> None:
        with self._lock:
            self.peak_memory[device] = max(self.peak_memory.get(device, 0), peak_bytes)

    def render(self, queue_depths: dict[str, int], loads: int, draining: bool) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, text: str, samples: Callable[[], list[str]]) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples())

        with self._lock:
            family(
                "zimage_executor_images_total",
                "counter",
                "Images made, by device.",
                lambda: [f'zimage_executor_images_total{{device="{d}"}} {n}' for d, n in self.images.items()],
            )
            family(
                "zimage_executor_image_seconds_total",
                "counter",
                "Seconds spent in pipeline calls that made images (divide by images for seconds per image).",
                lambda: [
                    f'zimage_executor_image_seconds_total{{device="{d}"}} {s:.6f}'
                    for d, s in self.image_seconds.items()
                ],
            )
            family(
                "zimage_executor_pipeline_calls_total",
                "counter",
                "Pipeline calls (one per batch), by device.",
                lambda: [
                    f'zimage_executor_pipeline_calls_total{{device="{d}"}} {n}'
                    for d, n in self.pipeline_calls.items()
                ],
            )
            family(
                "zimage_executor_batch_size",
                "histogram",
                "Images per pipeline call.",
                lambda: _histogram("zimage_executor_batch_size", self.batch_sizes),
            )
            family(
                "zimage_executor_queue_wait_seconds",
                "histogram",
                "Seconds an image waited in its device queue.",
                lambda: _histogram("zimage_executor_queue_wait_seconds", self.queue_wait),
            )
            family(
                "zimage_executor_tasks_total",
                "counter",
                "Tasks finished, by outcome.",
                lambda: [f'zimage_executor_tasks_total{{outcome="{o}"}} {n}' for o, n in self.tasks.items()],
            )
            family(
                "zimage_executor_peak_gpu_memory_bytes",
                "gauge",
                "Peak GPU memory allocated by torch, by device (CUDA only).",
                lambda: [
                    f'zimage_executor_peak_gpu_memory_bytes{{device="{d}"}} {b}'
                    for d, b in self.peak_memory.items()
                ],
            )
        family(
            "zimage_executor_queue_depth",
            "gauge",
            "Images queued or being made, by device.",
            lambda: [f'zimage_executor_queue_depth{{device="{d}"}} {n}' for d, n in queue_depths.items()],
        )
        family(
            "zimage_executor_model_loads_total",
            "counter",
            "Checkpoints loaded by this process (one per model and device when all is well).",
            lambda: [f"zimage_executor_model_loads_total {loads}"],
        )
        family(
            "zimage_executor_draining",
            "gauge",
            "1 after SIGTERM: no new tasks are accepted.",
            lambda: [f"zimage_executor_draining {int(draining)}"],
        )
        return "\n".join(lines) + "\n"


def _histogram(name: str, histogram: _Histogram) -> list[str]:
    lines = [
        f'{name}_bucket{{le="{bound:g}"}} {count}'
        for bound, count in zip(histogram.buckets, histogram.counts, strict=True)
    ]
    lines.append(f'{name}_bucket{{le="+Inf"}} {histogram.count}')
    lines.append(f"{name}_sum {histogram.total:.6f}")
    lines.append(f"{name}_count {histogram.count}")
    return lines
