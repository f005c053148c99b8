"""A job as stored in the jobs table, and the small facts every module about jobs shares."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    #: fal requests of this job put back in line (fal said they never started): never this job's again.
    past_request_ids: list[str] = Field(default_factory=list)
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
    #: Admission (see ``admission``): the slot held (its member of ``_slots``), and the UTC day and images charged.
    slot: str | None = None
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

    @field_validator("slot", mode="before")
    @classmethod
    def _slot_of_an_earlier_version(cls, value: Any) -> Any:
        # Before the slots were one item, a job recorded its slot's number: that slot is no member of ``_slots``, so
        # freeing it frees nothing (the job's old ``_slot#`` item is no longer read).
        return str(value) if isinstance(value, int) else value

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


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_holder() -> str:
    return uuid.uuid4().hex


def hold_ms(deadline: float, margin_ms: int) -> int:
    """How long a hold taken now lasts: to the holder's ``deadline`` (``time.monotonic``), and ``margin_ms`` past it,
    so a holder that dies lets go before anyone else would take the job up again."""
    return int(max(0.0, deadline - time.monotonic()) * 1000) + margin_ms
