"""Ending a job: outputs and manifest, or an error record; then the state, then the event.

The webhook, the recovery function and the submit function's failures all end
jobs here, so every ending leaves the same evidence: files in S3 that a user
finds from the input key, the job's end state, and one EventBridge event.

Order matters. Files are written first and the state moved after, with a
conditional write: if the function dies in between, the job is still open and
the next webhook retry (or the recovery function) writes the same keys again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from kontext_s3.jobs import Job, JobState, JobStore, iso, now_ms
from kontext_s3.log import logger
from kontext_s3.media_urls import MediaUrlRefused, check_media_url
from kontext_s3.model_schema import FieldProblem, KontextMaxOutput
from kontext_s3.notifications import JobEvents
from kontext_s3.output_store import OutputLayout, TooLarge, content_type_for, extension, parse_data_uri, stream_to_s3, write_json

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MANIFEST_VERSION = 1


class DeliveryFault(RuntimeError):
    """Copying the outputs failed for a reason a retry may fix: answer 5xx, keep the job open."""


@dataclass(frozen=True)
class CopiedImage:
    key: str
    content_type: str
    bytes: int


@dataclass
class MediaPolicy:
    allowed_urls: Sequence[str]
    max_image_bytes: int
    timeout_seconds: float = 30.0
    parallel_downloads: int = 4


@dataclass
class JobFinisher:
    s3: S3Client
    jobs: JobStore
    events: JobEvents
    layout: OutputLayout
    http: httpx.Client | None = None
    media: MediaPolicy = field(default_factory=lambda: MediaPolicy(allowed_urls=(), max_image_bytes=100 * 1024 * 1024))

    # -- failure ------------------------------------------------------------------

    def fail(
        self,
        job: Job,
        *,
        stage: str,
        code: str,
        message: str,
        problems: Iterable[FieldProblem] = (),
        fal: dict[str, Any] | None = None,
        retryable: bool = False,
        from_states: tuple[JobState, ...] = (JobState.SUBMITTING, JobState.SUBMITTED, JobState.UNCERTAIN),
    ) -> Job | None:
        """Write ``error.json`` beside where the outputs would be, then end the job as FAILED.

        Returns the ended job, or ``None`` if it had already ended; its state is then
        left as it was, and an error record that a success had made untrue is removed.
        Two *different* failures racing (recovery timing a job out as fal's ERROR
        webhook lands) can leave the loser's ``error.json``; the job record, written
        conditionally, stays the authority.
        """
        error_key = self.layout.error_key(job.output_prefix)
        record = {
            "kontext_s3_error": MANIFEST_VERSION,
            "job_id": job.job_id,
            "source": source_of(job),
            "stage": stage,
            "code": code,
            "message": message,
            "problems": [p.model_dump(mode="json") for p in problems],
            "fal": fal,
            "retryable": retryable,
            "what_to_do": _advice(code, retryable),
            "at": iso(now_ms()),
        }
        write_json(self.s3, job.bucket, error_key, record)
        ended = self.jobs.fail(job.job_id, code=code, message=message, error_key=error_key, retryable=retryable, from_states=from_states)
        if ended is None:
            current = self.jobs.get(job.job_id)
            if current is not None and current.state is JobState.COMPLETED:
                # Lost a race with a success: the error record would contradict the outputs.
                self.s3.delete_object(Bucket=job.bucket, Key=error_key)
            return None
        logger.warning("job failed", extra={"code": code, "reason": message, "error_key": error_key})
        self.notify(ended)
        return ended

    # -- success --------------------------------------------------------------------

    def succeed(self, job: Job, payload: Any) -> Job | None:
        """Copy every output image and write the manifest, then end the job COMPLETED.

        A payload that is not a valid model output, or that names a URL off the
        allow-list, ends the job FAILED with the reason (nothing is fetched).
        Raises :class:`DeliveryFault` when a download or an S3 write fails.
        """
        try:
            output = KontextMaxOutput.model_validate(payload)
        except ValidationError as exc:
            return self.fail(
                job,
                stage="output",
                code="invalid_output",
                message=f"fal's output does not match the model's output schema: {exc.error_count()} problem(s)",
                problems=[FieldProblem(field=".".join(str(x) for x in e["loc"]), message=e["msg"]) for e in exc.errors()],
                fal={"request_id": job.request_id, "payload": _elide_data_uris(payload)},
            )
        for image in output.images:
            if not image.url.startswith("data:"):
                try:
                    check_media_url(image.url, self.media.allowed_urls)
                except MediaUrlRefused as exc:
                    return self.fail(
                        job,
                        stage="output",
                        code="media_url_refused",
                        message=f"an output image URL was refused and not fetched: {exc}",
                        fal={"request_id": job.request_id},
                    )
        output_format = (job.sent_input or {}).get("output_format")
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, min(self.media.parallel_downloads, len(output.images)))) as pool:
            copied = list(
                pool.map(
                    lambda pair: self._copy_image(job, pair[0], pair[1].url, pair[1].content_type, output_format),
                    enumerate(output.images),
                )
            )
        manifest_key = self.layout.manifest_key(job.output_prefix)
        manifest = {
            "kontext_s3_manifest": MANIFEST_VERSION,
            "job_id": job.job_id,
            "request_id": job.request_id,
            "source": source_of(job),
            "input": job.sent_input,
            "output": _elide_data_uris(output.model_dump(mode="json")),
            "images": [
                {
                    "key": c.key,
                    "content_type": c.content_type,
                    "bytes": c.bytes,
                    "width": image.width,
                    "height": image.height,
                }
                for c, image in zip(copied, output.images, strict=True)
            ],
            # No "completed at": concurrent deliveries must write identical manifests.
            # The job's history and S3's LastModified say when it was written.
            "uploaded_at": job.event_time,
            "submitted_at": iso(job.submitted_at_ms) if job.submitted_at_ms else None,
        }
        try:
            write_json(self.s3, job.bucket, manifest_key, manifest)
        except (ClientError, BotoCoreError) as exc:
            raise DeliveryFault(f"cannot write the manifest: {exc}") from exc
        ended = self.jobs.complete(job.job_id, output_keys=[c.key for c in copied], manifest_key=manifest_key)
        if ended is None:
            return None
        if job.attempts > 1:
            # An earlier, retryable failure may have left an error record that is no longer true.
            self.s3.delete_object(Bucket=job.bucket, Key=self.layout.error_key(job.output_prefix))
        logger.info(
            "job completed",
            extra={"images": len(copied), "manifest_key": manifest_key, "copy_seconds": round(time.monotonic() - started, 3)},
        )
        self.notify(ended)
        return ended

    def notify(self, job: Job) -> None:
        """Publish the job's end event once (a retry of an ended job publishes what was missed)."""
        if job.notified or not self.events.enabled:
            return
        self.events.ended(job)
        self.jobs.mark_notified(job.job_id)

    def _copy_image(self, job: Job, index: int, url: str, content_type: str | None, output_format: str | None) -> CopiedImage:
        try:
            if url.startswith("data:"):
                data = parse_data_uri(url)
                key = self.layout.image_key(job.output_prefix, index, data.content_type, output_format)
                self.s3.put_object(Bucket=job.bucket, Key=key, Body=data.data, ContentType=data.content_type)
                return CopiedImage(key=key, content_type=data.content_type, bytes=len(data.data))
            if self.http is None:
                raise DeliveryFault("no HTTP client to fetch output images with")
            with self.http.stream("GET", url, timeout=self.media.timeout_seconds, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise DeliveryFault(f"output image {index}: the media host answered HTTP {response.status_code}")
                header_type = response.headers.get("content-type", "").split(";")[0].strip() or None
                kind = content_type or header_type
                key = self.layout.image_key(job.output_prefix, index, kind, output_format)
                stored_type = content_type_for(extension(kind, output_format))
                size = stream_to_s3(
                    self.s3,
                    job.bucket,
                    key,
                    response.iter_bytes(64 * 1024),
                    content_type=stored_type,
                    max_bytes=self.media.max_image_bytes,
                )
                return CopiedImage(key=key, content_type=stored_type, bytes=size)
        except (httpx.HTTPError, ClientError, BotoCoreError, TooLarge, ValueError) as exc:
            raise DeliveryFault(f"output image {index}: {type(exc).__name__}: {exc}") from exc


def source_of(job: Job) -> dict[str, Any]:
    return {"bucket": job.bucket, "key": job.key, "version_id": job.version_id, "etag": job.etag}


def _elide_data_uris(value: Any) -> Any:
    """Keep manifests small: a ``data:`` URI is replaced by its type and size."""
    if isinstance(value, str) and value.startswith("data:") and len(value) > 200:
        return f"{value[: value.find(',') + 1]}... ({len(value)} characters, stored as an image beside this file)"
    if isinstance(value, dict):
        return {k: _elide_data_uris(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_elide_data_uris(v) for v in value]
    return value


def _advice(code: str, retryable: bool) -> str:
    if code in ("invalid_tags", "invalid_input"):
        return "Fix the tags named in 'problems' and upload the image again (see the README's tag reference)."
    if code == "unsupported_object":
        return "Upload a JPEG, PNG, WebP or GIF image within the size limit."
    if code == "input_missing":
        return "The input object was deleted before it could be processed; upload it again."
    if retryable:
        return "Nothing was sent to fal. The message is in the dead-letter queue; an operator can redrive it once the cause is fixed."
    if code == "fal_rejected":
        return "fal refused the request; see 'fal.detail'. Fix the input and upload again."
    if code == "fal_error":
        return "fal ran the request and it failed; see 'fal'. Uploading again submits a new, paid request."
    return "See 'message'."
