"""`ZImageTaskSensor`: wait for a Runware task submitted elsewhere, then store it like the operator.

Typical pairing: `ZImageGenerateOperator(wait_for_completion=False)` returns the taskUUID, and this
sensor (templated `task_uuid`) waits in poke, reschedule or deferrable mode. Poke calls the same hook
method the trigger awaits, so all three modes see Runware the same way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_provider_zimage.compat import AirflowException, AirflowFailException, conf
from airflow_provider_zimage.config import deferral_settle_seconds
from airflow_provider_zimage.exceptions import ZImageError, ZImagePermanentError
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.jobs.generation import GenerationJob, NsfwPolicy, TaskInstanceRef
from airflow_provider_zimage.jobs.waiting import (
    end_try,
    stored_later,
    wait_in_process,
)
from airflow_provider_zimage.runware.models import ImageInferenceRequest, ImageResult
from airflow_provider_zimage.runware.outcomes import Action, TaskWait
from airflow_provider_zimage.storage.artifacts import ArtifactStore, default_output_path
from airflow_provider_zimage.triggers.task import TaskEvent, ZImageTaskTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context


class ZImageTaskSensor(BaseSensorOperator):
    """Waits for `task_uuid` to finish at Runware, stores its images and returns the manifest entries.

    :param task_uuid: the Runware taskUUID (templated, e.g. `{{ ti.xcom_pull('submit') }}`).
    :param expected_results: numberResults of that task.
    :param model: recorded in the manifest (the sensor does not see the request).
    :param output_format: the task's outputFormat, if known: only compared with what arrives (a
        mismatch is logged). Files are named and recorded by the format the bytes actually have.
    """

    template_fields: Sequence[str] = ("task_uuid", "output_path", "zimage_conn_id")

    def __init__(
        self,
        *,
        task_uuid: str,
        zimage_conn_id: str = ZImageHook.default_conn_name,
        expected_results: int = 1,
        model: str = "runware:z-image@turbo",
        output_format: str | None = None,
        output_path: str | None = None,
        on_nsfw: NsfwPolicy = "fail",
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_poll_interval: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.task_uuid = task_uuid
        self.zimage_conn_id = zimage_conn_id
        self.expected_results = expected_results
        self.model = model
        self.output_format = output_format
        self.output_path = output_path
        self.on_nsfw = on_nsfw
        self.deferrable = deferrable
        self.max_poll_interval = max_poll_interval

    def _job(self, context: Context) -> GenerationJob:
        # The request is not known here; the manifest records what the sensor knows. The fingerprint is
        # then the taskUUID's, so a re-run of the sensor reuses what it stored.
        request = ImageInferenceRequest.build(
            model=self.model,
            positive_prompt=f"taskUUID {self.task_uuid}",
            number_results=self.expected_results,
            output_format=self.output_format,
            task_uuid=self.task_uuid,
        )
        return GenerationJob(
            TaskInstanceRef.from_context(context),
            request,
            backend="runware",
            origin=self.zimage_conn_id,
            store=ArtifactStore(self.output_path or default_output_path()),
            on_nsfw=self.on_nsfw,
        )

    def _refuse_synchronous_backends(self) -> None:
        """An OpenAI images server answers with the image on the request itself: there is no task id
        for anyone to hand over, and nothing to wait for."""
        try:
            backend = ZImageHook(self.zimage_conn_id).settings.backend
        except Exception:  # no connection: the wait says so in its own words
            return
        if backend == "openai_images":
            raise AirflowFailException(
                f"ZImageTaskSensor does not apply to connection {self.zimage_conn_id!r} (backend "
                "openai_images): the OpenAI images API answers with the image and has no task id to wait "
                "for; ZImageGenerateOperator and ZImageBatchGenerateOperator make and store the images"
            )

    def execute(self, context: Context) -> Any:
        self._refuse_synchronous_backends()
        images = self._job(context).reusable_images()
        if images is not None:
            self.log.info("Images of task %s are already stored: returning them", self.task_uuid)
            return images
        if not self.deferrable:
            return super().execute(context)
        # Look once before deferring: a task that is already done needs no trigger.
        looked = self.poke(context)
        if looked.is_done:
            return looked.xcom_value
        self.defer(
            trigger=ZImageTaskTrigger(
                task_uuid=self.task_uuid,
                zimage_conn_id=self.zimage_conn_id,
                expected_results=self.expected_results,
                deadline=time.time() + float(self.timeout),
                poll_interval=float(self.poke_interval),
                max_poll_interval=self.max_poll_interval,
                not_before=time.time() + deferral_settle_seconds(),
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=float(self.timeout) + 60),
        )

    def poke(self, context: Context) -> PokeReturnValue:
        # Poke mode keeps the wait between pokes (partial results, failed polls in a row); reschedule
        # mode starts each poke afresh, bounded by the sensor's timeout instead.
        wait = self._wait = getattr(self, "_wait", None) or TaskWait(self.task_uuid, self.expected_results)
        with ZImageHook(self.zimage_conn_id) as hook:
            outcome = wait_in_process(hook, wait, until=time.time())
            if outcome.action is Action.WAIT:
                self.log.info("Task %s: %s", self.task_uuid, outcome.message or "not finished")
                return PokeReturnValue(is_done=False)
            if outcome.action is Action.STORE:
                return PokeReturnValue(
                    is_done=True, xcom_value=self._store(context, wait.status.results, hook)
                )
        end_try(self._job(context), self.task_uuid, outcome)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        try:
            parsed = TaskEvent.model_validate(event)
        except Exception as exc:
            raise AirflowException(f"malformed event from ZImageTaskTrigger: {exc}") from None
        if parsed.task_uuid != self.task_uuid:
            raise AirflowException(f"event for task {parsed.task_uuid} does not match {self.task_uuid}")
        outcome = parsed.to_outcome()
        if outcome.action is not Action.STORE:
            end_try(self._job(context), self.task_uuid, outcome)
        if parsed.refetch:
            # Image bytes stay out of trigger events: ask again (free) and read it the same way.
            return self.poke(context).xcom_value
        results = [ImageResult.from_wire(r) for r in parsed.results]
        with ZImageHook(self.zimage_conn_id) as hook:
            return self._store(context, results, hook)

    def _store(self, context: Context, results: list[ImageResult], hook: ZImageHook) -> list[dict[str, Any]]:
        try:
            return self._job(context).store_results(results, hook.download, task_uuid=self.task_uuid)
        except ZImagePermanentError as exc:
            raise AirflowFailException(str(exc)) from None
        except ZImageError as exc:
            raise AirflowException(stored_later(self.task_uuid, exc)) from None
