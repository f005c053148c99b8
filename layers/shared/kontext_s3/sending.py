"""Sending one held, admitted job to fal's queue, and recording what fal's answer proves.

The job is marked SENDING first (the point of no return: from there the request may be at fal), then submitted
with the webhook URL that names it. fal's answer (see ``fal_queue``) is one of: accepted (SUBMITTED), certainly
not enqueued (the only road back to a later resend), refused (FAILED, with a record), or unknown (UNCERTAIN,
never resent). What happens when nothing could be sent is the attempt's to decide (``delivery``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from kontext_s3.admission import Admission, Admitted
from kontext_s3.completion import JobFinisher
from kontext_s3.delivery import Attempt
from kontext_s3.edit_reading import Edit
from kontext_s3.fal_queue import Accepted, FalKeyMissing, FalQueueClient, NotEnqueued, Refused, SubmitOutcome, Unknown, summarize_detail
from kontext_s3.holding import Held
from kontext_s3.input_image import missing
from kontext_s3.jobs import JobStore
from kontext_s3.log import logger
from kontext_s3.model_schema import FieldProblem
from kontext_s3.outcomes import ChangeResult, Outcome, RetryLater
from kontext_s3.redact import redact
from kontext_s3.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class Sender:
    def __init__(
        self, *, settings: Settings, s3: S3Client, jobs: JobStore, fal: FalQueueClient, finisher: JobFinisher, admission: Admission | None
    ) -> None:
        self._settings = settings
        self._s3 = s3
        self._jobs = jobs
        self._fal = fal
        self._finisher = finisher
        self._admission = admission

    def send(self, held: Held, edit: Edit, admitted: Admitted, attempt: Attempt, *, deadline: float) -> ChangeResult:
        job, holder = held.job, held.holder
        try:
            key = self._fal.key()
            # Made now, after admission: the URL's life starts when its turn comes, not when it was uploaded.
            image_url, start_within = self._reachable_image(held, edit)
        except Exception as exc:  # nothing has been sent yet
            self.give_back(job.job_id, admitted)
            if isinstance(exc, ClientError) and missing(exc):  # its input is gone (a data URI reads it): nothing to wait for
                message = "the input object was deleted before it could be sent; nothing was sent"
                self._finisher.fail(job, holder, stage="submit", code="input_missing", message=message)
                return ChangeResult(Outcome.FAILED, job.key, job.job_id, message)
            if isinstance(exc, FalKeyMissing):  # the whole sentence is the news: it names the secret and the command
                return attempt.not_sent(held, edit, str(exc), code="fal_key_missing", cause=exc)
            return attempt.not_sent(held, edit, f"{type(exc).__name__}: {exc}", code="retries_exhausted", cause=exc)
        sending = self._jobs.begin_send(
            job.job_id,
            holder,
            input_json=edit.input_json,
            slot=admitted.slot,
            budget_day=admitted.budget_day,
            images=admitted.images,
            recipe_json=edit.recipe_json,
            image_json=edit.image_json,
        )
        if sending is None:
            # Our hold lapsed: recovery may have handed our slot on, so nothing is sent. The job is taken up
            # again by whoever took it, or by the line / the message's next delivery, never dropped.
            self.give_back(job.job_id, admitted)
            logger.warning("lost the hold before sending (it lapsed, or another worker took the job); nothing sent")
            return attempt.hold_lost(held, edit)
        # From here the request may be at fal: every path below ends in a recorded state, never a resend.
        outcome: SubmitOutcome | None = None
        try:
            outcome = self._fal.submit(
                self._settings.fal_endpoint,
                {**edit.body, "image_url": image_url},
                webhook_url=f"{self._settings.webhook_url}/fal/{job.job_id}",
                deadline=deadline,
                key=key,
                headers=self._headers(start_within),
            )
            return self._settle(Held(sending, holder), edit, admitted, outcome, attempt)
        except RetryLater:
            raise  # the attempt's own verdict (fal did not take it): the message comes back
        except Exception as exc:
            reason = f"our own failure after sending ({type(exc).__name__}: {redact(str(exc))}); not resent, to never pay twice"
            request_id = outcome.request.request_id if isinstance(outcome, Accepted) else getattr(outcome, "request_id", None)
            self._record_uncertain(held, reason, request_id)
            return ChangeResult(Outcome.UNCERTAIN, job.key, job.job_id, reason, fal_attempts=getattr(outcome, "attempts", 1))

    def give_back(self, job_id: str, admitted: Admitted) -> None:
        """What admission granted for a request fal does not hold: the slot and the images.

        The line is not told: this happens when fal (or our own sending) failed, and telling it would
        send the next upload into the same failure at once, and again. Recovery kicks the line on its
        schedule, and every job that ends frees its slot with a signal.
        """
        if self._admission is None:
            return
        self._admission.release(admitted.slot)
        self._admission.refund(admitted.budget_day, admitted.images)

    def _headers(self, start_within: int | None) -> dict[str, str]:
        headers = {"X-Fal-Request-Timeout": str(start_within)} if start_within else {}
        if self._settings.fal_media_retention_seconds:
            headers["X-Fal-Object-Lifecycle-Preference"] = json.dumps(
                {"expiration_duration_seconds": self._settings.fal_media_retention_seconds}
            )
        return headers

    def _settle(self, held: Held, edit: Edit, admitted: Admitted, outcome: SubmitOutcome, attempt: Attempt) -> ChangeResult:
        """Record what fal's answer proves."""
        job, attempts = held.job, outcome.attempts
        match outcome:
            case Accepted(request=queued):
                recorded = self._jobs_write(
                    lambda: self._jobs.mark_submitted(
                        job.job_id,
                        held.holder,
                        request_id=queued.request_id,
                        gateway_request_id=queued.gateway_request_id,
                        status_url=queued.status_url,
                        response_url=queued.response_url,
                        cancel_url=queued.cancel_url,
                        queue_position=queued.queue_position,
                    )
                )
                if recorded is None:
                    current = self._jobs.get(job.job_id)
                    if current is None or current.request_id != queued.request_id:
                        self._record_uncertain(held, "fal accepted it but recording that failed; not resent", queued.request_id)
                        return ChangeResult(Outcome.UNCERTAIN, job.key, job.job_id, queued.request_id, attempts)
                logger.info("submitted to fal", extra={"request_id": queued.request_id, "queue_position": queued.queue_position})
                return ChangeResult(Outcome.SUBMITTED, job.key, job.job_id, queued.request_id, attempts)
            case NotEnqueued(reason=reason):
                # Nothing is at fal: what admission granted goes back, and the upload is sent again later.
                self.give_back(job.job_id, admitted)
                if outcome.is_auth:  # our key, not the user's input: keep the upload and let the operator fix the secret
                    reason = f"fal refused our key ({reason}); check the fal key secret"
                return attempt.not_enqueued(held, edit, reason, attempts=attempts)
            case Refused(reason=reason, status_code=status, detail=detail):
                self._finisher.fail(
                    job,
                    held.holder,
                    stage="submit",
                    code="fal_rejected",
                    message=reason,
                    problems=fal_problems(detail),
                    fal={"status_code": status, "detail": detail},
                    never_ran=True,
                )
                return ChangeResult(Outcome.FAILED, job.key, job.job_id, reason, attempts)
            case Unknown(reason=reason, request_id=request_id):
                self._record_uncertain(held, f"{reason}; not resent, to never pay twice", request_id)
                return ChangeResult(Outcome.UNCERTAIN, job.key, job.job_id, reason, attempts)
        raise AssertionError(f"unhandled outcome {outcome!r}")

    def _record_uncertain(self, held: Held, reason: str, request_id: str | None) -> None:
        """Leave the job UNCERTAIN with whatever id we have; if even that cannot be written, its hold lapses into UNCERTAIN."""
        urls = None
        if request_id:
            built = self._fal.request_urls(self._settings.fal_endpoint, request_id)
            urls = (built.status_url, built.response_url, built.cancel_url)
        written = self._jobs_write(
            lambda: self._jobs.mark_uncertain(held.job.job_id, holder=held.holder, reason=reason, request_id=request_id, urls=urls)
        )
        logger.error(
            "fal may hold the request; job left UNCERTAIN for its webhook or recovery, never resent",
            extra={"reason": redact(reason), "request_id": request_id, "recorded": written is not None},
        )

    @staticmethod
    def _jobs_write(write: Callable[[], Any]) -> Any:
        """A jobs-table write after sending (the SDK retries it); ``None`` when it still fails, which is logged."""
        try:
            return write()
        except ClientError as exc:
            logger.warning("jobs table write failed after sending", extra={"reason": str(exc)})
            return None

    def _reachable_image(self, held: Held, edit: Edit) -> tuple[str, int | None]:
        """A URL fal can fetch the uploaded version from, and how soon fal must start the request to find it valid.

        fal's runner fetches the input when the request starts, after any wait in fal's queue; a
        presigned URL expires. So the submit asks fal (``X-Fal-Request-Timeout``) to start it well
        within the URL's life, or not at all: a request that could not start is sent again later,
        with a fresh URL. A data URI does not expire.
        """
        job, copy = held.job, edit.prepared_key
        kwargs = {"Bucket": job.bucket, "Key": copy} if copy else {"Bucket": job.bucket, "Key": job.key}
        if job.version_id and not copy:
            kwargs["VersionId"] = job.version_id
        if self._settings.image_transport == "data-uri":
            data = self._s3.get_object(**kwargs)["Body"].read()  # type: ignore[arg-type]
            return f"data:{edit.content_type};base64,{base64.b64encode(data).decode('ascii')}", None
        expiry = self._settings.presign_expiry_seconds
        url = self._s3.generate_presigned_url("get_object", Params=kwargs, ExpiresIn=expiry)
        return url, max(2, expiry - min(60, expiry // 2))


def fal_problems(detail: object) -> list[FieldProblem]:
    if not isinstance(detail, list):
        return [FieldProblem(field="input", message=summarize_detail(detail))]
    problems = []
    for item in detail:
        if isinstance(item, dict):
            loc = [str(x) for x in item.get("loc", []) if x != "body"]
            problems.append(FieldProblem(field=".".join(loc) or "input", message=str(item.get("msg", ""))))
    return problems
