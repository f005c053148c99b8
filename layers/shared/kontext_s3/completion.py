"""Ending a job: outputs and manifest, or an error record; then the state, then the event.

The webhook, the recovery function, cancellation and the submit function's
failures all end jobs here, so every ending leaves the same evidence: files in
S3 that a user finds from the input key, the job's end state, and one
EventBridge event.

**Only the caller that holds a job ends it.** A finisher first claims the job
(one conditional write; see ``jobs``); a caller that loses the claim does
nothing and says so. The holder writes its files, then ends the job with a
write conditional on still holding it. The event is published by whoever wins
the job's notification claim, once. So an OK and an ERROR webhook, a webhook
retry and recovery, or a cancel racing a success never both leave their files.

Copies are bounded (see ``output_copy``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from kontext_s3.admission import Admission
from kontext_s3.image_types import OUTPUT_FORMAT_TYPES
from kontext_s3.jobs import AT_FAL, Claim, Job, JobState, JobStore, hold_ms, iso, new_holder, now_ms
from kontext_s3.log import logger
from kontext_s3.media_urls import MediaUrlRefused, check_media_url
from kontext_s3.model_schema import FieldProblem, KontextMaxOutput
from kontext_s3.notifications import JobEvents
from kontext_s3.output_copy import DeliveryFault, MediaPolicy, NotAnImage, OutputCopier
from kontext_s3.output_store import OutputLayout, write_json
from kontext_s3.redact import redact

__all__ = ["DeliveryFault", "JobFinisher", "MediaPolicy", "source_of"]

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MANIFEST_VERSION = 1
#: A finisher's hold outlives its deadline by this much, so a live holder is never taken over.
FINISHER_HOLD_MARGIN_MS = 15_000


@dataclass
class JobFinisher:
    s3: S3Client
    jobs: JobStore
    events: JobEvents
    layout: OutputLayout
    http: httpx.Client | None = None
    media: MediaPolicy = field(default_factory=lambda: MediaPolicy(allowed_urls=(), max_image_bytes=100 * 1024 * 1024))
    #: What a job held at fal is given back through (its slot, its budget), and who is told a slot is free.
    admission: Admission | None = None
    slot_freed: Callable[[], None] | None = None

    copier: OutputCopier = field(init=False)

    def __post_init__(self) -> None:
        self.copier = OutputCopier(self.s3, self.layout, self.http, self.media)

    def give_back(self, job: Job, *, never_ran: bool = False) -> None:
        """Free the job's slot (once, whoever ends it) and tell the line; refund its images if fal never ran it."""
        if self.admission is None:
            return
        if self.admission.release(job.slot) and self.slot_freed is not None:
            self.slot_freed()
        if never_ran:
            self.admission.refund(job.budget_day, job.budget_images or 0)

    def requeue(self, claim: Claim, reason: str) -> Job | None:
        """fal never started the request before its start timeout: back in line (first), slot and images given back."""
        back = self.jobs.requeue(claim.job, claim.holder, reason=reason)
        if back is None:
            logger.warning("lost the job while putting it back in line")
            return None
        logger.warning("fal could not start the request in time: the upload waits for its turn again", extra={"reason": reason})
        self.give_back(claim.job, never_ran=True)
        return back

    # -- claiming -------------------------------------------------------------------

    def claim(self, job_id: str, *, deadline: float, states: Iterable[JobState] = AT_FAL, request_id: str | None = None) -> Claim | None:
        """Hold the job until ``deadline`` (plus a margin); ``None`` when someone else holds it or it is not open (or, with
        ``request_id``, when its request is no longer that one)."""
        claim = self.jobs.claim(
            job_id, new_holder(), hold_ms=hold_ms(deadline, FINISHER_HOLD_MARGIN_MS), states=states, request_id=request_id
        )
        if claim is None:
            logger.info("another caller holds or has ended this job; leaving it to them")
        return claim

    def let_go(self, claim: Claim) -> None:
        self.jobs.unclaim(claim.job.job_id, claim.holder)

    # -- failure ------------------------------------------------------------------

    def fail(
        self,
        job: Job,
        holder: str,
        *,
        stage: str,
        code: str,
        message: str,
        problems: Iterable[FieldProblem] = (),
        fal: dict[str, Any] | None = None,
        retryable: bool = False,
        took_over: bool = False,
        never_ran: bool = False,
        recipe: dict[str, Any] | None = None,
    ) -> Job | None:
        """Write ``error.json`` beside where the outputs would be, then end the held job as FAILED.

        Returns the ended job, or ``None`` when the hold was lost (the job is then
        someone else's, and an error record that would contradict their success is removed).
        """
        message = redact(message)
        error_key = self.layout.error_key(job.output_prefix)
        record = {
            "kontext_s3_error": MANIFEST_VERSION,
            "job_id": job.job_id,
            "source": source_of(job),
            "recipe": recipe or job.recipe,
            "input": job.sent_input,
            "stage": stage,
            "code": code,
            "message": message,
            "problems": [p.model_dump(mode="json") for p in problems],
            "fal": fal,
            "retryable": retryable,
            "what_to_do": _advice(code, retryable),
            "at": iso(now_ms()),
        }
        if took_over:
            self.copier.remove_outputs(job)  # an earlier holder may have copied images before it died
        written = write_error_record(self.s3, job, error_key, record)
        ended = self.jobs.fail(
            job.job_id,
            holder,
            code=code,
            message=message,
            error_key=error_key,
            retryable=retryable,
            notify=self.events.enabled,
            error_written=written,
        )
        if ended is None:
            current = self.jobs.get(job.job_id)
            if current is not None and current.state is JobState.COMPLETED:
                self.s3.delete_object(Bucket=job.bucket, Key=error_key)
            logger.warning("lost the job while failing it; its current holder decides", extra={"code": code})
            return None
        logger.warning("job failed", extra={"code": code, "reason": message, "error_key": error_key})
        self.give_back(job, never_ran=never_ran)
        self.notify(ended, ended_here=True)
        return ended

    # -- success --------------------------------------------------------------------

    def succeed(self, claim: Claim, payload: Any, *, deadline: float) -> Job | None:
        """Copy the output images and write the manifest, then end the held job COMPLETED.

        A payload that is not a valid model output, names a URL off the allow-list,
        has no image, or holds bytes that are not the image format asked for ends the
        job FAILED with the reason. Raises :class:`DeliveryFault` (after letting go of
        the job) when a download or an S3 write fails or time runs out.
        """
        job, holder = claim.job, claim.holder
        try:
            output = KontextMaxOutput.model_validate(payload)
        except ValidationError as exc:
            return self.fail(
                job,
                holder,
                stage="output",
                code="invalid_output",
                message=f"fal's output does not match the model's output schema: {exc.error_count()} problem(s)",
                problems=[FieldProblem(field=".".join(str(x) for x in e["loc"]), message=e["msg"]) for e in exc.errors()[:20]],
                fal={"request_id": job.request_id, "payload": _elide_data_uris(payload)},
                took_over=claim.took_over,
            )
        sent = job.sent_input or {}
        asked = int(sent.get("num_images") or 1)
        images = output.images[:asked]
        if not images:
            return self.fail(
                job,
                holder,
                stage="output",
                code="no_images",
                message=f"fal reported success but returned no image ({asked} asked)",
                fal={"request_id": job.request_id, "payload": _elide_data_uris(payload)},
                took_over=claim.took_over,
            )
        targets: list[str | httpx.URL] = []
        for image in images:
            if image.url.startswith("data:"):
                targets.append(image.url)
                continue
            try:
                targets.append(check_media_url(image.url, self.media.allowed_urls))
            except MediaUrlRefused as exc:
                return self.fail(
                    job,
                    holder,
                    stage="output",
                    code="media_url_refused",
                    message=f"an output image URL was refused and not fetched: {exc}",
                    fal={"request_id": job.request_id},
                    took_over=claim.took_over,
                )
        expected = OUTPUT_FORMAT_TYPES.get(str(sent.get("output_format") or "jpeg"))
        started = time.monotonic()
        if claim.took_over:
            self.copier.remove_outputs(job)
        try:
            copied = self.copier.copy_all(job, targets, expected, deadline)
        except NotAnImage as exc:
            return self.fail(
                job,
                holder,
                stage="output",
                code="not_an_image",
                message=str(exc),
                fal={"request_id": job.request_id},
                took_over=True,  # some images may be stored already
            )
        except DeliveryFault:
            self.jobs.unclaim(job.job_id, holder)
            raise
        manifest_key = self.layout.manifest_key(job.output_prefix)
        manifest = {
            "kontext_s3_manifest": MANIFEST_VERSION,
            "job_id": job.job_id,
            "request_id": job.request_id,
            "source": source_of(job),
            "recipe": job.recipe,
            "input": job.sent_input,
            # The input's size, and the prepared copy fal was given instead when the upload needed one (what changed, why).
            "input_image": job.image,
            "output": _elide_data_uris(redact(output.model_dump(mode="json"))),
            "images_asked": asked,
            "images_returned": len(output.images),
            "images": [
                {"key": c.key, "content_type": c.content_type, "bytes": c.bytes, "width": image.width, "height": image.height}
                for c, image in zip(copied, images, strict=True)
            ],
            # No "completed at": concurrent deliveries must write identical manifests.
            # The job's history and S3's LastModified say when it was written.
            "uploaded_at": job.event_time,
            "submitted_at": iso(job.submitted_at_ms) if job.submitted_at_ms else None,
        }
        try:
            write_json(self.s3, job.bucket, manifest_key, manifest)
        except (ClientError, BotoCoreError) as exc:
            self.jobs.unclaim(job.job_id, holder)
            raise DeliveryFault(f"cannot write the manifest: {exc}") from exc
        note = f"{len(copied)} image(s) written" + (f", {asked} asked" if len(copied) != asked else "")
        ended = self.jobs.complete(
            job.job_id, holder, output_keys=[c.key for c in copied], manifest_key=manifest_key, note=note, notify=self.events.enabled
        )
        if ended is None:
            logger.warning("lost the job while completing it; its current holder decides")
            return None
        if job.error_written:
            # An earlier, retryable failure left an error record that is no longer true.
            self.s3.delete_object(Bucket=job.bucket, Key=self.layout.error_key(job.output_prefix))
        logger.info(
            "job completed",
            extra={
                "images": len(copied),
                "images_asked": asked,
                "manifest_key": manifest_key,
                "copy_seconds": round(time.monotonic() - started, 3),
            },
        )
        self.give_back(job)
        self.notify(ended, ended_here=True)
        return ended

    def notify(self, job: Job, *, ended_here: bool = False) -> None:
        """Publish the ended job's event, if it has not been: only the caller that holds the right to does (the one
        that ended the job, ``ended_here``, holds it from that write; any other must win the notification claim)."""
        if job.notified_at_ms or not self.events.enabled or not job.state.ended:
            return
        if not ended_here and not self.jobs.claim_notification(job.job_id):
            logger.info("the job's event is published (or being published) by another caller")
            return
        self.events.ended(job)
        self.jobs.mark_notified(job.job_id)

    # -- copying ----------------------------------------------------------------------


