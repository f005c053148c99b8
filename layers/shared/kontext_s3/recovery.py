"""Finishing jobs whose webhook never came, and cancelling jobs whose input was deleted.

The recovery function runs on a schedule. For each open job it asks the one
who knows, fal, through the URLs fal returned at submit:

* SUBMITTED for longer than ``RECOVERY_AFTER_SECONDS``: fal's status. A
  completed request is finished exactly as its webhook would have finished it
  (the same :class:`JobFinisher`); a failed one gets its error record; one
  still queued or running past ``JOB_MAX_AGE_SECONDS`` is cancelled and failed.
* UNCERTAIN past ``JOB_MAX_AGE_SECONDS``: there is no request id to ask about,
  and fal's own webhook retries (10 over 2 hours) would have told us by now if
  it had run, so the job fails with that explanation.
* SUBMITTING past ``JOB_MAX_AGE_SECONDS``: its message is gone (a redrive would
  have resumed it), so it fails retryably with that explanation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kontext_s3.completion import DeliveryFault, JobFinisher
from kontext_s3.fal_queue import FalError, FalQueueClient
from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobState, JobStore, now_ms
from kontext_s3.log import logger
from kontext_s3.s3_events import ObjectChange

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


@dataclass
class RecoveryReport:
    checked: int = 0
    completed: int = 0
    failed: int = 0
    still_running: int = 0
    errors: list[str] = field(default_factory=list)


class Recovery:
    def __init__(
        self, *, jobs: JobStore, fal: FalQueueClient, finisher: JobFinisher, recovery_after_seconds: int, job_max_age_seconds: int
    ) -> None:
        self._jobs = jobs
        self._fal = fal
        self._finisher = finisher
        self._after_ms = recovery_after_seconds * 1000
        self._max_age_ms = job_max_age_seconds * 1000

    def run(self, *, deadline: float, limit: int = 200) -> RecoveryReport:
        report = RecoveryReport()
        now = now_ms()
        work: list[tuple[Job, Callable[[Job, float], str]]] = [
            *((job, self._recover_submitted) for job in self._jobs.open_jobs(JobState.SUBMITTED, now - self._after_ms, limit)),
            *((job, self._expire_uncertain) for job in self._jobs.open_jobs(JobState.UNCERTAIN, now - self._max_age_ms, limit)),
            *((job, self._expire_submitting) for job in self._jobs.open_jobs(JobState.SUBMITTING, now - self._max_age_ms, limit)),
        ]
        for job, action in work:
            if time.monotonic() > deadline:
                logger.info("recovery stopped for lack of time; the next run continues", extra={"left": len(work) - report.checked})
                break
            report.checked += 1
            logger.thread_safe_append_keys(job_id=job.job_id, object_key=job.key)
            try:
                outcome = action(job, deadline)
            except (FalError, DeliveryFault) as exc:
                report.errors.append(f"{job.job_id}: {exc}")
                logger.warning("recovery could not finish the job this time", extra={"reason": str(exc)})
                continue
            finally:
                logger.thread_safe_remove_keys(["job_id", "object_key"])
            if outcome == "completed":
                report.completed += 1
            elif outcome == "failed":
                report.failed += 1
            else:
                report.still_running += 1
        return report

    def _recover_submitted(self, job: Job, deadline: float) -> str:
        assert job.status_url and job.response_url
        status = self._fal.status(job.status_url, deadline=deadline)
        state = status.get("status")
        if state == "COMPLETED" and not status.get("error"):
            output = self._fal.result(job.response_url, deadline=deadline)
            ended = self._finisher.succeed(job, output)
            logger.info("job recovered after its webhook was lost")
            return _outcome(ended)
        if state == "COMPLETED":
            detail = self._result_detail(job, deadline)
            ended = self._finisher.fail(
                job,
                stage="fal",
                code="fal_error",
                message=str(status.get("error")),
                fal={"request_id": job.request_id, "error": status.get("error"), "error_type": status.get("error_type"), "detail": detail},
            )
            return _outcome(ended)
        if now_ms() - (job.submitted_at_ms or 0) > self._max_age_ms:
            assert job.cancel_url
            cancelled = self._fal.cancel(job.cancel_url, deadline=deadline)
            ended = self._finisher.fail(
                job,
                stage="fal",
                code="timed_out",
                message=f"fal had not finished the request after {self._max_age_ms // 1000} s (it was {state}); "
                + ("it was cancelled" if cancelled else "fal would not cancel it, so it may still run and be paid for"),
                fal={"request_id": job.request_id, "status": state},
            )
            return _outcome(ended)
        return "running"

    def _result_detail(self, job: Job, deadline: float) -> object:
        """fal's detail for a failed request, if it gives it quickly: the failure is recorded either way."""
        assert job.response_url
        try:
            return self._fal.result(job.response_url, deadline=min(deadline, time.monotonic() + 5))
        except FalError as exc:
            return exc.detail

    def _expire_uncertain(self, job: Job, deadline: float) -> str:
        ended = self._finisher.fail(
            job,
            stage="submit",
            code="submit_uncertain",
            message=(
                "fal did not answer the submit, and no webhook came for it within "
                f"{self._max_age_ms // 1000} s; it was not sent again so as not to pay twice. Upload again to retry."
            ),
            from_states=(JobState.UNCERTAIN,),
        )
        return _outcome(ended)

    def _expire_submitting(self, job: Job, deadline: float) -> str:
        if job.lease_until_ms and job.lease_until_ms > now_ms():
            return "running"
        ended = self._finisher.fail(
            job,
            stage="submit",
            code="submit_stalled",
            message=f"the upload's event was not processed to the end within {self._max_age_ms // 1000} s and is no longer queued",
            retryable=True,
            from_states=(JobState.SUBMITTING,),
        )
        return _outcome(ended)


