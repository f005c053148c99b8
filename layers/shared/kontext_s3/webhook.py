"""fal's webhook call, from raw request to an ended job.

In order, and with no lasting side effect before the last check passes (the common case, a job at fal with
the signed request id and nobody holding it, is held in one write before steps 3 to 5, and let go if any refuses):

1. the body is no larger than ``WEBHOOK_MAX_BODY_BYTES`` (413);
2. fal's signature verifies (401 when a header is missing, the timestamp is
   stale or no key verifies; 503 when fal's keys cannot be fetched);
3. the job named in the URL exists and its fal request id is the one that
   signed (404 otherwise); a job whose submit is still being recorded answers
   409 so fal retries;
4. the sender is this stack's fal account (403 otherwise; see ``fal_account``);
   only then does an UNCERTAIN job learn its request id from the webhook;
5. the body is a fal webhook document for that same request (400 otherwise).

Then a job that already ended answers 200 and changes nothing (fal retries
webhooks). A request fal could not start before its start timeout was never
run: the upload goes back in line (first) for a fresh try, it is not failed.
Otherwise the webhook claims the job: if another caller holds it, it answers
409 and fal's retry finds the outcome. An OK payload becomes outputs and a
manifest; an ERROR payload or a ``payload_error`` becomes an error record. A
download or S3 fault, or time running out, answers 502 early enough for fal to
retry, and leaves the job open for that retry (or recovery).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from kontext_s3.completion import DeliveryFault, JobFinisher
from kontext_s3.fal_account import FalAccount
from kontext_s3.jobs import Claim, Job, JobState, JobStore
from kontext_s3.log import logger
from kontext_s3.notifications import NotificationError
from kontext_s3.redact import redact
from kontext_s3.webhook_signature import JwksCache, JwksUnavailable, SignatureError, VerifiedWebhook, verify_fal_webhook

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class WebhookAnswer:
    status: int
    body: dict[str, Any]
    #: The job this call ended, if it ended one (for metrics).
    ended: Job | None = field(default=None, compare=False)


class WebhookReceiver:
    def __init__(
        self,
        *,
        jobs: JobStore,
        finisher: JobFinisher,
        jwks: JwksCache,
        account: FalAccount,
        max_body_bytes: int,
        tolerance_seconds: int = 300,
    ) -> None:
        self._jobs = jobs
        self._finisher = finisher
        self._jwks = jwks
        self._account = account
        self._max_body = max_body_bytes
        self._tolerance = tolerance_seconds

    def handle(self, job_id: str, headers: Mapping[str, str], raw_body: bytes, *, deadline: float) -> WebhookAnswer:
        logger.thread_safe_append_keys(job_id=job_id)
        try:
            return self._handle(job_id, headers, raw_body, deadline)
        finally:
            logger.thread_safe_remove_keys(["job_id", "object_key", "request_id"])

    def _handle(self, job_id: str, headers: Mapping[str, str], raw_body: bytes, deadline: float) -> WebhookAnswer:
        if len(raw_body) > self._max_body:
            return _refuse(413, f"body of {len(raw_body)} bytes exceeds the {self._max_body}-byte limit")
        try:
            sender = verify_fal_webhook(headers, raw_body, self._jwks, tolerance_seconds=self._tolerance)
        except SignatureError as exc:
            return _refuse(401, str(exc))
        except JwksUnavailable as exc:
            logger.error("cannot check webhook signatures", extra={"reason": str(exc)})
            return WebhookAnswer(503, {"error": "signature keys unavailable, retry later"})
        logger.thread_safe_append_keys(request_id=sender.request_id)
        if not _JOB_ID.match(job_id):
            return _refuse(404, "no such job")
        # The common case in one write: the job is at fal with this very request, and nobody holds it. Anything else
        # (no such job, another request, an UNCERTAIN job, one that ended or is held) is read, and answered, below.
        early = self._finisher.claim(job_id, deadline=deadline, request_id=sender.request_id)
        answer: WebhookAnswer | tuple[Job, Claim, dict[str, Any], bool] | None = None
        try:
            answer = self._checked(job_id, sender, raw_body, early, deadline)
        finally:
            if early is not None and not (isinstance(answer, tuple) and answer[1] is early):
                # Refused after all (another fal account, a bad body) or a fault while checking: nothing was done,
                # and fal's retry (or recovery) finds the job free.
                self._finisher.let_go(early)
        if not isinstance(answer, tuple):
            return answer
        job, claim, document, succeeded = answer
        try:
            if not succeeded and never_started(document):
                back = self._finisher.requeue(claim, str(document.get("error") or "fal could not start it in time"))
                return WebhookAnswer(200, {"job_id": job_id, "state": (back or job).state.value, "note": "back in line"})
            # fal has ended the request, so it no longer counts against MaxJobsAtFal: hand its slot to the
            # next upload now rather than after the copy, so fal's slots do not idle while we download.
            try:
                self._finisher.give_back(claim.job)
                # Given back: ending the job below need not try again (a conditional write bound to fail).
                claim = replace(claim, job=claim.job.model_copy(update={"slot": None}))
            except (ClientError, BotoCoreError) as exc:
                # Not fatal: ending the job gives it back again, and recovery reclaims a slot that stays leaked.
                logger.warning("could not free the job's slot early", extra={"reason": str(exc)})
            if succeeded:
                ended = self._finisher.succeed(claim, document["payload"], deadline=deadline)
            else:
                message = str(document.get("error") or document.get("payload_error") or "fal reported an error")
                ended = self._finisher.fail(
                    claim.job,
                    claim.holder,
                    stage="fal",
                    code="fal_error",
                    message=message,
                    fal=redact(
                        {
                            "request_id": sender.request_id,
                            "gateway_request_id": document.get("gateway_request_id"),
                            "error": document.get("error"),
                            "error_type": document.get("error_type"),
                            "detail": document.get("payload"),
                            "payload_error": document.get("payload_error"),
                        }
                    ),
                    took_over=claim.took_over,
                )
        except DeliveryFault as exc:
            logger.error("copying outputs failed; fal will retry", extra={"reason": str(exc)})
            return WebhookAnswer(502, {"error": "could not store the outputs yet, retry later"})
        except NotificationError as exc:
            logger.error("the job ended but its event was not published; fal's retry publishes it", extra={"reason": str(exc)})
            return WebhookAnswer(503, {"error": "result stored, event not yet published; retry later"})
        final = ended or self._jobs.get(job_id) or job
        return WebhookAnswer(200, {"job_id": job_id, "state": final.state.value}, ended=ended)

    def _checked(
        self, job_id: str, sender: VerifiedWebhook, raw_body: bytes, early: Claim | None, deadline: float
    ) -> WebhookAnswer | tuple[Job, Claim, dict[str, Any], bool]:
        """The job, held, with the webhook's document and whether it succeeded; or the answer that refuses it."""
        job = early.job if early is not None else self._jobs.get(job_id)
        if job is None:
            return _refuse(404, "no such job")
        logger.thread_safe_append_keys(object_key=job.key)
        if job.request_id is None and job.state in (JobState.SUBMITTING, JobState.SENDING):
            # fal can finish before the submit function has recorded its answer; its retry will find it.
            return _refuse(409, "the job's submit is still being recorded; retry later")
        if job.request_id is not None and job.request_id != sender.request_id:
            return _refuse(404, "this request id does not belong to this job")
        if not self._account.accepts(sender.user_id, proven=job.request_id is not None):
            return _refuse(403, "the webhook comes from a fal account that is not this stack's (FAL_USER_ID)")
        if job.request_id is None and job.state is JobState.UNCERTAIN:
            job = self._jobs.adopt_request(job_id, sender.request_id) or self._jobs.get(job_id) or job
            logger.warning("an UNCERTAIN job's webhook arrived: fal did accept it")
        if job.request_id != sender.request_id:
            return _refuse(404, "this request id does not belong to this job")
        try:
            document = json.loads(raw_body)
        except ValueError:
            return _refuse(400, "body is not JSON")
        if not isinstance(document, dict) or document.get("request_id") != sender.request_id:
            return _refuse(400, "body is not a webhook for the signed request id")
        status = document.get("status")
        succeeded = status == "OK" and document.get("payload") is not None
        if not succeeded and status != "ERROR" and document.get("payload_error") is None:
            return _refuse(400, f"unknown webhook status {status!r}")

        if early is not None:
            return job, early, document, succeeded
        if job.state.ended:
            return self._already_ended(job)
        # Still this request's: a job put back in line and sent again since it was read is not this webhook's.
        claim = self._finisher.claim(job_id, deadline=deadline, request_id=sender.request_id)
        if claim is None:
            current = self._jobs.get(job_id) or job
            if current.state.ended:
                return self._already_ended(current)
            return _refuse(409, "another caller is finishing this job; retry later")
        return job, claim, document, succeeded

    def _already_ended(self, job: Job) -> WebhookAnswer:
        try:
            self._finisher.notify(job)  # a crash between ending and publishing is mended by the retry
        except NotificationError as exc:
            logger.error("publishing a missed event failed; fal's retry publishes it", extra={"reason": str(exc)})
            return WebhookAnswer(503, {"error": "event not yet published; retry later"})
        return WebhookAnswer(200, {"job_id": job.job_id, "state": job.state.value, "note": "already recorded"})


def never_started(document: Mapping[str, Any]) -> bool:
    """Whether fal reports that the request timed out before a runner started it (``X-Fal-Request-Timeout``): it never ran."""
    payload = document.get("payload")
    error_type = document.get("error_type") or (payload.get("error_type") if isinstance(payload, dict) else None)
    return error_type in ("request_timeout", "startup_timeout")


def deadline_from(remaining_ms: int, *, margin_seconds: float = 8.0) -> float:
    """A monotonic deadline that leaves ``margin_seconds`` of the invocation to answer.

    The margin covers one media read timing out after the deadline (``MediaPolicy.read_timeout_seconds``)
    and the answer itself, so fal hears a 5xx before Lambda's timeout cuts us off.
    """
    return time.monotonic() + max(0.5, remaining_ms / 1000 - margin_seconds)


def _refuse(status: int, reason: str) -> WebhookAnswer:
    logger.warning("webhook refused", extra={"status": status, "reason": reason})
    return WebhookAnswer(status, {"error": reason})
