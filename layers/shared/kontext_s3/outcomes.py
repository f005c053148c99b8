"""What became of one change (an upload, a tag event, a deletion, a turn in the line), as the submit path reports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kontext_s3.model_schema import FieldProblem


class Outcome(StrEnum):
    SUBMITTED = "submitted"
    WAITING = "waiting"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    FAILED = "failed"
    UNCERTAIN = "uncertain"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ChangeResult:
    outcome: Outcome
    key: str
    job_id: str | None = None
    detail: str = ""
    #: POSTs this change made to fal (retries included).
    fal_attempts: int = 0
    #: Admission said wait (no slot, or no budget today): the line stops here until a slot is freed.
    line_full: bool = False


class RetryLater(RuntimeError):
    """A transient fault: the SQS message must come back (and, in the end, go to the DLQ). The handler's signal."""


@dataclass(frozen=True)
class Refusal:
    """The user's mistake (tags, recipe, object): an error record, and the message acknowledged; retrying cannot fix it."""

    code: str
    message: str
    problems: list[FieldProblem] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    #: The edit asked for, when it could be read: with re-runs on tag changes, part of the job's id.
    fields: dict[str, Any] | None = None
