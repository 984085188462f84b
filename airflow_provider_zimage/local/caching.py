"""Step caching (`acceleratorOptions`) with cache-dit: Runware's fbCache / dbCache on local GPUs.

cache-dit (the `[accel]` extra) ships a Z-Image block adapter: on a step it may cache, it runs the
first transformer block(s), compares their residual with the last computed step's, and when the
relative difference is under its threshold reuses the rest of the blocks' residual instead of running
them. Runware's page names the same library for dbCache. The mapping (docs/backends.md, "Step
caching"):

* `fbCache` -> DBCache with one compute block (F1B0: cache-dit's First Block Cache); `dbCache` ->
  DBCache with cache-dit's default 8 compute blocks (fewer on a smaller transformer).
* thresholds: Runware says a *lower* `fbCacheThreshold` / `dbCacheThreshold` reuses *more*; in
  cache-dit a *higher* residual threshold does. The user's intent is kept: residual threshold =
  (1 - t) / (12 t), so Runware's default 0.25 is cache-dit's 0.25, 0 reuses every step the window and
  `cacheMaxConsecutiveSteps` allow, and 1 never reuses.
* `cacheStartStep(Percentage)` / `cacheEndStep(Percentage)`: the window [start, end) of steps that may
  be reused (0-based, as the page's "less than or equal to steps" bound implies); steps outside it
  are always computed. Unset: from 25% of the steps (at least step 1; step 0 has nothing to reuse)
  to the last. `cacheMaxConsecutiveSteps` -> cache-dit's `max_continuous_cached_steps` (default 3).
* refused, naming the parameter: `teaCache` (cache-dit has no TeaCache), `dbCacheSkipInterval` (no
  equivalent), fbCache and dbCache together. Options that change nothing (`fbCache: false`, a
  threshold without its cache) are accepted.

The cache is switched on around one pipeline call and off afterwards (`step_cache`): pipelines are
cached per process, and the next request that does not ask must get the uncached bytes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from airflow_provider_zimage.local.refusals import issue

log = logging.getLogger(__name__)

__all__ = ["ACCEL_EXTRA", "StepCache", "cache_dit_threshold", "plan_step_cache", "step_cache"]

ACCEL_EXTRA = "pip install 'airflow-provider-zimage[accel]'"
DEFAULT_MAX_CONSECUTIVE = 3  # Runware's documented default of cacheMaxConsecutiveSteps
DEFAULT_START_FRACTION = 0.25
DB_CACHE_COMPUTE_BLOCKS = 8  # cache-dit's default Fn_compute_blocks
_MODULE = "cache_dit"


@dataclass(frozen=True)
class StepCache:
    """What one pipeline call caches; hashable, so it can be part of the executor's batching key."""

    method: Literal["fbCache", "dbCache"]
    threshold: float  # Runware's value
    start: int
    end: int
    max_consecutive: int
    steps: int

    @property
    def residual_threshold(self) -> float:
        return cache_dit_threshold(self.threshold)

    def mask(self) -> list[int]:
        """cache-dit's steps_computation_mask: 1 = always computed, 0 = may be reused."""
        return [0 if self.start <= step < self.end else 1 for step in range(self.steps)]


def cache_dit_threshold(runware: float) -> float:
    """Runware's threshold (lower reuses more) -> cache-dit's residual threshold (higher reuses more)."""
    if runware <= 0:
        return math.inf
    return (1.0 - runware) / (12.0 * runware)


def _field(options: Any, attribute: str, alias: str) -> Any:
    if isinstance(options, dict):
        return options.get(alias, options.get(attribute))
    return getattr(options, attribute, None)


def installed() -> bool:
    try:
        return importlib.util.find_spec(_MODULE) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None (blocked)
        return False


