"""The jobs table: one item per job, the only thing that stops a second paid request.

States::

    SUBMITTING --(no slot, or no budget today)--> WAITING --(its turn)--> SUBMITTING
    SUBMITTING --(sent)--> SENDING --(fal accepted)--> SUBMITTED --(webhook / recovery)--> COMPLETED | FAILED
         |                    |--(fal certainly does not hold it)--> SUBMITTING (sent again later)
         |                    |--(fal refused it: 4xx)--> FAILED
         |                    '--(anything else)--> UNCERTAIN --(webhook / recovery)--> COMPLETED | FAILED
         '--(bad tags, bad object, retries exhausted before sending)--> FAILED
    SUBMITTED --(fal could not start it before its start timeout)--> WAITING (sent again, with a fresh URL)

**Every change of state is one conditional write that says whether this caller
won**; only the winner does what follows (copies files, notifies). A caller
*holds* a job (``holder`` token, ``held_until_ms``) while it works on it: the
submit function from creating the job to fal's answer, a finisher (webhook,
recovery, cancellation) from its claim to the job's end. A hold that lapsed
means its holder died; another caller may then take it over. SENDING is the
point of no return: the request may be at fal from then on, so a lapsed hold on
a SENDING job makes it UNCERTAIN, never SUBMITTING again. Only
:meth:`JobStore.not_enqueued`, given fal's definite answer, leads back.

Every write also stamps a fresh ``last_writer`` token: when the SDK retries a
write whose first attempt landed but whose answer was lost, the retry fails its
own condition, and the token tells "my write landed" from "someone else's did".

Open jobs carry ``open_shard`` (``<STATE>#<n>``) and ``open_order`` (when the
job was last looked at), the keys of the sparse, sharded ``open-jobs`` index:
the recovery function reads the least recently checked jobs of each state
first, and marks each one it checks, so it rotates through any backlog. A
WAITING job's order is its arrival, so the oldest upload waiting goes first. Ended
jobs leave the index, except those whose event is still to be published
(``NOTIFY#<n>``).
"""

from __future__ import annotations

import heapq
import json
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field

from kontext_s3 import table_keys

if TYPE_CHECKING:
    from kontext_s3.dynamo import TableLike

OPEN_JOBS_INDEX = "open-jobs"
#: Partitions per open state in the index; a job's shard comes from its id.
OPEN_SHARDS = 8
NOTIFY = "NOTIFY"
_NOTE_CHARS = 500


class JobState(StrEnum):
    WAITING = "WAITING"
    SUBMITTING = "SUBMITTING"
    SENDING = "SENDING"
    SUBMITTED = "SUBMITTED"
    UNCERTAIN = "UNCERTAIN"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"

    @property
    def ended(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED)


