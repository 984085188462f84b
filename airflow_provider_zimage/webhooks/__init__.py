"""Runware webhooks: per-task tokens (`tokens`), the receiving app (`app`), its plugin (`plugin`) and the
inbox they fill and the triggers read (`inbox`: accepted items on object storage, per connection).

Nothing is imported here: the operator imports `tokens` and the triggers `inbox` on workers and the
triggerer, which must not pull in FastAPI.
"""
