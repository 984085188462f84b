"""One task instance's work, never paying twice: what is reused, submitted, waited for and stored.

* `generation`     `GenerationJob`: one request's reuse / submit / store / manifest (operator and sensor)
* `ledger`         deterministic taskUUIDs and the submission ledger (intent -> submitted -> stored)
* `batch_ledger`   `BatchLedger`: one taskUUID per request of a batch, `_zimage_batch.json`
* `waiting`        the in-process wait; `end_try`: an outcome applied to the ledger, as Airflow exception
* `content_index`  reuse="content": per-fingerprint index under the output path, verified copies
* `uploads`        reading the objects Runware PUT to `uploadEndpoint` back
* `batch`          `BatchJob`: a whole batch (chunks, in-flight window, waiting, storing), given
                   `BatchSettings`
* `arguments`      the operators' request arguments -> `ImageInferenceRequest`; secrets refused
* `delivery`       the webhook / upload fields a request is finished with, in one place

Nothing is imported here.
"""
