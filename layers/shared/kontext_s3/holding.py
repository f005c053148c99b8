"""Holding an upload's job: create it, or take it up again, or learn that it is another's or done.

A job is one upload and one edit. The upload's first job has the upload's id (its version, or eTag and
sequencer). With ``RERUN_ON_TAG_CHANGE``, tags that ask another edit make a job of its own, whose id names the
edit too, so the same edit of the same upload never runs twice; a repeat of the upload's own event asking another
edit (a redelivery, a backfill, a tag deadline after a recipe or default changed) is a duplicate, unless nothing
of the upload ever reached fal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kontext_s3.job_id import derive_job_id, edit_mark
from kontext_s3.jobs import Job, JobState, JobStore, hold_ms, new_holder, now_ms
from kontext_s3.latest_uploads import LatestUploads, sequencer_order
from kontext_s3.log import logger
from kontext_s3.outcomes import ChangeResult, Outcome
from kontext_s3.output_store import OutputLayout
from kontext_s3.s3_events import ObjectChange
from kontext_s3.settings import Settings

#: A submit's hold outlives its invocation by this margin: if the holder dies, its hold lapses before SQS redelivers.
SUBMIT_HOLD_MARGIN_MS = 10_000


def submit_hold_ms(deadline: float) -> int:
    return hold_ms(deadline, SUBMIT_HOLD_MARGIN_MS)


def upload_id_of(change: ObjectChange, edit: dict[str, Any] | None = None) -> str:
    """The upload's own id (the id of its first job), or with ``edit`` the id of its job for that edit."""
    return derive_job_id(change.bucket, change.key, change.version_id, change.etag, edit=edit)


@dataclass(frozen=True)
class Held:
    job: Job
    holder: str


class Holds:
    def __init__(self, jobs: JobStore, settings: Settings) -> None:
        self._jobs = jobs
        self._settings = settings
        self._layout = OutputLayout(settings.input_prefix, settings.output_prefix)
        self._latest = LatestUploads(jobs.table, ttl_days=settings.job_ttl_days)

    def hold(self, change: ObjectChange, edit: dict[str, Any] | None, deadline: float) -> Held | ChangeResult:
        """The job for this upload and edit, held by us; a :class:`ChangeResult` when it is another's or done."""
        upload_id = upload_id_of(change)
        mark = edit_mark(edit) if self._settings.rerun_on_tag_change and edit is not None else None
        holder, held_for = new_holder(), submit_hold_ms(deadline)
        job_id = upload_id
        job = self._create(change, job_id, holder, held_for, mark)
        if job is not None and not change.version_id:  # an unversioned bucket: what a delete of the key would cancel
            self._latest.record(change, upload_id, now_ms())
        if job is None and mark is not None:
            first = self._jobs.get(upload_id)
            if first is not None and first.edit_mark not in (None, mark):
                if not change.tagged and not self._nothing_sent(upload_id):
                    # A repeat of the upload's own event asking for another edit than the one that ran: only new tags
                    # start a re-run.
                    logger.info("duplicate delivery: the upload's job ran another edit", extra={"first_job_id": upload_id})
                    return ChangeResult(Outcome.DUPLICATE, change.key, upload_id, "the upload's job exists")
                job_id = upload_id_of(change, edit)
                logger.info("the upload's edit changed: a job of its own", extra={"first_job_id": upload_id})
                job = self._create(change, job_id, holder, held_for, mark, upload_id=upload_id)
        logger.thread_safe_append_keys(job_id=job_id)
        if job is None:
            return self._take_over(job_id, change, holder, held_for)
        return Held(job, holder)

    def _take_over(self, job_id: str, change: ObjectChange, holder: str, held_for: int) -> Held | ChangeResult:
        """The job exists: take it up again if nothing was sent for it, else report the duplicate."""
        key = change.key
        existing = self._jobs.get(job_id)
        if existing is None:  # expired by TTL between the two calls: an old event, treated as a duplicate
            return ChangeResult(Outcome.DUPLICATE, key, job_id, "job expired")
        rewritten = _written_again(existing, change)
        resumable = (
            (existing.state is JobState.SUBMITTING and (existing.holder is None or existing.hold_lapsed()))
            or (existing.state is JobState.FAILED and existing.failure_retryable)
            or rewritten
        )
        if resumable:
            taken = self._jobs.take_over(job_id, holder=holder, hold_ms=held_for, sequencer=change.sequencer if rewritten else None)
            if taken is not None:
                logger.info("resuming job", extra={"attempt": taken.attempts})
                return Held(taken, holder)
            existing = self._jobs.get(job_id) or existing
        elif existing.state is JobState.SENDING and existing.hold_lapsed():
            self._jobs.sender_died(job_id)
            logger.error("previous worker died while sending: job is UNCERTAIN")
            return ChangeResult(Outcome.UNCERTAIN, existing.key, job_id, "previous worker died mid-send")
        logger.info("duplicate delivery: job already exists", extra={"state": existing.state.value})
        return ChangeResult(Outcome.DUPLICATE, existing.key, job_id, existing.state.value)

    def _nothing_sent(self, upload_id: str) -> bool:
        """Whether every job of the upload ended before reaching fal (refused tags, say): another edit costs no second
        payment then, so a backfill may give the upload the edit it never got."""
        jobs = self._jobs.jobs_of_upload(upload_id)
        return bool(jobs) and all(
            job.state is JobState.FAILED and not job.failure_retryable and not job.request_id and not job.sent_at_ms for job in jobs
        )

    def _create(
        self, change: ObjectChange, job_id: str, holder: str, held_for: int, mark: str | None, upload_id: str | None = None
    ) -> Job | None:
        return self._jobs.create(
            job_id=job_id,
            bucket=change.bucket,
            key=change.key,
            version_id=change.version_id,
            etag=change.etag,
            sequencer=change.sequencer,
            event_time=change.event_time,
            output_prefix=self._layout.job_prefix(change.key, job_id),
            holder=holder,
            hold_ms=held_for,
            upload_id=upload_id,
            edit_mark=mark,
        )


def _written_again(existing: Job, change: ObjectChange) -> bool:
    """On an unversioned bucket, the same bytes written again after their job ended before reaching fal (cancelled by a
    delete, overwritten before it was read): a new write of the upload, which takes its job up again. Its event comes
    later than the job's (its sequencer is greater); a repeat of the job's own event does not."""
    return (
        change.created
        and not change.version_id
        and existing.state is JobState.FAILED
        and not existing.request_id
        and not existing.sent_at_ms
        and sequencer_order(change.sequencer) > sequencer_order(existing.sequencer)
    )