#: States a finisher may claim: fal has (or may have) the request.
AT_FAL = (JobState.SUBMITTED, JobState.UNCERTAIN)


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
    arrived_at_ms: int | None = None
    #: Fingerprint of the edit this job was made for (``job_id.edit_mark``); None for jobs from before re-runs.
    edit_mark: str | None = None
    #: Its place in the open-jobs index: for a WAITING job, its place in line.
    open_order: int | None = None
    holder: str | None = None
    held_until_ms: int | None = None
    request_id: str | None = None
    gateway_request_id: str | None = None
    status_url: str | None = None
    response_url: str | None = None
    cancel_url: str | None = None
    input_json: str | None = None
    #: The folder recipe the edit came from (``recipes.Recipe.describe``), as JSON; None without one.
    recipe_json: str | None = None
    #: The input image as found and as prepared for fal (``submit``), as JSON.
    image_json: str | None = None
    sent_at_ms: int | None = None
    admitted_at_ms: int | None = None
    #: Admission (see ``admission``): the slot held, and the UTC day and images charged to the budget.
    slot: int | None = None
    budget_day: str | None = None
    budget_images: int | None = None
    #: Taken from the line (it has no SQS message): if its taker dies, recovery puts it back in line.
    from_line: bool = False
    #: While WAITING: for what ("slot" or "budget"), and until when (budget).
    wait_reason: str | None = None
    wait_until_ms: int | None = None
    #: The image's type, kept while it waits, so its turn does not read the object again.
    content_type: str | None = None
    queue_position: int | None = None
    uncertain_since_ms: int | None = None
    submitted_at_ms: int | None = None
    ended_at_ms: int | None = None
    output_keys: list[str] = Field(default_factory=list)
    manifest_key: str | None = None
    error_key: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    failure_retryable: bool = False
    #: An error record was written for this job at some point (a later success removes it).
    error_written: bool = False
    notified_at_ms: int | None = None
    last_writer: str | None = None
    history: list[HistoryEntry] = Field(default_factory=list)

    @property
    def recipe(self) -> dict[str, Any] | None:
        return json.loads(self.recipe_json) if self.recipe_json else None

    @property
    def image(self) -> dict[str, Any] | None:
        """The input image as found (size, orientation) and what preparing it for fal changed."""
        return json.loads(self.image_json) if self.image_json else None

    @property
    def sent_input(self) -> dict[str, Any] | None:
        return json.loads(self.input_json) if self.input_json else None

    def held_by(self, holder: str) -> bool:
        return self.holder == holder

    def hold_lapsed(self, at_ms: int | None = None) -> bool:
        return self.holder is not None and (self.held_until_ms or 0) < (at_ms if at_ms is not None else now_ms())


@dataclass(frozen=True)
class Claim:
    """A finisher's hold on a job. ``took_over`` when an earlier holder's hold had lapsed (it may have left files)."""

    job: Job
    holder: str
    took_over: bool


