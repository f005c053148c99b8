"""fal's webhook call, from raw request to an ended job.

In order, and with no side effect before the last check passes:

1. the body is no larger than ``WEBHOOK_MAX_BODY_BYTES`` (413);
2. fal's signature verifies (401 when a header is missing, the timestamp is
   stale or no key verifies; 503 when fal's keys cannot be fetched);
3. the job named in the URL exists and its fal request id is the one that
   signed (404 otherwise); an UNCERTAIN job learns its request id here, and a
   job whose submit is still being recorded answers 409 so fal retries;
4. the body is a fal webhook document for that same request (400 otherwise).

Then a job that already ended answers 200 and changes nothing (fal retries
webhooks); an OK payload becomes outputs and a manifest; an ERROR payload or a
``payload_error`` becomes an error record. A download or S3 fault answers 502
and leaves the job open, so fal's retry (or the recovery function) finishes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kontext_s3.completion import DeliveryFault, JobFinisher
from kontext_s3.jobs import Job, JobState, JobStore
from kontext_s3.log import logger
from kontext_s3.webhook_signature import JwksCache, JwksUnavailable, SignatureError, verify_fal_webhook

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class WebhookAnswer:
    status: int
    body: dict[str, Any]
    #: The job this call ended, if it ended one (for metrics).
    ended: Job | None = field(default=None, compare=False)


class WebhookReceiver:
    def __init__(
        self, *, jobs: JobStore, finisher: JobFinisher, jwks: JwksCache, max_body_bytes: int, tolerance_seconds: int = 300
    ) -> None:
        self._jobs = jobs
        self._finisher = finisher
        self._jwks = jwks
        self._max_body = max_body_bytes
        self._tolerance = tolerance_seconds

    def handle(self, job_id: str, headers: Mapping[str, str], raw_body: bytes) -> WebhookAnswer:
        logger.thread_safe_append_keys(job_id=job_id)
        try:
            return self._handle(job_id, headers, raw_body)
        finally:
            logger.thread_safe_remove_keys(["job_id", "object_key", "request_id"])

    def _handle(self, job_id: str, headers: Mapping[str, str], raw_body: bytes) -> WebhookAnswer:
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
        job = self._jobs.get(job_id) if _JOB_ID.match(job_id) else None
        if job is None:
            return _refuse(404, "no such job")
        logger.thread_safe_append_keys(object_key=job.key)
        if job.request_id is None and job.state is JobState.SUBMITTING:
            # fal can finish before the submit function has recorded its answer; its retry will find it.
            return _refuse(409, "the job's submit is still being recorded; retry later")
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

        if job.state.ended:
            self._finisher.notify(job)  # a crash between ending and publishing is mended by the retry
            return WebhookAnswer(200, {"job_id": job_id, "state": job.state.value, "note": "already recorded"})

        status = document.get("status")
        if status == "OK" and document.get("payload") is not None:
            try:
                ended = self._finisher.succeed(job, document["payload"])
            except DeliveryFault as exc:
                logger.error("copying outputs failed; fal will retry", extra={"reason": str(exc)})
                return WebhookAnswer(502, {"error": "could not store the outputs yet, retry later"})
        elif status == "ERROR" or document.get("payload_error") is not None:
            message = str(document.get("error") or document.get("payload_error") or "fal reported an error")
            ended = self._finisher.fail(
                job,
                stage="fal",
                code="fal_error",
                message=message,
                fal={
                    "request_id": sender.request_id,
                    "gateway_request_id": document.get("gateway_request_id"),
                    "error": document.get("error"),
                    "detail": document.get("payload"),
                    "payload_error": document.get("payload_error"),
                },
            )
        else:
            return _refuse(400, f"unknown webhook status {status!r}")
        final = ended or self._jobs.get(job_id) or job
        return WebhookAnswer(200, {"job_id": job_id, "state": final.state.value}, ended=ended)


def _refuse(status: int, reason: str) -> WebhookAnswer:
    logger.warning("webhook refused", extra={"status": status, "reason": reason})
    return WebhookAnswer(status, {"error": reason})