def write_error_record(s3: S3Client, job: Job, error_key: str, record: dict[str, Any]) -> bool:
    """Write the error record; ``False`` when S3 refuses it for good (access denied: an attached bucket's KMS key the
    stack was not given). The failure is then in the job's item and the log, and the message does not loop."""
    try:
        write_json(s3, job.bucket, error_key, redact(record))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "AccessDenied":
            raise
        extra = {"error_key": error_key, "bucket": job.bucket, "reason": redact(str(exc))}
        logger.error("S3 refused the error record: the failure is kept in the job's item only", extra=extra)
        return False
    return True


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
        return "Fix the tags named in 'problems' and upload the image again (see docs/tags-and-recipes.md)."
    if code == "invalid_recipe":
        return "Fix the recipe's fields named in 'problems' (kontext-s3 recipe put), then upload the image again."
    if code == "unsupported_object":
        return "Upload a JPEG, PNG, WebP, GIF, HEIC/HEIF or AVIF image within the size limits (bytes, pixels, shortest side)."
    if code == "unsupported_key":
        return "Upload the image under a key without '.' or '..' path segments."
    if code == "input_missing":
        return "The input object was deleted before it could be processed; upload it again."
    if retryable:
        return "Nothing was sent to fal. The message is in the dead-letter queue; an operator can redrive it once the cause is fixed."
    if code == "fal_rejected":
        return "fal refused the request; see 'fal.detail'. Fix the input and upload again."
    if code == "fal_error":
        return "fal ran the request and it failed; see 'fal'. Uploading again submits a new, paid request."
    if code in ("no_images", "not_an_image", "invalid_output", "media_url_refused"):
        return "fal's answer could not be stored as images; see 'message'. Uploading again submits a new, paid request."
    return "See 'message'."
