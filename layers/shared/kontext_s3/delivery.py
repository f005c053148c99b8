"""What happens to a held job when nothing could be sent this time: it depends on how the attempt came.

An attempt comes with its upload's SQS message (:class:`MessageAttempt`): the job is given back and the message
retried by SQS, and on its last delivery the job is failed retryably (an error record; a DLQ redrive resumes it).
Or it comes from the line (:class:`LineAttempt`): there is no message to retry it, so the job goes back to its place
in line and the dispatcher goes on. The submit path asks the attempt; it never asks which kind it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn, Protocol

from kontext_s3.admission import Wait
from kontext_s3.completion import JobFinisher
from kontext_s3.edit_reading import Edit
from kontext_s3.holding import Held
from kontext_s3.jobs import JobStore
from kontext_s3.log import logger
from kontext_s3.outcomes import ChangeResult, Outcome, RetryLater
from kontext_s3.redact import redact


class Attempt(Protocol):
    def not_sent(self, held: Held, edit: Edit, reason: str, *, code: str, cause: Exception | None = None) -> ChangeResult:
        """A fault before anything reached fal."""

    def hold_lost(self, held: Held, edit: Edit) -> ChangeResult:
        """Our hold lapsed before sending (recovery may have handed our slot on): nothing was sent."""

    def not_enqueued(self, held: Held, edit: Edit, reason: str, *, attempts: int) -> ChangeResult:
        """fal answered that it does not hold the request."""


def put_back(jobs: JobStore, held: Held, edit: Edit, wait: Wait) -> None:
    """The job waits (again) in line, in its arrival order, with what its turn needs."""
    jobs.wait(
        held.job.job_id,
        held.holder,
        reason=wait.reason,
        until_ms=wait.until_ms,
        input_json=edit.input_json,
        content_type=edit.content_type,
        recipe_json=edit.recipe_json,
        image_json=edit.image_json,
    )


@dataclass(frozen=True)
class MessageAttempt:
    jobs: JobStore
    finisher: JobFinisher
    receive_count: int
    max_receive_count: int

    def not_sent(self, held: Held, edit: Edit, reason: str, *, code: str, cause: Exception | None = None) -> NoReturn:
        self.retry_later(held, reason, code=code, cause=cause)

    def hold_lost(self, held: Held, edit: Edit) -> NoReturn:
        self.retry_later(held, "the hold lapsed before sending", code="retries_exhausted")

    def not_enqueued(self, held: Held, edit: Edit, reason: str, *, attempts: int) -> NoReturn:
        self.retry_later(held, reason, code="fal_unavailable", fal_said_not_enqueued=True, attempts=attempts)

    def retry_later(
        self,
        held: Held,
        reason: str,
        *,
        code: str,
        cause: Exception | None = None,
        fal_said_not_enqueued: bool = False,
        attempts: int = 0,
    ) -> NoReturn:
        """Give the job back for the next delivery, or fail it retryably on the last one; the message comes back."""
        reason = redact(reason)
        job, holder = held.job, held.holder
        if self.receive_count >= self.max_receive_count:
            message = f"gave up after {self.receive_count} deliveries of the S3 event: {reason}"
            self.finisher.fail(job, holder, stage="submit", code=code, message=message, retryable=True)
            logger.error("last delivery failed: job marked failed, message goes to the DLQ", extra={"reason": reason})
        else:
            if fal_said_not_enqueued:
                self.jobs.not_enqueued(job.job_id, holder, reason=reason)
            else:
                self.jobs.release(job.job_id, holder, reason=reason)
            extra = {"reason": reason, "receive_count": self.receive_count, "fal_attempts": attempts}
            logger.warning("transient fault: the message will be retried", extra=extra)
        raise RetryLater(reason) from cause


@dataclass(frozen=True)
class LineAttempt:
    jobs: JobStore

    def not_sent(self, held: Held, edit: Edit, reason: str, *, code: str, cause: Exception | None = None) -> ChangeResult:
        # Back in its place; the line goes on past it (only a full house stops the line).
        put_back(self.jobs, held, edit, Wait("slot"))
        logger.warning("could not send a waiting upload; it is back in line", extra={"reason": redact(reason)})
        return ChangeResult(Outcome.WAITING, held.job.key, held.job.job_id, reason)

    def hold_lost(self, held: Held, edit: Edit) -> ChangeResult:
        # Not WAITING: the slot was just given back, and the dispatcher goes on.
        self.jobs.return_to_line(held.job.job_id)
        return ChangeResult(Outcome.DUPLICATE, held.job.key, held.job.job_id, "hold lapsed")

    def not_enqueued(self, held: Held, edit: Edit, reason: str, *, attempts: int) -> ChangeResult:
        self.jobs.not_enqueued(held.job.job_id, held.holder, reason=reason, wait=True)
        logger.warning("fal did not take the request; the upload is back in line", extra={"reason": reason})
        return ChangeResult(Outcome.WAITING, held.job.key, held.job.job_id, reason, attempts)
