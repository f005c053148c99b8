"""From one S3 notification to (at most) one request in fal's queue.

For each uploaded object under the input prefix:

1. create its job, or find it: a second delivery of the same upload stops here;
2. read the tags of that exact version and validate them against the model;
3. check the object is an image we can send, and make it reachable to fal;
4. submit to fal's queue with the webhook URL that names the job;
5. record fal's request id and URLs.

A removed input (``ObjectRemoved``) cancels its jobs fal has not started.

What the user did wrong (tags, object, a 4xx from fal) ends the job FAILED with
an error record, and the message is acknowledged: retrying cannot fix it.
Transient faults are retried inside the invocation (see ``fal_queue``), then
the message goes back to SQS; on its last receive the job is marked failed,
retryably, and the message moves to the DLQ, from where a redrive resumes it.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from kontext_s3.completion import JobFinisher
from kontext_s3.edit_request import InvalidEditRequest, build_model_input
from kontext_s3.fal_queue import FalOutcomeUnknown, FalQueueClient, FalRejected, FalUnavailable, summarize_detail
from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobState, JobStore, now_ms
from kontext_s3.log import logger
from kontext_s3.model_schema import FieldProblem
from kontext_s3.output_store import OutputLayout
from kontext_s3.recovery import Cancellation
from kontext_s3.s3_events import ObjectChange, parse_notification
from kontext_s3.settings import Settings
from kontext_s3.tag_codec import TagEncodingError, decode_tags

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

#: Image formats we send (by their first bytes, not by the Content-Type a client claims).
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),
)


class Outcome(StrEnum):
    SUBMITTED = "submitted"
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


class RetryLater(RuntimeError):
    """A transient fault: the SQS message must come back (and, in the end, go to the DLQ)."""


class _UserError(Exception):
    def __init__(self, code: str, message: str, problems: list[FieldProblem] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.problems = problems or []


class Submitter:
    def __init__(
        self,
        *,
        settings: Settings,
        s3: S3Client,
        jobs: JobStore,
        fal: FalQueueClient,
        finisher: JobFinisher,
        cancellation: Cancellation | None = None,
    ) -> None:
        if not settings.webhook_url:
            raise ValueError("WEBHOOK_URL is not set: fal would have nowhere to report results")
        self._settings = settings
        self._s3 = s3
        self._jobs = jobs
        self._fal = fal
        self._finisher = finisher
        self._cancellation = cancellation
        self._layout = OutputLayout(settings.input_prefix, settings.output_prefix)

    def handle_message(self, body: str, *, receive_count: int, deadline: float) -> list[ChangeResult]:
        """Handle one SQS message body. Raises :class:`RetryLater` (or any error) to have it retried."""
        changes = parse_notification(body)
        if not changes:
            logger.info("s3:TestEvent acknowledged")
        return [self.handle_change(change, receive_count=receive_count, deadline=deadline) for change in changes]

    def handle_change(self, change: ObjectChange, *, receive_count: int, deadline: float) -> ChangeResult:
        logger.thread_safe_append_keys(object_key=change.key, bucket=change.bucket)
        try:
            if not change.key.startswith(self._settings.input_prefix) or change.key.endswith("/"):
                logger.info("ignored: not an object under the input prefix", extra={"input_prefix": self._settings.input_prefix})
                return ChangeResult(Outcome.IGNORED, change.key, detail="outside the input prefix")
            if change.removed and self._cancellation is not None:
                cancelled = self._cancellation.input_removed(change, deadline=deadline)
                return ChangeResult(Outcome.CANCELLED if cancelled else Outcome.IGNORED, change.key, detail=",".join(cancelled))
            if not change.created:
                return ChangeResult(Outcome.IGNORED, change.key, detail=f"{change.event_name} is not an upload")
            if not change.version_id:
                change = replace(change, version_id=self._resolve_version(change))
            job_id = derive_job_id(change.bucket, change.key, change.version_id, change.etag, change.sequencer or change.event_time)
            logger.thread_safe_append_keys(job_id=job_id)
            return self._handle_upload(change, job_id, receive_count=receive_count, deadline=deadline)
        finally:
            logger.thread_safe_remove_keys(["object_key", "bucket", "job_id"])

    # -- one upload ---------------------------------------------------------------

    def _handle_upload(self, change: ObjectChange, job_id: str, *, receive_count: int, deadline: float) -> ChangeResult:
        # The lease outlives this invocation by a margin: if we die, it lapses before SQS redelivers.
        lease_ms = int(max(0.0, deadline - time.monotonic()) * 1000) + 10_000
        job = self._jobs.create(
            job_id=job_id,
            bucket=change.bucket,
            key=change.key,
            version_id=change.version_id,
            etag=change.etag,
            sequencer=change.sequencer,
            event_time=change.event_time,
            output_prefix=self._layout.job_prefix(change.key, job_id),
            lease_ms=lease_ms,
        )
        if job is None:
            taken = self._take_over(job_id, change.key, lease_ms)
            if isinstance(taken, ChangeResult):
                return taken
            job = taken
        assert job.lease_until_ms is not None
        try:
            return self._submit(job, change, deadline=deadline)
        except _UserError as exc:
            self._finisher.fail(job, stage="validation", code=exc.code, message=str(exc), problems=exc.problems)
            return ChangeResult(Outcome.FAILED, change.key, job_id, f"{exc.code}: {exc}")
        except FalRejected as exc:
            if exc.is_auth:
                # Our key, not the user's input: keep the upload and let the operator fix the secret.
                reason = f"fal refused our key (HTTP {exc.status_code}); check the fal key secret"
                return self._retry_later(job, receive_count, reason, code="fal_unavailable")
            self._finisher.fail(
                job,
                stage="submit",
                code="fal_rejected",
                message=str(exc),
                problems=_fal_problems(exc.detail),
                fal={"status_code": exc.status_code, "detail": exc.detail},
            )
            return ChangeResult(Outcome.FAILED, change.key, job_id, str(exc))
        except FalOutcomeUnknown as exc:
            self._jobs.mark_uncertain(job_id, job.lease_until_ms, reason=f"{exc}; not resent, to never pay twice")
            logger.error("fal may have accepted the request; job left UNCERTAIN for its webhook or recovery", extra={"reason": str(exc)})
            return ChangeResult(Outcome.UNCERTAIN, change.key, job_id, str(exc))
        except FalUnavailable as exc:
            return self._retry_later(job, receive_count, str(exc), code="fal_unavailable")
        except Exception as exc:
            return self._retry_later(job, receive_count, f"{type(exc).__name__}: {exc}", code="retries_exhausted")

    def _take_over(self, job_id: str, key: str, lease_ms: int) -> Job | ChangeResult:
        """The job exists: take it up again if that is safe, else report the duplicate."""
        existing = self._jobs.get(job_id)
        if existing is None:  # expired by TTL between the two calls: an old event, treated as a duplicate
            return ChangeResult(Outcome.DUPLICATE, key, job_id, "job expired")
        retry = (existing.state is JobState.SUBMITTING and existing.lease_until_ms is None) or (
            existing.state is JobState.FAILED and existing.failure_retryable
        )
        if retry:
            claimed = self._jobs.claim(job_id, lease_ms=lease_ms)
            if claimed is not None:
                logger.info("resuming job", extra={"attempt": claimed.attempts})
                return claimed
            existing = self._jobs.get(job_id) or existing
        elif existing.state is JobState.SUBMITTING and existing.lease_until_ms is not None and existing.lease_until_ms < now_ms():
            self._jobs.mark_uncertain(
                job_id, existing.lease_until_ms, reason="the worker submitting it stopped mid-way; not resent, to never pay twice"
            )
            logger.error("previous worker died holding the lease: job is UNCERTAIN")
            return ChangeResult(Outcome.UNCERTAIN, existing.key, job_id, "previous worker died mid-submit")
        logger.info("duplicate delivery: job already exists", extra={"state": existing.state.value})
        return ChangeResult(Outcome.DUPLICATE, existing.key, job_id, existing.state.value)

    def _submit(self, job: Job, change: ObjectChange, *, deadline: float) -> ChangeResult:
        fields = self._read_tags(change)
        try:
            # Validated before touching the image: a bad tag is the commonest mistake and costs nothing to report.
            model_input = build_model_input(fields, self._settings.model_defaults, image_url=_s3_uri(change))
        except InvalidEditRequest as exc:
            raise _UserError("invalid_tags", f"the tags do not describe a valid edit: {exc}", exc.problems) from exc
        recorded = model_input.to_request_body()  # with the s3:// address: the presigned URL is a credential, never stored
        body = {**recorded, "image_url": self._reachable_image(change)}
        queued = self._fal.submit(
            self._settings.fal_endpoint,
            body,
            webhook_url=f"{self._settings.webhook_url}/fal/{job.job_id}",
            deadline=deadline,
        )
        self._jobs.mark_submitted(
            job.job_id,
            request_id=queued.request_id,
            gateway_request_id=queued.gateway_request_id,
            status_url=queued.status_url,
            response_url=queued.response_url,
            cancel_url=queued.cancel_url,
            input_json=json.dumps(recorded, sort_keys=True),
        )
        logger.info("submitted to fal", extra={"request_id": queued.request_id, "queue_position": queued.queue_position})
        return ChangeResult(Outcome.SUBMITTED, change.key, job.job_id, queued.request_id)

    def _resolve_version(self, change: ObjectChange) -> str | None:
        """The version an event without ``versionId`` is about: the one whose eTag it names.

        Real S3 sends ``versionId`` on versioned buckets; other producers may not. A
        ``HEAD`` with ``If-Match`` finds the current version when it is still the
        uploaded one, the version list finds it when it was overwritten since.
        """
        try:
            if change.etag:
                head = self._s3.head_object(Bucket=change.bucket, Key=change.key, IfMatch=f'"{change.etag}"')
            else:
                head = self._s3.head_object(Bucket=change.bucket, Key=change.key)
            current = head.get("VersionId")
            return current if current and current != "null" else None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("412", "PreconditionFailed"):
                if _missing(exc):
                    return None
                raise
        listing = self._s3.list_object_versions(Bucket=change.bucket, Prefix=change.key)
        for candidate in listing.get("Versions", []):  # newest first
            if candidate.get("Key") == change.key and candidate.get("ETag", "").strip('"') == change.etag:
                return candidate.get("VersionId")
        return None

    def _read_tags(self, change: ObjectChange) -> dict[str, str]:
        kwargs = {"Bucket": change.bucket, "Key": change.key}
        if change.version_id:
            kwargs["VersionId"] = change.version_id
        try:
            tag_set = self._s3.get_object_tagging(**kwargs)["TagSet"]  # type: ignore[arg-type]
        except ClientError as exc:
            if _missing(exc):
                raise _UserError("input_missing", "the uploaded object no longer exists") from exc
            raise
        tags = {t["Key"]: t["Value"] for t in tag_set}
        try:
            fields = decode_tags(tags)
        except TagEncodingError as exc:
            raise _UserError("invalid_tags", str(exc), [FieldProblem(field=exc.field or "prompt", message=str(exc))]) from exc
        ignored = sorted(set(tags) - set(fields) - {k for k in tags if k.startswith("kx")})
        if ignored:
            logger.debug("tags that are not model fields were ignored", extra={"ignored_tags": ignored})
        return fields

    def _reachable_image(self, change: ObjectChange) -> str:
        """A URL fal can fetch the exact uploaded version from."""
        kwargs = {"Bucket": change.bucket, "Key": change.key}
        if change.version_id:
            kwargs["VersionId"] = change.version_id
        try:
            first = self._s3.get_object(Range="bytes=0-15", **kwargs)  # type: ignore[arg-type]
            first_bytes = first["Body"].read()
        except ClientError as exc:
            if _missing(exc):
                raise _UserError("input_missing", "the uploaded object no longer exists") from exc
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":  # an empty object
                raise _UserError("unsupported_object", "the uploaded object is empty") from exc
            raise
        size = _object_size(first.get("ContentRange"), first.get("ContentLength", 0))
        content_type = sniff_image(first_bytes)
        if content_type is None:
            raise _UserError("unsupported_object", "the uploaded object is not a JPEG, PNG, WebP or GIF image")
        if size > self._settings.max_input_bytes:
            raise _UserError(
                "unsupported_object", f"the image is {size} bytes; the limit is {self._settings.max_input_bytes} (MAX_INPUT_BYTES)"
            )
        if self._settings.image_transport == "data-uri":
            data = self._s3.get_object(**kwargs)["Body"].read()  # type: ignore[arg-type]
            return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"
        return self._s3.generate_presigned_url(
            "get_object",
            Params=kwargs,
            ExpiresIn=self._settings.presign_expiry_seconds,
        )

    def _retry_later(self, job: Job, receive_count: int, reason: str, *, code: str) -> ChangeResult:
        assert job.lease_until_ms is not None
        if receive_count >= self._settings.max_receive_count:
            self._finisher.fail(
                job,
                stage="submit",
                code=code,
                message=f"gave up after {receive_count} deliveries of the S3 event: {reason}",
                retryable=True,
            )
            logger.error("last delivery failed: job marked failed, message goes to the DLQ", extra={"reason": reason})
        else:
            self._jobs.release(job.job_id, job.lease_until_ms, reason=reason)
            logger.warning("transient fault: the message will be retried", extra={"reason": reason, "receive_count": receive_count})
        raise RetryLater(reason)


def sniff_image(first_bytes: bytes) -> str | None:
    for signature, offset, content_type in _SIGNATURES:
        if first_bytes[offset : offset + len(signature)] == signature:
            if content_type == "image/webp" and not first_bytes.startswith(b"RIFF"):
                continue
            return content_type
    return None


def _object_size(content_range: str | None, content_length: int) -> int:
    """The whole object's size from a ranged GET's ``Content-Range: bytes 0-15/12345``."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        if total.isdigit():
            return int(total)
    return content_length


def _missing(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "NoSuchVersion", "404", "NotFound")


def _s3_uri(change: ObjectChange) -> str:
    return f"s3://{change.bucket}/{change.key}" + (f"?versionId={change.version_id}" if change.version_id else "")


def _fal_problems(detail: object) -> list[FieldProblem]:
    if not isinstance(detail, list):
        return [FieldProblem(field="input", message=summarize_detail(detail))]
    problems = []
    for item in detail:
        if isinstance(item, dict):
            loc = [str(x) for x in item.get("loc", []) if x != "body"]
            problems.append(FieldProblem(field=".".join(loc) or "input", message=str(item.get("msg", ""))))
    return problems