def plan_step_cache(options: Any, steps: int) -> tuple[StepCache | None, list[dict[str, Any]]]:
    """The cache of a request's `acceleratorOptions` (None: no caching) and its refusals."""
    if options is None:
        return None, []

    def get(attribute: str, alias: str) -> Any:
        return _field(options, attribute, alias)

    issues = []
    prefix = "acceleratorOptions."
    # teaCache: refused by its row in runware/support.py (no cache-dit equivalent), with the same words.
    fb, db = bool(get("fb_cache", "fbCache")), bool(get("db_cache", "dbCache"))
    if fb and db:
        issues.append(issue(prefix + "dbCache", "cannot be combined with fbCache locally: choose one", True))
    if db and get("db_cache_skip_interval", "dbCacheSkipInterval") is not None:
        issues.append(
            issue(
                prefix + "dbCacheSkipInterval",
                "has no equivalent in cache-dit; leave it out (reuse is bounded by "
                "cacheMaxConsecutiveSteps instead)",
                get("db_cache_skip_interval", "dbCacheSkipInterval"),
            )
        )
    if not (fb or db):
        return None, issues  # every other option only tunes a cache that is off: nothing changes
    method: Literal["fbCache", "dbCache"] = "fbCache" if fb else "dbCache"
    if not installed():
        message = f"needs cache-dit, the [accel] extra ({ACCEL_EXTRA}), for step caching on the local backend"
        issues.append(issue(prefix + method, message, True))
    threshold = get("fb_cache_threshold" if fb else "db_cache_threshold", method + "Threshold")
    start, end = _window(options, steps)
    if end > steps:
        issues.append(issue(prefix + "cacheEndStep", f"must be at most steps ({steps})", end))
    elif start >= end:
        issues.append(
            issue(
                prefix + "cacheStartStep", f"leaves no step to cache before step {end} (steps={steps})", start
            )
        )
    if issues:
        return None, issues
    max_consecutive = (
        get("cache_max_consecutive_steps", "cacheMaxConsecutiveSteps") or DEFAULT_MAX_CONSECUTIVE
    )
    cache = StepCache(
        method=method,
        threshold=0.25 if threshold is None else float(threshold),
        start=start,
        end=end,
        max_consecutive=int(max_consecutive),
        steps=steps,
    )
    return cache, []


def _window(options: Any, steps: int) -> tuple[int, int]:
    start = _field(options, "cache_start_step", "cacheStartStep")
    if start is None:
        percent = _field(options, "cache_start_step_percentage", "cacheStartStepPercentage")
        start = steps * percent // 100 if percent is not None else math.ceil(steps * DEFAULT_START_FRACTION)
    end = _field(options, "cache_end_step", "cacheEndStep")
    if end is None:
        percent = _field(options, "cache_end_step_percentage", "cacheEndStepPercentage")
        end = math.ceil(steps * percent / 100) if percent is not None else steps
    return max(1, int(start)), int(end)  # step 0 has no earlier step to reuse


def _quiet() -> None:
    """cache-dit logs every enable, config and summary at INFO through its own handlers."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(_MODULE):
            logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def step_cache(pipe: Any, cache: StepCache | None) -> Iterator[None]:
    """`cache` switched on for one pipeline call and off again, whatever happens in between."""
    if cache is None:
        yield
        return
    import cache_dit

    _quiet()
    blocks = len(getattr(pipe.transformer, "layers", ())) or 1
    compute = 1 if cache.method == "fbCache" else max(1, min(DB_CACHE_COMPUTE_BLOCKS, blocks - 1))
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=compute,
        Bn_compute_blocks=0,
        residual_diff_threshold=cache.residual_threshold,
        max_warmup_steps=cache.start,
        max_continuous_cached_steps=cache.max_consecutive,
        num_inference_steps=cache.steps,
        steps_computation_mask=cache.mask(),
        steps_computation_policy="dynamic",
    )
    cache_dit.enable_cache(pipe, cache_config=config)
    _quiet()
    try:
        yield
        stats = cache_dit.summary(pipe, logging=False)
        reused = sorted({int(s) for stat in stats for s in stat.cached_steps})
        log.info(
            "Step cache %s (threshold %g, cache-dit residual threshold %g, window %d-%d, at most %d in a "
            "row): reused steps %s of %d",
            cache.method,
            cache.threshold,
            cache.residual_threshold,
            cache.start,
            cache.end,
            cache.max_consecutive,
            reused,
            cache.steps,
        )
    finally:
        cache_dit.disable_cache(pipe)
