"""Runware webhooks: per-task tokens (`tokens`), the receiving app (`app`) and its plugin (`plugin`).

Nothing is imported here: the operator imports `tokens` on workers, which must not pull in FastAPI.
"""
