"""A Runware-compatible HTTP server for tests, benchmarks and the end-to-end harness.

It is the only stand-in for the paid API, so the provider's promises about money are proved by its
counters: `accepted_submissions(task_uuid)` says how many times a task was paid for.

    with RunwareTestServer(delay=0.1) as server:           # or the `zimage_server` pytest fixture
        hook_url = server.url                               # http://127.0.0.1:PORT/v1
        server.fail_next(429, retry_after=1)                # one-shot faults
        server.drop_next(after_accept=True)                 # task lands, answer never comes
        server.script_faults(rates={"503": 0.2, "drop": 0.1}, seed=1)
        ...
        assert server.accepted_submissions(task_uuid) == 1

Other processes: `python -m airflow_provider_zimage.testing.runware_server --port N`, and the control
API under /_control/ (GET stats, GET/POST/DELETE faults, POST config, POST reset; no auth).

Prompt markers script a single task: `__fail__` (or `__fail:someCode__`) ends it with status error,
`__fail_once__` does so only for the first task with that exact prompt, `__nsfw__` sets NSFWContent,
`__delay:2.5__` makes its results take 2.5 s.

`HTTPSink` is the receiving end for webhooks and upload endpoints (records requests, scripted statuses).
"""

from .faults import Fault, FaultPlan
from .images import PRICE_PER_MEGAPIXEL, image_cost, render_image
from .schema import MODELS, TWINFLOW, Z_IMAGE, Z_IMAGE_TURBO, validate_inference_task
from .server import DEFAULT_API_KEY, RunwareTestServer, ServerOptions
from .sink import HTTPSink, SinkRequest

__all__ = [
    "DEFAULT_API_KEY",
    "MODELS",
    "PRICE_PER_MEGAPIXEL",
    "TWINFLOW",
    "Z_IMAGE",
    "Z_IMAGE_TURBO",
    "Fault",
    "FaultPlan",
    "HTTPSink",
    "RunwareTestServer",
    "ServerOptions",
    "SinkRequest",
    "image_cost",
    "render_image",
    "validate_inference_task",
]
