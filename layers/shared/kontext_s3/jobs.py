"""The jobs table: one item per upload, the only thing that stops a second paid request.

States::

    SUBMITTING --(fal accepted)--> SUBMITTED --(webhook / recovery)--> COMPLETED | FAILED
    SUBMITTING --(bad tags, 4xx, retries exhausted)--> FAILED
    SUBMITTING --(we may have sent it, no answer)--> UNCERTAIN --> COMPLETED | FAILED

A worker holds a *lease* (``lease_until_ms``) while it talks to fal. A second
delivery of the same upload finds the item and does nothing while the lease is
held; a retry after a transient fault finds the lease released and takes it.
A lease that expired without being released means its worker died, perhaps
mid-request, so the job becomes UNCERTAIN instead of being sent again: fal has
no idempotency key, and we never pay twice for one upload.

Every transition is a conditional write, so two workers can't both win. Each
write also stamps a fresh ``last_writer`` token: when the SDK retries a write
whose first attempt landed but whose answer was lost, the retry fails its own
condition, and the token tells "my write landed" from "someone else's did". While
a job is open it carries ``open_state``/``open_since``, the keys of the sparse
``open-jobs`` index the recovery function reads; ending a job removes them.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

OPEN_JOBS_INDEX = "open-jobs"


class JobState(StrEnum):
    SUBMITTING = "SUBMITTING"
    SUBMITTED = "SUBMITTED"
    UNCERTAIN = "UNCERTAIN"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def ended(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED)


class HistoryEntry(BaseModel):
    state: JobState
    at: str
    note: str = ""


class Job(BaseModel):
    """A job item as stored (numbers come back from DynamoDB as Decimal; pydantic makes them ints)."""

    model_config = ConfigDict(extra="ignore", use_enum_values=False)

    job_id: str
    state: JobState
    bucket: str
    key: str
    version_id: str | None = None
    etag: str | None = None
    sequencer: str | None = None
    event_time: str | None = None
    output_prefix: str
    created_at: str
    updated_at: str
    attempts: int = 0
    lease_until_ms: int | None = None
    request_id: str | None = None
    gateway_request_id: str | None = None
    status_url: str | None = None
    response_url: str | None = None
    cancel_url: str | None = None
    input_json: str | None = None
    submitted_at_ms: int | None = None
    ended_at_ms: int | None = None
    output_keys: list[str] = Field(default_factory=list)
    manifest_key: str | None = None
    error_key: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    failure_retryable: bool = False
    notified: bool = False
    last_writer: str | None = None
    history: list[HistoryEntry] = Field(default_factory=list)

    @property
    def sent_input(self) -> dict[str, Any] | None:
        return json.loads(self.input_json) if self.input_json else None


class JobConflict(RuntimeError):
    """The job was not in the state a transition expects (another worker got there first)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobStore:
    def __init__(self, table: Table, *, ttl_days: int = 30) -> None:
        self._table = table
        self._ttl_seconds = ttl_days * 86400

    # -- reads -----------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        item = self._table.get_item(Key={"job_id": job_id}, ConsistentRead=True).get("Item")
        return Job.model_validate(_plain(item)) if item else None

    def open_jobs(self, state: JobState, opened_before_ms: int, limit: int = 100) -> list[Job]:
        """Jobs still in ``state`` that entered it before ``opened_before_ms`` (oldest first)."""
        jobs: list[Job] = []
        kwargs: dict[str, Any] = {
            "IndexName": OPEN_JOBS_INDEX,
            "KeyConditionExpression": Key("open_state").eq(state.value) & Key("open_since").lt(opened_before_ms),
        }
        while len(jobs) < limit:
            page = self._table.query(**kwargs)
            jobs.extend(Job.model_validate(_plain(item)) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return jobs[:limit]

    # -- submit side -----------------------------------------------------------

    def create(
        self,
        *,
        job_id: str,
        bucket: str,
        key: str,
        version_id: str | None,
        etag: str | None,
        sequencer: str | None,
        event_time: str | None,
        output_prefix: str,
        lease_ms: int,
    ) -> Job | None:
        """Create the job, leased to the caller; ``None`` when it already exists."""
        at = now_ms()
        writer = uuid.uuid4().hex
        item: dict[str, Any] = {
            "job_id": job_id,
            "last_writer": writer,
            "state": JobState.SUBMITTING.value,
            "bucket": bucket,
            "key": key,
            "output_prefix": output_prefix,
            "created_at": iso(at),
            "updated_at": iso(at),
            "attempts": 1,
            "lease_until_ms": at + lease_ms,
            "open_state": JobState.SUBMITTING.value,
            "open_since": at,
            "expires_at": at // 1000 + self._ttl_seconds,
            "history": [{"state": JobState.SUBMITTING.value, "at": iso(at), "note": "upload seen"}],
        }
        item.update(
            {k: v for k, v in (("version_id", version_id), ("etag", etag), ("sequencer", sequencer), ("event_time", event_time)) if v}
        )
        try:
            self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(job_id)")
        except ClientError as exc:
            if _conditional_failure(exc):
                return self._if_mine(job_id, writer)
            raise
        return Job.model_validate(item)

    def claim(self, job_id: str, *, lease_ms: int) -> Job | None:
        """Take the lease of a job whose last worker released it, or that failed retryably."""
        at = now_ms()
        return self._transition(
            job_id,
            JobState.SUBMITTING,
            note="retrying submit",
            condition="(#state = :submitting AND attribute_not_exists(lease_until_ms)) OR (#state = :failed AND failure_retryable = :true)",
            values={
                ":submitting": "SUBMITTING",
                ":failed": "FAILED",
                ":true": True,
                ":lease": at + lease_ms,
                ":open": "SUBMITTING",
                ":since": at,
            },
            sets="lease_until_ms = :lease, attempts = attempts + :one, open_state = :open, open_since = :since",
            removes=("failure_retryable", "error_code", "error_message", "error_key", "ended_at_ms"),
            extra_values={":one": 1},
            at=at,
        )

    def release(self, job_id: str, lease_until_ms: int, *, reason: str) -> None:
        """Give the lease back after a fault that certainly did not reach fal."""
        self._transition(
            job_id,
            JobState.SUBMITTING,
            note=f"will retry: {reason}",
            condition="#state = :submitting AND lease_until_ms = :lease",
            values={":submitting": "SUBMITTING", ":lease": lease_until_ms, ":reason": reason[:1000]},
            sets="error_message = :reason",
            removes=("lease_until_ms",),
        )

    def mark_uncertain(self, job_id: str, lease_until_ms: int, *, reason: str) -> Job | None:
        at = now_ms()
        return self._transition(
            job_id,
            JobState.UNCERTAIN,
            note=reason,
            condition="#state = :submitting AND lease_until_ms = :lease",
            values={":submitting": "SUBMITTING", ":lease": lease_until_ms, ":open": "UNCERTAIN", ":since": at, ":reason": reason[:1000]},
            sets="open_state = :open, open_since = :since, error_message = :reason",
            removes=("lease_until_ms",),
            at=at,
        )

    def mark_submitted(
        self,
        job_id: str,
        *,
        request_id: str,
        gateway_request_id: str | None,
        status_url: str,
        response_url: str,
        cancel_url: str,
        input_json: str,
    ) -> Job:
        at = now_ms()
        job = self._transition(
            job_id,
            JobState.SUBMITTED,
            note=f"fal request {request_id}",
            # A worker whose lease lapsed mid-request may find its job UNCERTAIN: the
            # request id it now holds is the truth, so it is recorded all the same.
            condition="#state IN (:submitting, :uncertain) AND attribute_not_exists(request_id)",
            values={
                ":submitting": "SUBMITTING",
                ":uncertain": "UNCERTAIN",
                ":rid": request_id,
                ":gid": gateway_request_id or request_id,
                ":status": status_url,
                ":response": response_url,
                ":cancel": cancel_url,
                ":input": input_json,
                ":at": at,
                ":open": "SUBMITTED",
            },
            sets=(
                "request_id = :rid, gateway_request_id = :gid, status_url = :status, response_url = :response, "
                "cancel_url = :cancel, input_json = :input, submitted_at_ms = :at, open_state = :open, open_since = :at"
            ),
            removes=("lease_until_ms", "error_message"),
            at=at,
            strict=True,
        )
        assert job is not None
        return job

    def adopt_request(self, job_id: str, request_id: str) -> Job | None:
        """An UNCERTAIN job's webhook arrived: fal did accept it, under this request id."""
        at = now_ms()
        return self._transition(
            job_id,
            JobState.SUBMITTED,
            note=f"fal request {request_id} (learned from its webhook)",
            condition="#state = :uncertain AND attribute_not_exists(request_id)",
            values={":uncertain": "UNCERTAIN", ":rid": request_id, ":open": "SUBMITTED", ":at": at},
            sets="request_id = :rid, open_state = :open, open_since = :at, submitted_at_ms = :at",
            removes=("error_message",),
            at=at,
        )

    # -- endings ---------------------------------------------------------------

    def complete(self, job_id: str, *, output_keys: list[str], manifest_key: str) -> Job | None:
        """End a job with its outputs; ``None`` when it had already ended."""
        at = now_ms()
        return self._transition(
            job_id,
            JobState.COMPLETED,
            note=f"{len(output_keys)} image(s) written",
            condition="#state IN (:submitted, :uncertain)",
            values={":submitted": "SUBMITTED", ":uncertain": "UNCERTAIN", ":keys": output_keys, ":manifest": manifest_key, ":at": at},
            sets="output_keys = :keys, manifest_key = :manifest, ended_at_ms = :at",
            removes=("open_state", "open_since", "lease_until_ms", "error_code", "error_message", "error_key"),
            at=at,
        )

    def fail(
        self,
        job_id: str,
        *,
        code: str,
        message: str,
        error_key: str,
        retryable: bool = False,
        from_states: tuple[JobState, ...] = (JobState.SUBMITTING, JobState.SUBMITTED, JobState.UNCERTAIN),
    ) -> Job | None:
        """End a job as failed; ``None`` when it was not in one of ``from_states``.

        ``retryable`` marks failures that never reached fal (retries exhausted), so a
        message redriven from the DLQ may take the job up again.
        """
        at = now_ms()
        names = {f":from{i}": s.value for i, s in enumerate(from_states)}
        return self._transition(
            job_id,
            JobState.FAILED,
            note=f"{code}: {message}"[:1000],
            condition=f"#state IN ({', '.join(names)})",
            values={**names, ":code": code, ":msg": message[:4000], ":ekey": error_key, ":retry": retryable, ":at": at},
            sets="error_code = :code, error_message = :msg, error_key = :ekey, failure_retryable = :retry, ended_at_ms = :at",
            removes=("open_state", "open_since", "lease_until_ms"),
            at=at,
        )

    def mark_notified(self, job_id: str) -> None:
        self._table.update_item(
            Key={"job_id": job_id},
            UpdateExpression="SET notified = :true",
            ExpressionAttributeValues={":true": True},
        )

    # -- plumbing ----------------------------------------------------------------

    def _if_mine(self, job_id: str, writer: str) -> Job | None:
        """After a failed condition: the job, if the write that changed it was ours (a retried write)."""
        current = self.get(job_id)
        return current if current is not None and current.last_writer == writer else None

    def _transition(
        self,
        job_id: str,
        state: JobState,
        *,
        note: str,
        condition: str,
        values: dict[str, Any],
        sets: str = "",
        removes: tuple[str, ...] = (),
        extra_values: dict[str, Any] | None = None,
        at: int | None = None,
        strict: bool = False,
    ) -> Job | None:
        at = at or now_ms()
        writer = uuid.uuid4().hex
        entry = {"state": state.value, "at": iso(at), "note": note[:1000]}
        expression = (
            "SET #state = :new_state, updated_at = :updated, last_writer = :writer, "
            "history = list_append(if_not_exists(history, :empty), :entry)"
        )
        if sets:
            expression += ", " + sets
        if removes:
            expression += " REMOVE " + ", ".join(removes)
        try:
            result = self._table.update_item(
                Key={"job_id": job_id},
                UpdateExpression=expression,
                ConditionExpression=f"attribute_exists(job_id) AND ({condition})",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    ":new_state": state.value,
                    ":updated": iso(at),
                    ":writer": writer,
                    ":empty": [],
                    ":entry": [entry],
                    **values,
                    **(extra_values or {}),
                },
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if _conditional_failure(exc):
                mine = self._if_mine(job_id, writer)
                if mine is not None:
                    return mine
                if strict:
                    raise JobConflict(f"job {job_id}: cannot move to {state.value} from its current state") from exc
                return None
            raise
        return Job.model_validate(_plain(result["Attributes"]))


def _conditional_failure(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def _plain(value: Any) -> Any:
    """DynamoDB's Decimals as ints/floats, recursively."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
