"""Finishing jobs whose webhook never came, and cancelling jobs whose input was deleted.

The recovery function runs on a schedule. It reads open jobs from the
``open-jobs`` index, least recently checked first, marks each one checked, and
asks the one who knows, fal, through the URLs fal returned (bounded
concurrency, and never past its deadline). So a backlog of long-running jobs
cannot starve the others: each run looks at different ones.

* SUBMITTED (and UNCERTAIN with a request id) not heard of for
  ``RECOVERY_AFTER_SECONDS``: fal's status. A completed request is finished
  exactly as its webhook would have finished it (the same
  :class:`JobFinisher`, after claiming the job); a failed one gets its error
  record; one still queued or running past ``JOB_MAX_AGE_SECONDS`` is
  cancelled and failed; one fal no longer knows is failed past the max age.
* SENDING whose sender's hold lapsed: its sender died mid-request, so it
  becomes UNCERTAIN (never sent again).
* UNCERTAIN with no request id past ``JOB_MAX_AGE_SECONDS``: fal's own webhook
  retries would have told us by now if it had run, so it fails with that
  explanation.
* SUBMITTING past ``JOB_MAX_AGE_SECONDS`` and not held: its message is gone
  (a redrive would have resumed it), so it fails retryably.
* Ended jobs whose event was never published: published now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from kontext_s3.admission import Admission
from kontext_s3.completion import DeliveryFault, JobFinisher
from kontext_s3.fal_queue import FalError, FalQueueClient, FalRejected
from kontext_s3.jobs import AT_FAL, NOTIFY, Job, JobState, JobStore, now_ms
from kontext_s3.log import logger
from kontext_s3.notifications import NotificationError
from kontext_s3.redact import redact

if TYPE_CHECKING:
    pass

#: How often a SENDING job is looked at for a lapsed hold, and an unpublished event retried.
_SHORT_CHECK_MS = 60_000


@dataclass
class RecoveryReport:
    checked: int = 0
    completed: int = 0
    failed: int = 0
    uncertain: int = 0
    notified: int = 0
    still_running: int = 0
    #: UNCERTAIN jobs this run looked at and could not settle (fal may hold them; none is resent).
    stuck_uncertain: int = 0
    back_in_line: int = 0
    slots_reclaimed: int = 0
    images_used_today: int = 0
    waiting: int = 0
    errors: list[str] = field(default_factory=list)


class Recovery:
    def __init__(
        self,
        *,
        jobs: JobStore,
        fal: FalQueueClient,
        finisher: JobFinisher,
        recovery_after_seconds: int,
        job_max_age_seconds: int,
        parallel: int = 8,
        admission: Admission | None = None,
        slot_freed: Callable[[], None] | None = None,
    ) -> None:
        self._admission = admission if admission is not None and admission.limited else None
        self._slot_freed = slot_freed
        self._jobs = jobs
        self._fal = fal
        self._finisher = finisher
        self._after_ms = recovery_after_seconds * 1000
        self._max_age_ms = job_max_age_seconds * 1000
        self._parallel = parallel

    def run(self, *, deadline: float, limit: int = 200) -> RecoveryReport:
        report = RecoveryReport()
        now = now_ms()
        plan: list[tuple[str, int, Callable[[Job, float], str]]] = [
            (JobState.SUBMITTED.value, now - self._after_ms, self._check_at_fal),
            (JobState.UNCERTAIN.value, now - self._after_ms, self._check_uncertain),
            (JobState.SENDING.value, now - _SHORT_CHECK_MS, self._check_sending),
            (JobState.SUBMITTING.value, now - self._after_ms, self._check_submitting),
            (NOTIFY, now - _SHORT_CHECK_MS, self._publish_missed_event),
        ]
        with ThreadPoolExecutor(max_workers=self._parallel, thread_name_prefix="recover") as pool:
            listings = list(pool.map(lambda step: self._jobs.open_job_ids(step[0], checked_before_ms=step[1], limit=limit), plan))
            work = [(job_id, action) for (_, _, action), ids in zip(plan, listings, strict=True) for job_id in ids]
            outcomes = list(pool.map(lambda item: self._one(item[0], item[1], deadline), work))
        for outcome in outcomes:
            if outcome == "skipped":
                continue
            report.checked += 1
            if outcome.startswith("error:"):
                report.errors.append(outcome[6:])
            elif outcome in ("completed", "failed", "uncertain", "notified"):
                setattr(report, outcome, getattr(report, outcome) + 1)
            elif outcome == "stuck-uncertain":
                report.stuck_uncertain += 1
            elif outcome == "back-in-line":
                report.back_in_line += 1
            else:
                report.still_running += 1
        skipped = outcomes.count("skipped")
        if skipped:
            logger.info("recovery stopped for lack of time; the next run continues", extra={"left": skipped})
        if self._admission is not None:
            report.slots_reclaimed = len(self._admission.reclaim(self._still_needs_slot))
            report.images_used_today = self._admission.used_today() if self._admission.daily_image_budget else 0
        report.waiting = len(self._jobs.open_job_ids(JobState.WAITING.value, checked_before_ms=now_ms() + 1, limit=1000))
        if report.waiting and self._slot_freed is not None:
            # Every run kicks the line: a lost signal, a new budget day, or fal back up.
            self._slot_freed()
        return report

    def _still_needs_slot(self, slot: str, job_id: str, taker: str) -> bool:
        """Whether the take ``slot`` is (or may be) at fal, or about to be: else it leaked."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        if job.slot == slot and job.state in (JobState.SENDING, JobState.SUBMITTED, JobState.UNCERTAIN):
            return True
        # Between taking the slot and sending: alive while the hold that took it is.
        return job.state is JobState.SUBMITTING and job.holder == taker and not job.hold_lapsed()

    def _one(self, job_id: str, action: Callable[[Job, float], str], deadline: float) -> str:
        if time.monotonic() > deadline:
            return "skipped"
        logger.thread_safe_append_keys(job_id=job_id)
        try:
            job = self._jobs.get(job_id)
            if job is None:
                return "gone"
            logger.thread_safe_append_keys(object_key=job.key)
            self._jobs.touch(job)  # checked now, whatever comes of it: the next run starts with others
            return action(job, deadline)
        except (FalError, DeliveryFault, NotificationError) as exc:
            logger.warning("recovery could not finish the job this time", extra={"reason": redact(str(exc))})
            return f"error:{job_id}: {redact(str(exc))}"
        except Exception as exc:
            logger.exception("recovery failed on a job", extra={"reason": redact(str(exc))})
            return f"error:{job_id}: {type(exc).__name__}"
        finally:
            logger.thread_safe_remove_keys(["job_id", "object_key"])

    def _too_old(self, job: Job) -> bool:
        started = job.submitted_at_ms or job.sent_at_ms or _ms(job.created_at)
        return now_ms() - started > self._max_age_ms

    def _check_at_fal(self, job: Job, deadline: float) -> str:
        if job.state not in AT_FAL or not job.status_url or not job.response_url:
            return "running"
        try:
            status = self._fal.status(job.status_url, deadline=deadline)
        except FalRejected as exc:
            if not self._too_old(job):
                raise
            return self._end_failed(
                job,
                deadline,
                code="timed_out",
                message=f"fal could not report on the request after {self._max_age_ms // 1000} s: {exc}",
            )
        state = status.get("status")
        if state == "COMPLETED" and status.get("error_type") in ("request_timeout", "startup_timeout"):
            claim = self._finisher.claim(job.job_id, deadline=deadline, request_id=job.request_id)
            if claim is None:
                return "ended-elsewhere"
            return "back-in-line" if self._finisher.requeue(claim, str(status.get("error"))) else "ended-elsewhere"
        if state == "COMPLETED" and not status.get("error"):
            claim = self._finisher.claim(job.job_id, deadline=deadline, request_id=job.request_id)
            if claim is None:
                return "ended-elsewhere"
            try:
                output = self._fal.result(job.response_url, deadline=deadline)
            except FalError:
                self._finisher.let_go(claim)
                raise
            ended = self._finisher.succeed(claim, output, deadline=deadline)
            logger.info("job recovered after its webhook was lost")
            return _outcome(ended)
        if state == "COMPLETED":
            detail = self._result_detail(job, deadline)
            return self._end_failed(
                job,
                deadline,
                code="fal_error",
                message=str(status.get("error")),
                fal={"request_id": job.request_id, "error": status.get("error"), "error_type": status.get("error_type"), "detail": detail},
            )
        if self._too_old(job):
            claim = self._finisher.claim(job.job_id, deadline=deadline, request_id=job.request_id)
            if claim is None:
                return "ended-elsewhere"
            cancelled = bool(job.cancel_url) and self._fal.cancel(str(job.cancel_url), deadline=deadline)
            if not cancelled:
                # fal runs it, and will bill it: the job keeps its slot (fal still holds the request) and its end, by
                # webhook or by the next look at fal's status, writes its outputs as for any other job.
                self._finisher.let_go(claim)
                logger.warning("past its max age, but fal would not cancel it (it runs): left to finish", extra={"status": state})
                return "running-past-max-age"
            ended = self._finisher.fail(
                claim.job,
                claim.holder,
                stage="fal",
                code="timed_out",
                message=f"fal had not started the request after {self._max_age_ms // 1000} s (it was {state}); it was cancelled",
                fal={"request_id": job.request_id, "status": state},
                took_over=claim.took_over,
            )
            return _outcome(ended)
        return "running"

    def _end_failed(self, job: Job, deadline: float, *, code: str, message: str, fal: dict[str, object] | None = None) -> str:
        claim = self._finisher.claim(job.job_id, deadline=deadline, request_id=job.request_id)
        if claim is None:
            return "ended-elsewhere"
        ended = self._finisher.fail(
            claim.job,
            claim.holder,
            stage="fal",
            code=code,
            message=message,
            fal=fal or {"request_id": job.request_id},
            took_over=claim.took_over,
        )
        return _outcome(ended)

    def _result_detail(self, job: Job, deadline: float) -> object:
        """fal's detail for a failed request, if it gives it quickly: the failure is recorded either way."""
        assert job.response_url
        try:
            return self._fal.result(job.response_url, deadline=min(deadline, time.monotonic() + 5))
        except FalError as exc:
            return exc.detail

    def _check_uncertain(self, job: Job, deadline: float) -> str:
        if job.request_id and job.status_url:
            outcome = self._check_at_fal(job, deadline)
            return "stuck-uncertain" if outcome == "running" else outcome
        if not self._too_old(job):
            logger.warning("job still UNCERTAIN: no webhook yet, and no request id to ask fal about")
            return "stuck-uncertain"
        claim = self._finisher.claim(job.job_id, deadline=deadline, states=(JobState.UNCERTAIN,))
        if claim is None:
            return "ended-elsewhere"
        ended = self._finisher.fail(
            claim.job,
            claim.holder,
            stage="submit",
            code="submit_uncertain",
            message=(
                "fal did not answer the submit clearly, and no webhook came for it within "
                f"{self._max_age_ms // 1000} s; it was not sent again so as not to pay twice. Upload again to retry."
            ),
            took_over=claim.took_over,
        )
        return _outcome(ended)

    def _check_sending(self, job: Job, deadline: float) -> str:
        if job.state is not JobState.SENDING or not job.hold_lapsed():
            return "running"
        marked = self._jobs.sender_died(job.job_id)
        if marked is None:
            return "ended-elsewhere"
        logger.error("a sender died mid-request: job is UNCERTAIN")
        return "uncertain"

    def _check_submitting(self, job: Job, deadline: float) -> str:
        if job.state is JobState.SUBMITTING and job.from_line and job.hold_lapsed():
            # Taken from the line by a submit function that died before sending: it has no message, so back in line.
            return "back-in-line" if self._jobs.return_to_line(job.job_id) else "ended-elsewhere"
        if job.state is not JobState.SUBMITTING or not self._too_old(job) or (job.holder is not None and not job.hold_lapsed()):
            return "running"
        claim = self._finisher.claim(job.job_id, deadline=deadline, states=(JobState.SUBMITTING,))
        if claim is None:
            return "ended-elsewhere"
        ended = self._finisher.fail(
            claim.job,
            claim.holder,
            stage="submit",
            code="submit_stalled",
            message=f"the upload's event was not processed to the end within {self._max_age_ms // 1000} s and is no longer queued",
            retryable=True,
        )
        return _outcome(ended)

    def _publish_missed_event(self, job: Job, deadline: float) -> str:
        if not job.state.ended or job.notified_at_ms:
            return "running"
        self._finisher.notify(job)
        return "notified"


def _ms(iso_time: str) -> int:
    return int(datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp() * 1000)


def _outcome(ended: Job | None) -> str:
    if ended is None:
        return "ended-elsewhere"
    return "completed" if ended.state is JobState.COMPLETED else "failed"


__all__ = ["Recovery", "RecoveryReport"]
