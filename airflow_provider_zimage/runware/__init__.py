"""The Runware wire, sans-IO: what is sent and what an answer means; no network, no Airflow, no storage.

* `models`    pydantic request/result models (wire names), the model catalogue, limits and cost estimate
* `protocol`  request arrays, response parsing, error classification, retry and poll timing
* `outcomes`  the decision table: what an answer means (STORE / WAIT / RETRY / FAIL / REGENERATE), `TaskWait`

Nothing is imported here, so `import airflow_provider_zimage.runware.protocol` loads only what it needs.
"""
