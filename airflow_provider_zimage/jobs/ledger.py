"""Never pay twice: deterministic taskUUIDs and a submission ledger that outlives XCom.

Every Runware submission costs money, and Airflow re-runs work: retries, a worker killed after submit,
a restarted triggerer, a cleared task, a re-run backfill. The defence has three layers:

1. The taskUUID is derived from (dag_id, task_id, run_id, map_index, request fingerprint, generation),
   so a re-sent submission carries the same id and Runware answers `conflictTaskUUID` instead of
   generating (and billing) a second image.
2. The ledger records the intent *before* submitting and the submission *after*, next to the artifacts
   on object storage (XCom is cleared on retry; object storage is not). The next try reads it first and
   reattaches through `getResponse`.
3. The manifest, written last, makes a finished task's re-run return the stored images without a call.

A task that failed at Runware (or whose results expired) moves to the next *generation*, which derives
a new taskUUID: that is the one case where paying again is the point.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from airflow_provider_zimage.storage.artifacts import ZImageStorageError, read_json, write_json_atomic

log = logging.getLogger(__name__)

STATE_FILE = "_zimage_state.json"
STATE_VERSION = 1

SubmissionStatus = Literal["intent", "submitted", "failed", "stored"]


class _Document(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


L = TypeVar("L", bound=_Document)


def derive_task_uuid(
    *, dag_id: str, task_id: str, run_id: str, map_index: int, fingerprint: str, generation: int
) -> str:
    """A UUID v4-formatted id that is the same every time the same task instance asks for the same image."""
    material = "\x1f".join([dag_id, task_id, run_id, str(map_index), fingerprint, str(generation)])
    digest = hashlib.sha256(material.encode()).digest()[:16]
    return str(uuid.UUID(bytes=digest, version=4))


def job_fingerprint(request_fingerprint: str, *, backend: str, origin: str | None) -> str:
    """What decides "same image": the request, and who makes it. `origin` is the Runware connection
    (another account must never reattach to results billed elsewhere) or the local model's weights
    (switching from test weights to real ones must not return the old images)."""
    material = "\x1f".join([request_fingerprint, backend, origin or ""])
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass
class Submission:
    """One generation of one request fingerprint, as recorded on object storage."""

    fingerprint: str
    generation: int
    task_uuid: str
    status: SubmissionStatus
    expected_results: int = 1
    updated_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    reason: str | None = None
    # Epoch seconds of the first accepted submission: waits are measured from here, so a retry that
    # reattaches does not get a fresh timeout (None in ledgers written by 0.1.0).
    submitted_at: float | None = None
    # The request as sent, without its taskUUID and delivery URLs (credentials): what was paid for. A
    # resumed or retried try stores this request's image even when the DAG's templates now render
    # another request (`{{ macros.random() }}`). None in ledgers written before 0.2.0.
    request: dict[str, Any] | None = None
    # The operator's arguments before rendering (see `generation.GenerationJob`): equal digests with
    # different fingerprints mean a template that renders differently, not a DAG that was edited.
    arguments: str | None = None


@dataclass
class Ledger:
    """The submission record of one task instance (dag/task/run/map index), one entry per fingerprint.

    Keeping every fingerprint (not only the latest) means a prompt changed and changed back still finds
    its earlier generation instead of reusing a taskUUID whose results may have expired.
    """

    # The task instance's identity repeats BatchLedger's on purpose: two file schemas, versioned apart
    # (STATE_VERSION, BATCH_STATE_VERSION); their file store is shared (JsonLedgerStore).
    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    submissions: dict[str, Submission] = field(default_factory=dict)
    version: int = STATE_VERSION

    def current(self, fingerprint: str) -> Submission | None:
        return self.submissions.get(fingerprint)

    def find(self, task_uuid: str) -> Submission | None:
        """The submission that carries `task_uuid`, whichever request it was made for."""
        return next((s for s in self.submissions.values() if s.task_uuid == task_uuid), None)

    def latest_from(self, arguments: str) -> Submission | None:
        """The most recent submission made from the same unrendered arguments."""
        made = [s for s in self.submissions.values() if s.arguments == arguments]
        return max(made, key=lambda s: s.updated_at, default=None)

    def adopt(self, fingerprint: str, legacy: list[str]) -> None:
        """File a submission recorded under an earlier release's fingerprint under today's one.

        Upgrading must not pay again: the taskUUID recorded by 0.1.0 is kept, only its key changes.
        """
        if fingerprint in self.submissions:
            return
        for old in legacy:
            previous = self.submissions.pop(old, None)
            if previous is not None:
                previous.fingerprint = fingerprint
                self.submissions[fingerprint] = previous
                return

    def new_submission(self, fingerprint: str, expected_results: int, *, fresh: bool = False) -> Submission:
        """The submission to make now: the recorded one when it can be reattached, else a new generation.

        `fresh` (force=True, or a stored result that is gone) always moves to the next generation.
        """
        previous = self.submissions.get(fingerprint)
        if previous is not None and not fresh and previous.status in ("intent", "submitted"):
            return previous
        generation = 0 if previous is None else previous.generation + 1
        task_uuid = derive_task_uuid(
            dag_id=self.dag_id,
            task_id=self.task_id,
            run_id=self.run_id,
            map_index=self.map_index,
            fingerprint=fingerprint,
            generation=generation,
        )
        return Submission(fingerprint, generation, task_uuid, "intent", expected_results)

    def record(self, submission: Submission, status: SubmissionStatus, reason: str | None = None) -> None:
        submission.status = status
        submission.reason = reason
        submission.updated_at = datetime.now(timezone.utc).isoformat()
        if status == "submitted" and submission.submitted_at is None:
            submission.submitted_at = time.time()
        self.submissions[submission.fingerprint] = submission

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["submissions"] = {k: asdict(v) for k, v in self.submissions.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ledger:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported ledger version {data.get('version')!r} (this provider writes 1)")
        subs = {k: Submission(**v) for k, v in (data.get("submissions") or {}).items()}
        return cls(
            dag_id=data["dag_id"],
            task_id=data["task_id"],
            run_id=data["run_id"],
            map_index=int(data["map_index"]),
            submissions=subs,
        )


class JsonLedgerStore(Generic[L]):
    """Reads and writes one ledger file in a task instance's artifact directory, atomically.

    Shared by the one-request ledger (`LedgerStore`) and the batch ledger (`batch_state`): both are a
    versioned JSON document named by the task instance, and both start over when it is unreadable.
    """

    #: The file's name in the artifact directory; what the warning calls it; its JSON indentation.
    file_name: ClassVar[str]
    description: ClassVar[str]
    indent: ClassVar[int | None] = 2

    def __init__(self, directory: Any) -> None:
        self.path = directory / self.file_name

    def empty(self, dag_id: str, task_id: str, run_id: str, map_index: int) -> L:
        raise NotImplementedError

    def parse(self, data: dict[str, Any]) -> L:
        raise NotImplementedError

    def load(self, *, dag_id: str, task_id: str, run_id: str, map_index: int) -> L:
        try:
            data = read_json(self.path)
            if data is None:
                return self.empty(dag_id, task_id, run_id, map_index)
            return self.parse(data)
        except (KeyError, TypeError, ValueError, ZImageStorageError) as exc:
            # Refusing to run would block the task forever; starting over can at worst resubmit, and the
            # deterministic taskUUIDs then still turn a duplicate into `conflictTaskUUID`.
            log.warning("ignoring unreadable %s %s: %s", self.description, self.path, exc)
            return self.empty(dag_id, task_id, run_id, map_index)

    def save(self, ledger: L) -> None:
        write_json_atomic(self.path, ledger.to_dict(), indent=self.indent)


class LedgerStore(JsonLedgerStore[Ledger]):
    """The submission ledger of one task instance (`_zimage_state.json`)."""

    file_name = STATE_FILE
    description = "submission ledger"

    def empty(self, dag_id: str, task_id: str, run_id: str, map_index: int) -> Ledger:
        return Ledger(dag_id, task_id, run_id, map_index)

    def parse(self, data: dict[str, Any]) -> Ledger:
        return Ledger.from_dict(data)