class Cancellation:
    """Deleting an input cancels its jobs that fal has not started yet."""

    def __init__(self, *, s3: S3Client, jobs: JobStore, fal: FalQueueClient, finisher: JobFinisher) -> None:
        self._s3 = s3
        self._jobs = jobs
        self._fal = fal
        self._finisher = finisher

    def input_removed(self, change: ObjectChange, *, deadline: float) -> list[str]:
        """Cancel the open jobs of the removed object; returns the ids of jobs cancelled."""
        cancelled = []
        for version in self._removed_versions(change):
            job = self._jobs.get(derive_job_id(change.bucket, change.key, version))
            if job is None or job.state is not JobState.SUBMITTED or not job.cancel_url:
                continue
            if not self._fal.cancel(job.cancel_url, deadline=deadline):
                logger.info("input deleted, but fal had already started the request: it runs to the end", extra={"job_id": job.job_id})
                continue
            self._finisher.fail(
                job,
                stage="fal",
                code="cancelled",
                message="the input object was deleted before fal started the request, so the request was cancelled",
                fal={"request_id": job.request_id},
                from_states=(JobState.SUBMITTED,),
            )
            cancelled.append(job.job_id)
        return cancelled

    def _removed_versions(self, change: ObjectChange) -> list[str]:
        """Which versions a removal is about.

        ``ObjectRemoved:Delete`` on a versioned bucket names the version deleted. A
        plain delete (``DeleteMarkerCreated``) names the new delete marker, so every
        version of the key is looked up: the user deleted the object, all of it.
        """
        if change.event_name == "ObjectRemoved:Delete" and change.version_id:
            return [change.version_id]
        listing = self._s3.list_object_versions(Bucket=change.bucket, Prefix=change.key)
        return [v["VersionId"] for v in listing.get("Versions", []) if v.get("Key") == change.key and v.get("VersionId")]


def _outcome(ended: Job | None) -> str:
    if ended is None:
        return "ended-elsewhere"
    return "completed" if ended.state is JobState.COMPLETED else "failed"


__all__ = ["Cancellation", "Recovery", "RecoveryReport"]
