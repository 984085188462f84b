"""The local GPU executor as a service (`zimage-executor serve`): weights loaded once per GPU.

Tasks submit to it and poll or defer exactly as they do with Runware: it speaks the subset of Runware's
wire protocol the provider uses (see `server`). One job per module:

* `config`  what one process serves (`ExecutorConfig`) and the weights id reported in /health
* `tasks`   the task table and image store (memory, or `--output-dir` to survive restarts)
* `queues`  one queue and one thread per device; batching of compatible images
* `metrics` counters in Prometheus text format
* `transport` the HTTP/1.1 server (h11 on asyncio); the test kit's Runware stand-in builds on it
* `server`  HTTP routes, auth, the wire protocol, delivery (webhooks, uploads), SIGTERM drain
* `cli`     the `zimage-executor` console script

Planning, pipelines and encoding are `airflow_provider_zimage.local`'s: nothing is written twice.
"""