class JobConflict(RuntimeError):
    """The job was not in the state a transition expects (another caller got there first)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_holder() -> str:
    return uuid.uuid4().hex


def shard_of(job_id: str) -> int:
    try:
        return int(job_id[:4], 16) % OPEN_SHARDS
    except ValueError:
        return sum(job_id.encode()) % OPEN_SHARDS


def open_shard(state: str, job_id: str) -> str:
    return f"{state}#{shard_of(job_id)}"


class JobStore:
    def __init__(self, table: TableLike, *, ttl_days: int = 30) -> None:
        self.table = table
        self._table = table
        self._ttl_seconds = ttl_days * 86400

    # -- reads -----------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        item = self._table.get_item(Key={"job_id": job_id}, ConsistentRead=True).get("Item")
        return Job.model_validate(_plain(item)) if item else None

    def open_job_ids(self, state: str, *, checked_before_ms: int, limit: int = 100) -> list[str]:
        """Ids of jobs in ``state`` (or ``NOTIFY``) least recently checked first, all last checked before ``checked_before_ms``."""

        def shard_head(shard: int) -> list[tuple[int, str]]:
            page = self._table.query(
                IndexName=OPEN_JOBS_INDEX,
                KeyConditionExpression="open_shard = :shard AND open_order < :before",
                ExpressionAttributeValues={":shard": f"{state}#{shard}", ":before": checked_before_ms},
                Limit=limit,
            )
            return [(int(item["open_order"]), str(item["job_id"])) for item in page.get("Items", [])]

        # The shards are read at once: one query's latency, not eight.
        with ThreadPoolExecutor(max_workers=OPEN_SHARDS, thread_name_prefix="open-jobs") as pool:
            heads = list(pool.map(shard_head, range(OPEN_SHARDS)))
        return [job_id for _, job_id in heapq.merge(*heads)][:limit]

    def waiting_ahead(self, job: Job) -> int:
        """How many uploads wait in line before ``job`` (for people following it; one count query per shard)."""
        if job.state is not JobState.WAITING or job.open_order is None:
            return 0

        def count(shard: int) -> int:
            total, start = 0, None
            while True:
                page = self._table.query(
                    IndexName=OPEN_JOBS_INDEX,
                    KeyConditionExpression="open_shard = :shard AND open_order < :mine",
                    ExpressionAttributeValues={":shard": f"{JobState.WAITING.value}#{shard}", ":mine": job.open_order},
                    Select="COUNT",
                    **({"ExclusiveStartKey": start} if start else {}),
                )
                total += int(page.get("Count", 0))
                start = page.get("LastEvaluatedKey")
                if not start:
                    return total

        with ThreadPoolExecutor(max_workers=OPEN_SHARDS, thread_name_prefix="line") as pool:
            return sum(pool.map(count, range(OPEN_SHARDS)))

    def touch(self, job: Job) -> None:
        """Mark an open job as just checked, so the next recovery run looks at others first."""
        shard = open_shard(NOTIFY if job.state.ended else job.state.value, job.job_id)
        try:
            self._table.update_item(
                Key={"job_id": job.job_id},
                UpdateExpression="SET open_order = :now",
                ConditionExpression="open_shard = :shard",
                ExpressionAttributeValues={":now": now_ms(), ":shard": shard},
            )
        except ClientError as exc:
            if not _conditional_failure(exc):
                raise

    # -- the submit side ----------------------------------------------------------

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
        holder: str,
        hold_ms: int,
        upload_id: str | None = None,
        edit_mark: str | None = None,
    ) -> Job | None:
        """Create the job, held by ``holder``; ``None`` when it already exists.

        ``upload_id`` names the upload (the object version) when this is not its first job (its tags asked for
        another edit): the job is listed under it first, so :meth:`jobs_of_upload` finds every job that may exist.
        """
        at = now_ms()
        if upload_id is not None and upload_id != job_id:
            self._table.update_item(
                Key=table_keys.upload(upload_id),
                UpdateExpression="ADD job_ids :ids SET expires_at = :expires",  # lives as long as its newest job
                ExpressionAttributeValues={":ids": {job_id}, ":expires": at // 1000 + self._ttl_seconds},
            )
        writer = new_holder()
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
            "arrived_at_ms": at,
            "holder": holder,
            "held_until_ms": at + hold_ms,
            "open_shard": open_shard(JobState.SUBMITTING.value, job_id),
            "open_order": at,
            "expires_at": at // 1000 + self._ttl_seconds,
            "history": [{"state": JobState.SUBMITTING.value, "at": iso(at), "note": "upload seen"}],
        }
        item.update(
            {
                k: v
                for k, v in (
                    ("version_id", version_id),
                    ("etag", etag),
                    ("sequencer", sequencer),
                    ("event_time", event_time),
                    ("edit_mark", edit_mark),
                )
                if v
            }
        )
        try:
            self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(job_id)")
        except ClientError as exc:
            if _conditional_failure(exc):
                return self._if_mine(job_id, writer)
            raise
        return Job.model_validate(item)

    def jobs_of_upload(self, upload_id: str) -> list[Job]:
        """Every job of one upload (its first, and one per changed edit), oldest first."""
        item = self._table.get_item(Key=table_keys.upload(upload_id), ConsistentRead=True).get("Item") or {}
        ids = sorted({upload_id, *(str(job_id) for job_id in item.get("job_ids", ()))})
        jobs = [job for job_id in ids if (job := self.get(job_id)) is not None]
        return sorted(jobs, key=lambda job: (job.arrived_at_ms or 0, job.created_at))

    def take_over(self, job_id: str, *, holder: str, hold_ms: int) -> Job | None:
        """Hold a job nothing was sent for: released, failed retryably, or whose holder died before sending."""
        at = now_ms()
        return self._transition(
            job_id,
            JobState.SUBMITTING,
            note="taken up again",
            condition=(
                "(#state = :submitting AND (attribute_not_exists(holder) OR held_until_ms < :at))"
                " OR (#state = :failed AND failure_retryable = :true)"
            ),
            values={":submitting": "SUBMITTING", ":failed": "FAILED", ":true": True, ":holder": holder, ":until": at + hold_ms, ":at": at},
            sets="holder = :holder, held_until_ms = :until, attempts = attempts + :one",
            removes=("failure_retryable", "error_code", "error_message", "error_key", "ended_at_ms"),
            extra_values={":one": 1},
            at=at,
        )

    def release(self, job_id: str, holder: str, *, reason: str) -> Job | None:
        """Give a job back before anything was sent: the next delivery takes it up."""
        return self._transition(
            job_id,
            JobState.SUBMITTING,
            note=f"will retry: {reason}",
            condition="#state = :submitting AND holder = :holder",
            values={":submitting": "SUBMITTING", ":holder": holder, ":reason": reason[:1000]},
            sets="error_message = :reason",
            removes=("holder", "held_until_ms"),
        )

    def wait(
        self,
        job_id: str,
        holder: str,
        *,
        reason: str,
        until_ms: int | None,
        input_json: str,
        content_type: str,
        recipe_json: str | None = None,
        image_json: str | None = None,
    ) -> Job | None:
        """No slot (or no budget) yet: the job waits its turn, in arrival order, holding nothing."""
        values: dict[str, Any] = {
            ":submitting": "SUBMITTING",
            ":holder": holder,
            ":reason": reason,
            ":until": until_ms or 0,
            ":input": input_json,
            ":type": content_type,
        }
        sets = "wait_reason = :reason, wait_until_ms = :until, input_json = :input, content_type = :type"
        if recipe_json is not None:
            sets += ", recipe_json = :recipe"
            values[":recipe"] = recipe_json
        if image_json is not None:
            sets += ", image_json = :image"
            values[":image"] = image_json
        return self._transition(
            job_id,
            JobState.WAITING,
            note=f"waiting for {'the daily budget' if reason == 'budget' else 'a slot'}",
            condition="#state = :submitting AND holder = :holder",
            values=values,
            sets=sets,
            removes=("holder", "held_until_ms", "from_line"),
            order_by_arrival=True,
        )

    def return_to_line(self, job_id: str) -> Job | None:
        """A job taken from the line whose taker died before sending it: back in line (it has no message to retry it)."""
        at = now_ms()
        return self._transition(
            job_id,
            JobState.WAITING,
            note="its taker stopped before sending it: back in line",
            condition="#state = :submitting AND from_line = :true AND held_until_ms < :at",
            values={":submitting": "SUBMITTING", ":true": True, ":at": at, ":slot": "slot", ":zero": 0},
            sets="wait_reason = :slot, wait_until_ms = :zero",
            removes=("holder", "held_until_ms", "from_line"),
            at=at,
            order_by_arrival=True,
        )

    def take_waiting(self, job_id: str, *, holder: str, hold_ms: int) -> Job | None:
        """Hold a WAITING job to try its turn; ``None`` when another caller took it (or it is no longer waiting)."""
        at = now_ms()
        return self._transition(
            job_id,
            JobState.SUBMITTING,
            note="its turn",
            condition="#state = :waiting",
            values={":waiting": "WAITING", ":holder": holder, ":until": at + hold_ms, ":true": True},
            sets="holder = :holder, held_until_ms = :until, from_line = :true",
            removes=("wait_reason", "wait_until_ms"),
            at=at,
        )

    def begin_send(
        self,
        job_id: str,
        holder: str,
        *,
        input_json: str,
        slot: int | None = None,
        budget_day: str | None = None,
        images: int = 0,
        recipe_json: str | None = None,
        image_json: str | None = None,
    ) -> Job:
        """The point of no return: from here the request may be at fal. Raises :class:`JobConflict` if not held.

        The hold must still be live, not only ours: once it lapses, recovery may have given the job's slot to
        another upload, and sending now would open one request more at fal than the stack allows.
        Records what admission granted (the slot, the budget charged), so every ending can give it back.
        """
        at = now_ms()
        values: dict[str, Any] = {":submitting": "SUBMITTING", ":holder": holder, ":input": input_json, ":at": at}
        sets = "input_json = :input, sent_at_ms = :at, admitted_at_ms = :at"
        if slot is not None:
            sets += ", slot = :slot"
            values[":slot"] = slot
        if budget_day is not None:
            sets += ", budget_day = :day, budget_images = :images"
            values.update({":day": budget_day, ":images": images})
        if recipe_json is not None:
            sets += ", recipe_json = :recipe"
            values[":recipe"] = recipe_json
        if image_json is not None:
            sets += ", image_json = :image"
            values[":image"] = image_json
        job = self._transition(
            job_id,
            JobState.SENDING,
            note="sending to fal",
            condition="#state = :submitting AND holder = :holder AND held_until_ms > :at",
            values=values,
            sets=sets,
            removes=("from_line",),
            at=at,
            strict=True,
        )
        assert job is not None
        return job

    def requeue(self, job_id: str, holder: str, *, reason: str) -> Job | None:
        """fal never started the request (its start timeout passed): the job waits again, first in line, for a fresh try."""
        return self._transition(
            job_id,
            JobState.WAITING,
            note=f"back in line: {reason}",
            condition="holder = :holder AND #state IN (:submitted, :uncertain)",
            values={":holder": holder, ":submitted": "SUBMITTED", ":uncertain": "UNCERTAIN", ":reason": "slot", ":zero": 0},
            sets="wait_reason = :reason, wait_until_ms = :zero",
            removes=(
                "holder",
                "held_until_ms",
                "request_id",
                "gateway_request_id",
                "status_url",
                "response_url",
                "cancel_url",
                "sent_at_ms",
                "submitted_at_ms",
                "uncertain_since_ms",
                "slot",
                "budget_day",
                "budget_images",
                "queue_position",
            ),
            order_by_arrival=True,
        )

    def not_enqueued(self, job_id: str, holder: str, *, reason: str, wait: bool = False) -> Job | None:
        """fal answered that it does not hold the request: released, to be sent again later.

        Back to SUBMITTING for the upload's SQS message to retry, or, for an upload that
        was waiting its turn (it has no message), back in line (``wait``).
        """
        removes = ("holder", "held_until_ms", "sent_at_ms", "slot", "budget_day", "budget_images")
        if wait:
            return self._transition(
                job_id,
                JobState.WAITING,
                note=f"fal did not take it; back in line: {reason}",
                condition="#state = :sending AND holder = :holder",
                values={":sending": "SENDING", ":holder": holder, ":reason": reason[:1000], ":slot": "slot", ":zero": 0},
                sets="error_message = :reason, wait_reason = :slot, wait_until_ms = :zero",
                removes=removes,
                order_by_arrival=True,
            )
        return self._transition(
            job_id,
            JobState.SUBMITTING,
            note=f"fal did not take it; will retry: {reason}",
            condition="#state = :sending AND holder = :holder",
            values={":sending": "SENDING", ":holder": holder, ":reason": reason[:1000]},
            sets="error_message = :reason",
            removes=removes,
        )

    def mark_submitted(
        self,
        job_id: str,
        holder: str,
        *,
        request_id: str,
        gateway_request_id: str | None,
        status_url: str,
        response_url: str,
        cancel_url: str,
        queue_position: int | None = None,
    ) -> Job | None:
        """fal accepted it. ``None`` when the job had moved on (its webhook got there first)."""
        at = now_ms()
        return self._transition(
            job_id,
            JobState.SUBMITTED,
            note=f"fal request {request_id}",
            # A sender whose hold lapsed mid-request may find its job UNCERTAIN: the
            # request id it now holds is the truth, so it is recorded all the same.
            condition="(#state = :sending AND holder = :holder) OR (#state = :uncertain AND attribute_not_exists(request_id))",
            values={
                ":sending": "SENDING",
                ":uncertain": "UNCERTAIN",
                ":holder": holder,
                ":rid": request_id,
                ":gid": gateway_request_id or request_id,
                ":status": status_url,
                ":response": response_url,
                ":cancel": cancel_url,
                ":at": at,
                ":position": queue_position if queue_position is not None else -1,
            },
            sets=(
                "request_id = :rid, gateway_request_id = :gid, status_url = :status, response_url = :response, "
                "cancel_url = :cancel, submitted_at_ms = :at, queue_position = :position"
            ),
            removes=("holder", "held_until_ms", "error_message"),
            at=at,
        )

    def mark_uncertain(
        self,
        job_id: str,
        *,
        reason: str,
        holder: str | None = None,
        request_id: str | None = None,
        urls: tuple[str, str, str] | None = None,
    ) -> Job | None:
        """The request may be at fal. By its sender (``holder``), or by anyone once a SENDING hold has lapsed."""
        at = now_ms()
        values: dict[str, Any] = {":sending": "SENDING", ":reason": reason[:1000], ":at": at}
        if holder is not None:
            condition = "#state = :sending AND holder = :holder"
            values[":holder"] = holder
        else:
            condition = "#state = :sending AND held_until_ms < :at"
        sets = "error_message = :reason, uncertain_since_ms = :at"
        if request_id:
            sets += ", request_id = :rid, submitted_at_ms = :at"
            values[":rid"] = request_id
            if urls:
                sets += ", status_url = :status, response_url = :response, cancel_url = :cancel"
                values.update({":status": urls[0], ":response": urls[1], ":cancel": urls[2]})
        return self._transition(
            job_id,
            JobState.UNCERTAIN,
            note=reason,
            condition=condition,
            values=values,
            sets=sets,
            removes=("holder", "held_until_ms"),
            at=at,
        )

    def adopt_request(self, job_id: str, request_id: str) -> Job | None:
        """An UNCERTAIN job's signed webhook arrived: fal did accept it, under this request id."""
        at = now_ms()
        return self._transition(
            job_id,
            JobState.SUBMITTED,
            note=f"fal request {request_id} (learned from its webhook)",
            condition="#state = :uncertain AND attribute_not_exists(request_id)",
            values={":uncertain": "UNCERTAIN", ":rid": request_id, ":at": at},
            sets="request_id = :rid, submitted_at_ms = :at",
            removes=("error_message",),
            at=at,
        )

    # -- finishing -------------------------------------------------------------------

    def claim(
        self, job_id: str, holder: str, *, hold_ms: int, states: Iterable[JobState] = AT_FAL, request_id: str | None = None
    ) -> Claim | None:
        """Hold a job to finish it. ``None`` when it ended, is in another state, or someone holds it.

        ``request_id``: the claim acts on what fal said about that request, so it holds only while the job's request is
        still that one (the job may have been sent again, as another request, since it was read).
        """
        at = now_ms()
        names = {f":s{i}": s.value for i, s in enumerate(states)}
        writer = new_holder()
        same_request = " AND request_id = :rid" if request_id else ""
        try:
            old = self._table.update_item(
                Key={"job_id": job_id},
                UpdateExpression="SET holder = :holder, held_until_ms = :until, last_writer = :writer",
                ConditionExpression=(
                    f"attribute_exists(job_id) AND #state IN ({', '.join(names)}) AND (attribute_not_exists(holder) OR held_until_ms < :at)"
                    + same_request
                ),
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    **names,
                    ":holder": holder,
                    ":until": at + hold_ms,
                    ":writer": writer,
                    ":at": at,
                    **({":rid": request_id} if request_id else {}),
                },
                ReturnValues="ALL_OLD",
            )["Attributes"]
        except ClientError as exc:
            if not _conditional_failure(exc):
                raise
            mine = self._if_mine(job_id, writer)
            return Claim(mine, holder, took_over=False) if mine is not None else None
        job = Job.model_validate({**_plain(old), "holder": holder, "held_until_ms": at + hold_ms, "last_writer": writer})
        return Claim(job, holder, took_over=old.get("holder") is not None)

    def unclaim(self, job_id: str, holder: str) -> None:
        """Let go of a job without changing its state (a cancel fal refused)."""
        try:
            self._table.update_item(
                Key={"job_id": job_id},
                UpdateExpression="REMOVE holder, held_until_ms",
                ConditionExpression="holder = :holder",
                ExpressionAttributeValues={":holder": holder},
            )
        except ClientError as exc:
            if not _conditional_failure(exc):
                raise

    def complete(self, job_id: str, holder: str, *, output_keys: list[str], manifest_key: str, note: str, notify: bool) -> Job | None:
        """End a held job with its outputs; ``None`` when the hold was lost."""
        at = now_ms()
        return self._end(
            job_id,
            JobState.COMPLETED,
            holder,
            note=note,
            notify=notify,
            values={":keys": output_keys, ":manifest": manifest_key, ":at": at},
            sets="output_keys = :keys, manifest_key = :manifest, ended_at_ms = :at",
            removes=("error_code", "error_message", "error_key"),
            at=at,
        )

    def fail(
        self, job_id: str, holder: str, *, code: str, message: str, error_key: str, retryable: bool = False, notify: bool = True
    ) -> Job | None:
        """End a held job as failed; ``None`` when the hold was lost.

        ``retryable`` marks failures where nothing reached fal, so a message redriven
        from the DLQ may take the job up again.
        """
        at = now_ms()
        return self._end(
            job_id,
            JobState.FAILED,
            holder,
            note=f"{code}: {message}",
            notify=notify,
            values={":code": code, ":msg": message[:4000], ":ekey": error_key, ":retry": retryable, ":at": at, ":true": True},
            sets="error_code = :code, error_message = :msg, error_key = :ekey, failure_retryable = :retry, ended_at_ms = :at, "
            "error_written = :true",
            at=at,
        )

    def claim_notification(self, job_id: str, *, hold_ms: int = 30_000) -> bool:
        """Win the right to publish an ended job's event: one caller at a time, until it is published."""
        at = now_ms()
        try:
            self._table.update_item(
                Key={"job_id": job_id},
                UpdateExpression="SET notify_until_ms = :until",
                ConditionExpression=(
                    "attribute_exists(job_id) AND #state IN (:completed, :failed) AND attribute_not_exists(notified_at_ms) "
                    "AND (attribute_not_exists(notify_until_ms) OR notify_until_ms < :at)"
                ),
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={":completed": "COMPLETED", ":failed": "FAILED", ":until": at + hold_ms, ":at": at},
            )
        except ClientError as exc:
            if _conditional_failure(exc):
                return False
            raise
        return True

    def mark_notified(self, job_id: str) -> None:
        self._table.update_item(
            Key={"job_id": job_id},
            UpdateExpression="SET notified_at_ms = :at REMOVE notify_until_ms, open_shard, open_order",
            ExpressionAttributeValues={":at": now_ms()},
        )

    # -- plumbing ----------------------------------------------------------------

    def _end(
        self,
        job_id: str,
        state: JobState,
        holder: str,
        *,
        note: str,
        notify: bool,
        values: dict[str, Any],
        sets: str,
        at: int,
        removes: tuple[str, ...] = (),
    ) -> Job | None:
        values = {**values, ":holder": holder}
        if notify:
            sets += ", open_shard = :nshard, open_order = :at"
            values[":nshard"] = open_shard(NOTIFY, job_id)
            index_removes: tuple[str, ...] = ()
        else:
            index_removes = ("open_shard", "open_order")
        return self._transition(
            job_id,
            state,
            note=note,
            condition="holder = :holder AND NOT #state IN (:done, :failed_state)",
            values={**values, ":done": "COMPLETED", ":failed_state": "FAILED"},
            sets=sets,
            removes=("holder", "held_until_ms", *removes, *index_removes),
            at=at,
            open_index=False,
        )

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
        open_index: bool = True,
        order_by_arrival: bool = False,
    ) -> Job | None:
        at = at or now_ms()
        writer = new_holder()
        entry = {"state": state.value, "at": iso(at), "note": note[:_NOTE_CHARS]}
        expression = (
            "SET #state = :new_state, updated_at = :updated, last_writer = :writer, "
            "history = list_append(if_not_exists(history, :empty), :entry)"
        )
        index_values: dict[str, Any] = {}
        if open_index and order_by_arrival:
            # Waiting in line: ordered by when the upload arrived, not by when it was last looked at.
            expression += ", open_shard = :shard, open_order = if_not_exists(arrived_at_ms, :order)"
            index_values = {":shard": open_shard(state.value, job_id), ":order": at}
        elif open_index:
            expression += ", open_shard = :shard, open_order = :order"
            index_values = {":shard": open_shard(state.value, job_id), ":order": at}
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
                    **index_values,
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
