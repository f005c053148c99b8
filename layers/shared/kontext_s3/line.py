"""Admission and the line: a held job is sent when admission grants it a slot and the day's images, else it waits.

A waiting job holds nothing; its place is its upload's arrival. When a slot is freed, the webhook (or recovery)
signals the submit function, whose dispatcher gives free slots to the uploads waiting longest, checking each one's
input is still there before it is sent. A full house (admission's wait) stops the dispatcher, and so does a
waiting upload another dispatcher took first (that one goes on down the line); a job that cannot be sent gets its
record, or goes back to its place, and the line goes on.
"""

from __future__ import annotations

import json
import threading
import time

from kontext_s3.admission import Admission, Admitted, Wait
from kontext_s3.cancellation import cancel_unsent
from kontext_s3.completion import JobFinisher
from kontext_s3.delivery import Attempt, LineAttempt, put_back
from kontext_s3.edit_reading import Edit
from kontext_s3.holding import Held, submit_hold_ms
from kontext_s3.input_image import InputImages
from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobState, JobStore, new_holder, now_ms
from kontext_s3.latest_uploads import LatestUploads
from kontext_s3.log import logger
from kontext_s3.outcomes import ChangeResult, Outcome
from kontext_s3.sending import Sender

#: Less time left than this, and a dispatcher stops: it could not hear fal's answer (the next signal goes on).
DISPATCH_RESERVE_SECONDS = 5
#: Waiting jobs one dispatcher pass reads.
DISPATCH_PASS = 50


class Line:
    def __init__(self, *, jobs: JobStore, admission: Admission | None, images: InputImages, finisher: JobFinisher, sender: Sender) -> None:
        self._jobs = jobs
        self._admission = admission
        self._images = images
        self._finisher = finisher
        self._sender = sender
        self._latest = LatestUploads(jobs.table)
        self._lock = threading.Lock()
        self._dispatching = False
        self._again = False

    def take_turn(self, held: Held, edit: Edit, attempt: Attempt, *, deadline: float) -> ChangeResult:
        """Send the job if admission grants it a slot and the day's images; else it waits in line (nothing is failed)."""
        job = held.job
        never = self._admission.never_admits(edit.images) if self._admission else None
        if never:  # it would wait for ever: a request larger than a whole day's budget
            self._finisher.fail(job, held.holder, stage="admission", code="over_daily_budget", message=never)
            return ChangeResult(Outcome.FAILED, job.key, job.job_id, never)
        try:
            decision = (
                self._admission.admit(job.job_id, edit.images, taker=held.holder) if self._admission else Admitted(None, None, edit.images)
            )
        except Exception as exc:
            return attempt.not_sent(held, edit, f"{type(exc).__name__}: {exc}", code="retries_exhausted", cause=exc)
        if isinstance(decision, Wait):
            put_back(self._jobs, held, edit, decision)
            logger.info(decision.sentence(), extra={"wait_reason": decision.reason})
            return ChangeResult(Outcome.WAITING, job.key, job.job_id, decision.reason, line_full=True)
        return self._sender.send(held, edit, decision, attempt, deadline=deadline)

    def dispatch_coalesced(self, *, deadline: float) -> list[ChangeResult]:
        """One dispatcher per execution environment: a signal that arrives while one runs asks it for one more pass.

        Several slots freed together send several signals, often in one batch; each pass reads the whole
        line, so running them side by side would only race for the same waiting uploads.
        """
        with self._lock:
            if self._dispatching:
                self._again = True
                return []
            self._dispatching = True
        results: list[ChangeResult] = []
        try:
            while True:
                with self._lock:
                    self._again = False
                results.extend(self.dispatch(deadline=deadline))
                with self._lock:
                    if not self._again or deadline - time.monotonic() < DISPATCH_RESERVE_SECONDS:
                        # Out of time with a pass still asked for: recovery's next run dispatches too.
                        self._dispatching = False
                        return results
        except BaseException:
            with self._lock:
                self._dispatching = False
            raise

    def dispatch(self, *, deadline: float) -> list[ChangeResult]:
        """Give free slots to the uploads waiting longest, until none is free."""
        results: list[ChangeResult] = []
        for job_id in self._jobs.open_job_ids(JobState.WAITING.value, checked_before_ms=now_ms() + 1, limit=DISPATCH_PASS):
            if deadline - time.monotonic() < DISPATCH_RESERVE_SECONDS:
                break
            if results and self._admission and not self._admission.slot_free():
                # The signal's slot went to the last one: one read ends the pass, where taking the next job would cost
                # its hold, its input check, a refused slot and its place back. The next freed slot signals again.
                break
            holder = new_holder()
            job = self._jobs.take_waiting(job_id, holder=holder, hold_ms=submit_hold_ms(deadline))
            if job is None:
                if self._another_dispatcher_has(job_id):
                    # It goes on down the line while slots are free: racing it for the next ones would only lose
                    # more writes (uploads made at once lost about three each).
                    break
                continue  # ended, or the line's index was behind: the next one
            logger.thread_safe_append_keys(job_id=job.job_id, object_key=job.key)
            try:
                result = self._turn_from_line(Held(job, holder), deadline)
            finally:
                logger.thread_safe_remove_keys(["job_id", "object_key"])
            results.append(result)
            if result.line_full:
                break  # no slot (or no budget) left: the next freed slot signals again
        return results

    def _another_dispatcher_has(self, job_id: str) -> bool:
        """Whether another dispatcher took the job: it is open and out of line, so it is being sent or was (an ended
        job was cancelled; a cancellation that takes a waiting job signals the line once it has ended it).

        Stopping then never leaves the line for good: the job is at fal or on its way (or back in line for a full
        house), and its own end frees a slot and signals again. At worst one freed slot idles until that end, when
        the dispatcher that took it stopped early (its deadline) or the line's index was behind.
        """
        job = self._jobs.get(job_id)
        return job is not None and not job.state.ended

    def _input_present(self, job: Job) -> bool:
        """Whether the upload is still there to be sent. On an unversioned bucket fal is given the pinned copy, and a
        missing key cancels only the key's latest upload (``latest_uploads``): an earlier one was overwritten, not
        deleted, and goes on."""
        if self._images.still_there(job.bucket, job.key, job.version_id):
            return True
        if job.version_id or not job.etag:
            return False
        return self._latest.latest(job.bucket, job.key) != derive_job_id(job.bucket, job.key, None, job.etag)

    def _turn_from_line(self, held: Held, deadline: float) -> ChangeResult:
        job = held.job
        if not self._input_present(job):
            # Deleted while it waited, and its removal not heard yet (or Cancellation found it taken): ended here.
            cancel_unsent(self._finisher, held)
            return ChangeResult(Outcome.CANCELLED, job.key, job.job_id, "input deleted while waiting")
        body = json.loads(job.input_json or "{}")
        edit = Edit(
            body=body,
            content_type=job.content_type or "image/jpeg",
            image_json=job.image_json,
            images=int(body.get("num_images") or 1),
            recipe_json=job.recipe_json,
        )
        return self.take_turn(held, edit, LineAttempt(self._jobs), deadline=deadline)
