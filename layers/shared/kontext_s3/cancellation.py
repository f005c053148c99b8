"""Deleting an input cancels what it would still cost: the requests fal has not started, and the uploads still in line.

A request fal already runs is left to finish (fal bills it either way); its
outputs are written as usual. A job waiting in line holds no slot and nothing
at fal, so it is simply ended with a ``cancelled`` record.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from kontext_s3.completion import JobFinisher
from kontext_s3.fal_queue import FalError, FalQueueClient, FalRejected
from kontext_s3.holding import Held, submit_hold_ms
from kontext_s3.input_image import missing
from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import AT_FAL, Job, JobState, JobStore, new_holder
from kontext_s3.latest_uploads import LatestUploads
from kontext_s3.log import logger
from kontext_s3.s3_events import ObjectChange

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class Cancellation:
    """Deleting an input cancels its jobs that fal has not started yet, and those still waiting for their turn."""

    def __init__(self, *, s3: S3Client, jobs: JobStore, fal: FalQueueClient, finisher: JobFinisher) -> None:
        self._s3 = s3
        self._jobs = jobs
        self._fal = fal
        self._finisher = finisher
        self._latest = LatestUploads(jobs.table)

    def input_removed(self, change: ObjectChange, *, deadline: float) -> list[str]:
        """Cancel the open jobs of the removed object; returns the ids of jobs cancelled."""
        cancelled = []
        jobs = [job for upload_id in self._removed_uploads(change) for job in self._jobs.jobs_of_upload(upload_id)]
        for job in jobs:  # each version's first job and its re-runs after changed tags
            if job.state is JobState.WAITING:
                if self._cancel_waiting(job, deadline):
                    cancelled.append(job.job_id)
                continue
            if job.state not in AT_FAL or not job.cancel_url:
                continue
            claim = self._finisher.claim(job.job_id, deadline=deadline)
            if claim is None:
                continue  # its webhook (or recovery) is finishing it
            try:
                cancelled_at_fal = self._fal.cancel(job.cancel_url, deadline=deadline)
            except FalRejected as exc:
                self._finisher.let_go(claim)
                # fal does not know the request (404): nothing to cancel; recovery settles the job.
                logger.warning("input deleted, but fal refused the cancel", extra={"job_id": job.job_id, "reason": str(exc)})
                continue
            except FalError:
                self._finisher.let_go(claim)
                raise
            if not cancelled_at_fal:
                self._finisher.let_go(claim)
                logger.info("input deleted, but fal had already started the request: it runs to the end", extra={"job_id": job.job_id})
                continue
            self._finisher.fail(
                claim.job,
                claim.holder,
                stage="fal",
                code="cancelled",
                message="the input object was deleted before fal started the request, so the request was cancelled",
                fal={"request_id": job.request_id},
                took_over=claim.took_over,
                never_ran=True,
            )
            cancelled.append(job.job_id)
        return cancelled

    def _cancel_waiting(self, job: Job, deadline: float) -> bool:
        """A job waiting in line was never sent: take it from the line and end it. A dispatcher that took it first
        checks the input before it sends (``line``), and ends it there the same way."""
        holder = new_holder()
        taken = self._jobs.take_waiting(job.job_id, holder=holder, hold_ms=submit_hold_ms(deadline))
        if taken is None or cancel_unsent(self._finisher, Held(taken, holder)) is None:
            return False
        if self._finisher.slot_freed is not None:
            # A dispatcher that met the job while it was taken here took it for another dispatcher's and stopped.
            self._finisher.slot_freed()
        return True

    def _removed_uploads(self, change: ObjectChange) -> list[str]:
        """Which uploads a removal is about.

        ``ObjectRemoved:Delete`` on a versioned bucket names the version deleted. A
        plain delete (``DeleteMarkerCreated``) names the new delete marker, so every
        version of the key is looked up: the user deleted the object, all of it. A
        delete on an unversioned bucket names neither: it removed the key's latest
        upload (``latest_uploads``).
        """
        if change.event_name == "ObjectRemoved:Delete" and change.version_id:
            return [derive_job_id(change.bucket, change.key, change.version_id)]
        if change.event_name == "ObjectRemoved:Delete":
            return [upload for key in self._removed_keys(change) if (upload := self._latest.removed_by(replace(change, key=key)))]
        listing = self._s3.list_object_versions(Bucket=change.bucket, Prefix=change.key)
        versions = [v["VersionId"] for v in listing.get("Versions", []) if v.get("Key") == change.key and v.get("VersionId")]
        return [derive_job_id(change.bucket, change.key, version) for version in versions]

    def _removed_keys(self, change: ObjectChange) -> list[str]:
        """The key as sent; and, for an EventBridge key that may be encoded, its decoded form, if nothing is there now."""
        if change.decoded_key is None:
            return [change.key]
        keys = [change.key]
        try:
            self._s3.head_object(Bucket=change.bucket, Key=change.decoded_key)
        except ClientError as exc:
            if not missing(exc):
                raise
            keys.append(change.decoded_key)
        return keys


def cancel_unsent(finisher: JobFinisher, held: Held) -> Job | None:
    """End a held job that was never sent, because its input was deleted while it waited for its turn."""
    message = "the input object was deleted while the upload waited for its turn; nothing was sent"
    return finisher.fail(held.job, held.holder, stage="submit", code="cancelled", message=message, never_ran=True)
