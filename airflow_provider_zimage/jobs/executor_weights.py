"""The weights a zimage-executor reports (`GET /health`) as part of a picture's fingerprint origin.

Retrained or swapped weights behind the same model or ControlNet id make another picture: neither a
retry nor reuse="content" may hand back images made with the old ones. Both operators read the
executor's answer here, once per task (a batch asks once, not once per row).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_zimage.compat import AirflowException, AirflowFailException
from airflow_provider_zimage.exceptions import ZImageError
from airflow_provider_zimage.hooks.runware import ZImageHook
from airflow_provider_zimage.runware.models import ImageInferenceRequest


@dataclass(frozen=True)
class ExecutorWeights:
    """What one `/health` answer says: the weights id behind each model and each ControlNet id."""

    conn_id: str
    models: Mapping[str, Any]
    control_nets: Mapping[str, Any]

    @classmethod
    def from_health(cls, conn_id: str, health: Mapping[str, Any]) -> ExecutorWeights:
        # ControlNets are listed by executors since 0.2; an older one lists none.
        return cls(
            conn_id,
            {str(m.get("model")): m.get("weights") for m in health.get("models") or []},
            {str(m.get("model")): m.get("weights") for m in health.get("controlNets") or []},
        )

    def origin(self, request: ImageInferenceRequest, where: str = "") -> str:
        """The connection, the model's weights and those of each ControlNet the request names.

        A model the executor does not serve fails the task before anything is sent (`where` names the
        row of a batch). A ControlNet id it does not list is refused by the executor itself.
        """
        air = request.spec.air
        if air not in self.models:
            raise AirflowFailException(
                f"{where}model: the executor of connection {self.conn_id!r} does not serve {air} "
                f"(it serves {', '.join(self.models) or 'nothing'})"
            )
        origin = f"{self.conn_id}|{self.models[air]}"
        for index, entry in enumerate(request.control_net or []):
            origin += f"|controlNet[{index}]={self.control_nets.get(str(entry.model))}"
        return origin


def executor_weights(conn_id: str) -> ExecutorWeights:
    """Ask the executor of `conn_id` once. Unreachable: the try fails and a retry asks again."""
    try:
        health = ZImageHook(conn_id).executor_health()
    except ZImageError as exc:
        raise AirflowException(f"the executor of connection {conn_id!r}: {exc}") from None
    return ExecutorWeights.from_health(conn_id, health)
