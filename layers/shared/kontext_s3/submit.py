"""From one S3 notification to (at most) one request in fal's queue.

For each uploaded (or newly tagged) object under the input prefix of the input bucket:

1. read the tags of that exact version (and its folder recipe) and validate
   them against the model; an upload with no prompt yet waits
   ``TAG_WAIT_SECONDS`` for late tags (a delayed message, not a sleep);
2. create its job, or find it: a second delivery of the same upload and edit
   stops here (a changed edit is a job of its own, ``RERUN_ON_TAG_CHANGE``);
3. check the upload still exists and is an image within the limits, from its
   header; prepare a copy when fal should not see it as stored (EXIF
   orientation, HEIC/AVIF), and make the image reachable to fal (a fresh
   presigned URL, after admission);
4. mark the job SENDING, then submit to fal's queue with the webhook URL that
   names the job;
5. record what fal's answer proves (see ``fal_queue``): accepted, certainly
   not enqueued (the only road back to a later resend), refused, or unknown
   (UNCERTAIN, never resent).

A removed input (``ObjectRemoved``) cancels its jobs fal has not started.

What the user did wrong (tags, object, key, a 4xx from fal) ends the job FAILED
with an error record, and the message is acknowledged: retrying cannot fix it.
Transient faults before sending are retried inside the invocation, then the
message goes back to SQS; on its last receive the job is marked failed,
retryably, and the message moves to the DLQ, from where a redrive resumes it.
Every message that fails leaves a log line naming its message id and key.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from kontext_s3.admission import Admission, Admitted, Wait, is_dispatch
from kontext_s3.cancellation import Cancellation
from kontext_s3.completion import JobFinisher
from kontext_s3.delivery_failures import DeliveryFailure, DeliveryFailures
from kontext_s3.edit_request import InvalidEditRequest, build_model_input
from kontext_s3.fal_queue import Accepted, FalKeyMissing, FalQueueClient, NotEnqueued, Refused, SubmitOutcome, Unknown, summarize_detail
from kontext_s3.input_image import InputImages, RefusedInput, missing, version_args
from kontext_s3.job_id import derive_job_id, edit_mark
from kontext_s3.jobs import Job, JobConflict, JobState, JobStore, new_holder, now_ms
from kontext_s3.log import logger
from kontext_s3.model_schema import MATCH_INPUT, FieldProblem
from kontext_s3.output_store import OutputLayout, has_dot_segments
from kontext_s3.recipes import InvalidRecipe, Recipe, RecipeBook, is_recipe
from kontext_s3.redact import redact
from kontext_s3.s3_events import MalformedNotification, ObjectChange, notification, parse_notification, stack_marks
from kontext_s3.settings import Settings
from kontext_s3.tag_codec import TagEncodingError, decode_tags

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class Outcome(StrEnum):
    SUBMITTED = "submitted"
    WAITING = "waiting"
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
    #: POSTs this change made to fal (retries included).
    fal_attempts: int = 0
    #: Admission said wait (no slot, or no budget today): the line stops here until a slot is freed.
    line_full: bool = False


class RetryLater(RuntimeError):
    """A transient fault: the SQS message must come back (and, in the end, go to the DLQ)."""


class _UserError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        problems: list[FieldProblem] | None = None,
        recipe: dict[str, Any] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.problems = problems or []
        self.recipe = recipe
        #: The edit asked for, when it could be read: with re-runs on tag changes, part of the job's id.
        self.fields = fields


class _AwaitingTags(Exception):
    """An upload without an edit yet, inside ``TAG_WAIT_SECONDS``: its tags may come after it."""


class _NoEdit(Exception):
    """New tags on an object that still describe no edit: nothing to start, nothing to report yet."""


@dataclass(frozen=True)
class _Intent:
    """What a message the stack sent itself adds to an S3 event (see ``s3_events.notification``)."""

    #: The tags' wait is over (a tag deadline, or a backfill of objects that were never going to be tagged late).
    tags_due: bool = False
    #: Edit fields a backfill was given, below the object's own tags.
    fields: dict[str, str] = field(default_factory=dict)
    #: When a backfill ran: the recipe that stood then applies (it may have been written for the backfill).
    recipe_at: datetime | None = None
    #: A backfill's message (its marks, to send it again unchanged when it must wait).
    backfill: dict[str, Any] | None = None

    @classmethod
    def of(cls, marks: dict[str, Any]) -> _Intent:
        given = marks.get("fields")
        fields = {str(k): str(v) for k, v in given.items()} if isinstance(given, dict) else {}
        recipe_at = _arrival_at(str(marks["recipe_at"])) if marks.get("recipe_at") else None
        backfill = dict(marks) if marks.get("backfill") else None
        return cls(tags_due=bool(marks.get("tags_due") or backfill), fields=fields, recipe_at=recipe_at, backfill=backfill)


@dataclass(frozen=True)
class _Prepared:
    """A validated edit of an existing image, ready to send."""

    body: dict[str, Any]  # the model input, with the object's s3:// address as image_url
    content_type: str
    images: int  # what fal bills
    #: The folder recipe the edit came from, as the job records it (JSON), or None.
    recipe_json: str | None = None
    #: The input image as found (size, orientation) and what preparing it changed (JSON), or None.
    image_json: str | None = None
    #: The edit as asked (recipe, backfill fields, tags; no deployment defaults): what tells one edit from another.
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def prepared_key(self) -> str | None:
        """The prepared copy fal is given instead of the upload, when the upload needed one."""
        return (json.loads(self.image_json).get("prepared") or {}).get("key") if self.image_json else None


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
        admission: Admission | None = None,
        slot_freed: Callable[[], None] | None = None,
        send_later: Callable[[str, int], None] | None = None,
        failures: DeliveryFailures | None = None,
    ) -> None:
        if not settings.webhook_url:
            raise ValueError("WEBHOOK_URL is not set: fal would have nowhere to report results")
        if not settings.input_bucket:
            raise ValueError("INPUT_BUCKET is not set: events from any bucket would be taken as uploads")
        self._settings = settings
        self._s3 = s3
        self._jobs = jobs
        self._fal = fal
        self._finisher = finisher
        self._cancellation = cancellation
        self._admission = admission if admission is not None and admission.limited else None
        self._recipes = RecipeBook(s3, settings.input_bucket, settings.input_prefix)
        self._dispatch_lock = threading.Lock()
        self._dispatching = False
        self._dispatch_again = False
        self._slot_freed = slot_freed
        #: Puts a message on the uploads queue after a delay: an upload waiting for its tags is looked at again.
        self._send_later = send_later
        self._layout = OutputLayout(settings.input_prefix, settings.output_prefix)
        self._images = InputImages(s3, settings)
        self._failures = failures

    def handle_message(self, body: str, *, message_id: str, receive_count: int, deadline: float) -> list[ChangeResult]:
        """Handle one SQS message body. Raises :class:`RetryLater` (or any error) to have it retried."""
        if is_dispatch(body):
            try:
                return self._dispatch_coalesced(deadline=deadline)
            except Exception as exc:
                logger.exception(
                    "dispatching the line failed; the signal will be retried", extra={"message_id": message_id, "reason": redact(str(exc))}
                )
                raise
        try:
            changes = parse_notification(body)
        except MalformedNotification as exc:
            logger.error(
                "message is not an S3 notification; it will be retried into the DLQ", extra={"message_id": message_id, "reason": str(exc)}
            )
            raise
        if not changes:
            logger.info("s3:TestEvent acknowledged", extra={"message_id": message_id})
        intent = _Intent.of(stack_marks(body))
        results = []
        for change in changes:
            try:
                results.append(self.handle_change(change, receive_count=receive_count, deadline=deadline, intent=intent))
            except RetryLater:
                raise  # logged where it was decided
            except Exception as exc:
                logger.exception(
                    "message failed; it will be retried",
                    extra={"message_id": message_id, "object_key": change.key, "receive_count": receive_count, "reason": redact(str(exc))},
                )
                raise
        return results

    def _failed_delivery(self, change: ObjectChange, exc: Exception, receive_count: int) -> None:
        """Tell whoever follows the upload, within seconds, why this delivery failed (see ``delivery_failures``)."""
        if self._failures is None:
            return
        try:
            upload_id = derive_job_id(change.bucket, change.key, change.version_id, change.etag, change.sequencer or change.event_time)
        except ValueError:
            return  # an event that names no upload: its log line is all there is
        cause = exc.__cause__ if isinstance(exc, RetryLater) and exc.__cause__ is not None else exc
        failure = DeliveryFailure.of(change.key, cause, delivery=receive_count, max_deliveries=self._settings.max_receive_count)
        self._failures.record(upload_id, failure)

    def handle_change(self, change: ObjectChange, *, receive_count: int, deadline: float, intent: _Intent | None = None) -> ChangeResult:
        logger.thread_safe_append_keys(object_key=change.key, bucket=change.bucket)
        try:
            if change.bucket != self._settings.input_bucket:
                logger.warning("ignored: the record is about another bucket", extra={"input_bucket": self._settings.input_bucket})
                return ChangeResult(Outcome.IGNORED, change.key, detail="another bucket")
            if not change.key.startswith(self._settings.input_prefix) or change.key.endswith("/"):
                logger.info("ignored: not an object under the input prefix", extra={"input_prefix": self._settings.input_prefix})
                return ChangeResult(Outcome.IGNORED, change.key, detail="outside the input prefix")
            if is_recipe(change.key):
                logger.info("ignored: a folder recipe, not an upload")
                return ChangeResult(Outcome.IGNORED, change.key, detail="a folder recipe")
            if change.removed and self._cancellation is not None:
                cancelled = self._cancellation.input_removed(change, deadline=deadline)
                return ChangeResult(Outcome.CANCELLED if cancelled else Outcome.IGNORED, change.key, detail=",".join(cancelled))
            if not (change.created or change.tagged):
                return ChangeResult(Outcome.IGNORED, change.key, detail=f"{change.event_name} is not an upload")
            if change.tagged and not self._settings.rerun_on_tag_change and not self._settings.tag_wait_seconds:
                return ChangeResult(Outcome.IGNORED, change.key, detail="tags are read at upload only")
            if not change.version_id:
                change = replace(change, version_id=self._resolve_version(change))
            return self._handle_upload(change, intent or _Intent(), receive_count=receive_count, deadline=deadline)
        except Exception as exc:
            self._failed_delivery(change, exc, receive_count)
            raise
        finally:
            logger.thread_safe_remove_keys(["object_key", "bucket", "job_id"])

    # -- one upload ---------------------------------------------------------------

    def _handle_upload(self, change: ObjectChange, intent: _Intent, *, receive_count: int, deadline: float) -> ChangeResult:
        # The edit is read before the job exists: with re-runs on tag changes, it is part of the job's id.
        # The image is looked at only once the job is ours, so a duplicate delivery stops at the job.
        waits = self._backfill_waits(change, intent)
        if waits:
            return waits
        try:
            edit = self._edit(change, intent)
        except _AwaitingTags:
            self._tags_due_later(change)
            logger.info("no edit yet: waiting for the upload's tags", extra={"tag_wait_seconds": self._settings.tag_wait_seconds})
            return ChangeResult(Outcome.WAITING, change.key, None, "tags")
        except _NoEdit:
            logger.info("ignored: new tags that describe no edit (an earlier tag deadline reports a missing prompt)")
            return ChangeResult(Outcome.IGNORED, change.key, detail="tags describe no edit")
        except _UserError as exc:
            return self._refuse(change, exc, deadline)
        except Exception as exc:
            return self._transient(change, exc, receive_count, deadline)
        held = self._hold(change, edit.fields, deadline)
        if isinstance(held, ChangeResult):
            return held
        job, holder = held
        try:
            prepared = self._with_image(job, change, edit, deadline)
        except _UserError as exc:
            return self._fail_validation(job, holder, exc)
        except Exception as exc:
            return self._retry_later(
                job, holder, receive_count, f"{type(exc).__name__}: {exc}", code="retries_exhausted", sent=False, cause=exc
            )
        return self._take_turn(job, holder, prepared, receive_count=receive_count, deadline=deadline, in_line=False)

    def _backfill_waits(self, change: ObjectChange, intent: _Intent) -> ChangeResult | None:
        """A backfill never takes an upload that may still get its own tags: it comes back once their wait is over.

        Taken earlier, the uploader's own tags would arrive as another edit and run a second, paid job.
        """
        if intent.backfill is None or not self._settings.tag_wait_seconds:
            return None
        uploaded = _arrival_at(change.event_time)
        if uploaded is None:
            return None
        left = self._settings.tag_wait_seconds - (datetime.now(UTC) - uploaded).total_seconds()
        if left <= 0:
            return None
        if self._send_later is None:
            raise RuntimeError("UPLOADS_QUEUE_URL is not set: a backfill inside the tag wait could not be looked at again")
        # A margin past the upload's own tag deadline, so the upload's own tags (or their absence) are heard first.
        self._send_later(notification([change], **intent.backfill), int(left) + 5)
        logger.info("backfill waits until the upload's own tags are due", extra={"seconds_left": int(left)})
        return ChangeResult(Outcome.WAITING, change.key, None, "backfill waits for the upload's tags")

    def _refuse(self, change: ObjectChange, exc: _UserError, deadline: float) -> ChangeResult:
        """The user's mistake, recorded once per edit asked for (a fixed edit is a new job)."""
        held = self._hold(change, exc.fields, deadline)
        if isinstance(held, ChangeResult):
            return held
        return self._fail_validation(*held, exc)

    def _fail_validation(self, job: Job, holder: str, exc: _UserError) -> ChangeResult:
        self._finisher.fail(job, holder, stage="validation", code=exc.code, message=str(exc), problems=exc.problems, recipe=exc.recipe)
        return ChangeResult(Outcome.FAILED, job.key, job.job_id, f"{exc.code}: {exc}")

    def _transient(self, change: ObjectChange, exc: Exception, receive_count: int, deadline: float) -> ChangeResult:
        """The edit could not be read: retried by SQS; the last delivery leaves a recorded, retryable failure."""
        reason = f"{type(exc).__name__}: {exc}"
        # A tag event whose edit could not be read names no job of its own: its message goes to the DLQ.
        if receive_count < self._settings.max_receive_count or change.tagged:
            logger.warning("transient fault: the message will be retried", extra={"reason": redact(reason), "receive_count": receive_count})
            raise RetryLater(redact(reason)) from exc
        held = self._hold(change, None, deadline)
        if isinstance(held, ChangeResult):
            return held
        return self._retry_later(*held, receive_count, reason, code="retries_exhausted", sent=False, cause=exc)

    def _hold(self, change: ObjectChange, edit: dict[str, Any] | None, deadline: float) -> tuple[Job, str] | ChangeResult:
        """Create the job for this upload and edit, held by us, or take it up again; a :class:`ChangeResult` when it
        is another's or done.

        The upload's first job has the upload's id. With ``RERUN_ON_TAG_CHANGE``, an edit other than the one that
        job recorded is a job of its own, whose id names the edit, so the same edit never runs twice.
        """
        upload = (change.bucket, change.key, change.version_id, change.etag, change.sequencer or change.event_time)
        upload_id = derive_job_id(*upload)
        mark = edit_mark(edit) if self._settings.rerun_on_tag_change and edit is not None else None
        holder = new_holder()
        # The hold outlives this invocation by a margin: if we die, it lapses before SQS redelivers.
        hold_ms = int(max(0.0, deadline - time.monotonic()) * 1000) + 10_000
        job_id = upload_id
        job = self._create(change, job_id, holder, hold_ms, mark)
        if job is None and mark is not None:
            first = self._jobs.get(upload_id)
            if first is not None and first.edit_mark not in (None, mark):
                if not change.tagged and not self._nothing_sent(upload_id):
                    # A repeat of the upload's own event (a redelivery, a backfill, a tag deadline) asking for another
                    # edit than the one that ran (a recipe or a default changed since): only new tags start a re-run.
                    logger.info("duplicate delivery: the upload's job ran another edit", extra={"first_job_id": upload_id})
                    return ChangeResult(Outcome.DUPLICATE, change.key, upload_id, "the upload's job exists")
                job_id = derive_job_id(*upload, edit=edit)
                logger.info("the upload's edit changed: a job of its own", extra={"first_job_id": upload_id})
                job = self._create(change, job_id, holder, hold_ms, mark, upload_id=upload_id)
        logger.thread_safe_append_keys(job_id=job_id)
        if job is None:
            taken = self._take_over(job_id, change.key, holder, hold_ms)
            if isinstance(taken, ChangeResult):
                return taken
            job = taken
        return job, holder

    def _nothing_sent(self, upload_id: str) -> bool:
        """Whether every job of the upload ended before reaching fal (refused tags, say): another edit costs no second
        payment then, so a backfill may give the upload the edit it never got."""
        jobs = self._jobs.jobs_of_upload(upload_id)
        return bool(jobs) and all(
            job.state is JobState.FAILED and not job.failure_retryable and not job.request_id and not job.sent_at_ms for job in jobs
        )

    def _create(
        self, change: ObjectChange, job_id: str, holder: str, hold_ms: int, mark: str | None, upload_id: str | None = None
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
            hold_ms=hold_ms,
            upload_id=upload_id,
            edit_mark=mark,
        )

    def _tags_due_later(self, change: ObjectChange) -> None:
        """Look at the upload again once its tags are due: the same event, marked so it does not wait twice."""
        if self._send_later is None:
            raise RuntimeError("UPLOADS_QUEUE_URL is not set: an upload waiting for its tags could not be looked at again")
        self._send_later(notification([change], tags_due=True), self._settings.tag_wait_seconds)

    # -- admission and the line -------------------------------------------------------------

    def _take_turn(self, job: Job, holder: str, prepared: _Prepared, *, receive_count: int, deadline: float, in_line: bool) -> ChangeResult:
        """Send the job if admission grants it a slot and the day's images; else it waits in line (nothing is failed)."""
        never = self._admission.never_admits(prepared.images) if self._admission else None
        if never:  # it would wait for ever: a request larger than a whole day's budget
            self._finisher.fail(job, holder, stage="admission", code="over_daily_budget", message=never)
            return ChangeResult(Outcome.FAILED, job.key, job.job_id, never)
        try:
            decision = self._admission.admit(job.job_id, prepared.images) if self._admission else Admitted(None, None, prepared.images)
        except Exception as exc:
            if in_line:  # it has no message to retry it: back in line, then the fault is reported
                self._put_back(job, holder, prepared, Wait("slot"))
                raise
            return self._retry_later(
                job, holder, receive_count, f"{type(exc).__name__}: {exc}", code="retries_exhausted", sent=False, cause=exc
            )
        if isinstance(decision, Wait):
            self._put_back(job, holder, prepared, decision)
            logger.info(decision.sentence(), extra={"wait_reason": decision.reason})
            return ChangeResult(Outcome.WAITING, job.key, job.job_id, decision.reason, line_full=True)
        return self._send(job, holder, prepared, decision, receive_count=receive_count, deadline=deadline, in_line=in_line)

    def _dispatch_coalesced(self, *, deadline: float) -> list[ChangeResult]:
        """One dispatcher per execution environment: a signal that arrives while one runs asks it for one more pass.

        Several slots freed together send several signals, often in one batch; each pass reads every
        shard of the line, so running them side by side would only race for the same waiting uploads.
        """
        with self._dispatch_lock:
            if self._dispatching:
                self._dispatch_again = True
                return []
            self._dispatching = True
        results: list[ChangeResult] = []
        try:
            while True:
                with self._dispatch_lock:
                    self._dispatch_again = False
                results.extend(self.dispatch(deadline=deadline))
                with self._dispatch_lock:
                    if not self._dispatch_again or deadline - time.monotonic() < 5:
                        # Out of time with a pass still asked for: recovery's next run dispatches too.
                        self._dispatching = False
                        return results
        except BaseException:
            with self._dispatch_lock:
                self._dispatching = False
            raise

    def dispatch(self, *, deadline: float) -> list[ChangeResult]:
        """Give free slots to the uploads waiting longest, until none is free (the signal that one was freed starts this)."""
        results: list[ChangeResult] = []
        hold_ms = int(max(0.0, deadline - time.monotonic()) * 1000) + 10_000
        for job_id in self._jobs.open_job_ids(JobState.WAITING.value, checked_before_ms=now_ms() + 1, limit=50):
            if deadline - time.monotonic() < 5:  # too little time to hear fal's answer: the next signal continues
                break
            holder = new_holder()
            job = self._jobs.take_waiting(job_id, holder=holder, hold_ms=hold_ms)
            if job is None:
                continue  # another dispatcher took it
            logger.thread_safe_append_keys(job_id=job.job_id, object_key=job.key)
            try:
                if not self._images.still_there(job.bucket, job.key, job.version_id):
                    # Deleted while it waited: cancelled here, never sent (Cancellation may have found it taken).
                    message = "the input object was deleted while the upload waited for its turn; nothing was sent"
                    self._finisher.fail(job, holder, stage="submit", code="cancelled", message=message, never_ran=True)
                    results.append(ChangeResult(Outcome.CANCELLED, job.key, job.job_id, "input deleted while waiting"))
                    continue
                body = json.loads(job.input_json or "{}")
                prepared = _Prepared(
                    body=body,
                    content_type=job.content_type or "image/jpeg",
                    image_json=job.image_json,
                    images=int(body.get("num_images") or 1),
                    recipe_json=job.recipe_json,
                )
                result = self._take_turn(job, holder, prepared, receive_count=0, deadline=deadline, in_line=True)
            finally:
                logger.thread_safe_remove_keys(["job_id", "object_key"])
            results.append(result)
            if result.line_full:
                break  # no slot (or no budget) left: the next freed slot signals again
        return results

    def _take_over(self, job_id: str, key: str, holder: str, hold_ms: int) -> Job | ChangeResult:
        """The job exists: take it up again if nothing was sent for it, else report the duplicate."""
        existing = self._jobs.get(job_id)
        if existing is None:  # expired by TTL between the two calls: an old event, treated as a duplicate
            return ChangeResult(Outcome.DUPLICATE, key, job_id, "job expired")
        resumable = (existing.state is JobState.SUBMITTING and (existing.holder is None or existing.hold_lapsed())) or (
            existing.state is JobState.FAILED and existing.failure_retryable
        )
        if resumable:
            taken = self._jobs.take_over(job_id, holder=holder, hold_ms=hold_ms)
            if taken is not None:
                logger.info("resuming job", extra={"attempt": taken.attempts})
                return taken
            existing = self._jobs.get(job_id) or existing
        elif existing.state is JobState.SENDING and existing.hold_lapsed():
            self._jobs.mark_uncertain(job_id, reason="the worker sending it stopped mid-way; not resent, to never pay twice")
            logger.error("previous worker died while sending: job is UNCERTAIN")
            return ChangeResult(Outcome.UNCERTAIN, existing.key, job_id, "previous worker died mid-send")
        logger.info("duplicate delivery: job already exists", extra={"state": existing.state.value})
        return ChangeResult(Outcome.DUPLICATE, existing.key, job_id, existing.state.value)

    def _edit(self, change: ObjectChange, intent: _Intent) -> _Prepared:
        """The edit asked for (the image not yet looked at); raises :class:`_UserError` for the user's mistakes."""
        if has_dot_segments(change.key):
            raise _UserError("unsupported_key", "the key has '.' or '..' path segments, which URLs cannot carry; rename the upload")
        tags = self._read_tags(change)
        try:
            recipe = self._recipe_for(change, intent)
        except _UserError as exc:
            exc.fields = {**intent.fields, **tags}  # the edit asked for, so a fixed recipe is a new edit
            raise
        described = recipe.describe() if recipe else None
        # Recipe, then what a backfill was given, then the upload's own tags, field by field; an empty tag
        # does not erase what comes before it.
        given = {name: value for name, value in {**intent.fields, **tags}.items() if str(value).strip()}
        fields = {**(recipe.fields if recipe else {}), **given}
        if not str(fields.get("prompt", "")).strip():
            if change.tagged:
                raise _NoEdit
            if change.created and not intent.tags_due and self._settings.tag_wait_seconds:
                raise _AwaitingTags
        # "match" is ours, not the model's: the allowed ratio nearest the input's, once its size is known.
        match = str(fields.get("aspect_ratio", "")).strip().lower() == MATCH_INPUT
        try:
            # Validated before touching the image: a bad tag is the commonest mistake and costs nothing to report.
            checked = {name: value for name, value in fields.items() if not (match and name == "aspect_ratio")}
            model_input = build_model_input(checked, self._settings.model_defaults, _s3_uri(change))
        except InvalidEditRequest as exc:
            where = f"the tags and the recipe {recipe.key}" if recipe else "the tags"
            raise _UserError("invalid_tags", f"{where} do not describe a valid edit: {exc}", exc.problems, described, fields) from exc
        body = model_input.to_request_body()
        if match:
            body["aspect_ratio"] = MATCH_INPUT
        # With the s3:// address: the presigned URL is a credential, never stored.
        return _Prepared(
            body=body,
            content_type="",
            images=model_input.num_images,
            recipe_json=json.dumps(described, sort_keys=True) if described else None,
            fields=fields,
        )

    def _recipe_for(self, change: ObjectChange, intent: _Intent) -> Recipe | None:
        # The recipe as it stood when the upload arrived; for a backfill, as it stands now (written for it).
        try:
            return self._recipes.for_upload(change.key, intent.recipe_at or self._arrival(change))
        except InvalidRecipe as exc:
            recipe = {"key": exc.key, "version_id": exc.version_id}
            raise _UserError("invalid_recipe", f"{exc}; fix the recipe and upload again", exc.problems, recipe) from exc

    def _arrival(self, change: ObjectChange) -> datetime:
        """When the upload arrived: its event's time, or for a tag event, when the tagged version was written.

        A tag event comes when the tags change, maybe long after the upload; its edit is still the one that stood
        when the upload arrived (a recipe changed since, or a bulk re-tag of a folder, asks nothing new).
        """
        if not change.tagged:
            return _event_arrival(change)
        head = self._s3.head_object(**version_args(change))  # type: ignore[arg-type]
        return head["LastModified"]

    def _send(
        self, job: Job, holder: str, prepared: _Prepared, admitted: Admitted, *, receive_count: int, deadline: float, in_line: bool
    ) -> ChangeResult:
        try:
            key = self._fal.key()
            # Made now, after admission: the URL's life starts when its turn comes, not when it was uploaded.
            image_url, start_within = self._reachable_image(job, prepared)
        except Exception as exc:  # nothing has been sent yet
            self._give_back(job.job_id, admitted)
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ClientError) and missing(exc):  # its input is gone (a data URI reads it): nothing to wait for
                message = "the input object was deleted before it could be sent; nothing was sent"
                self._finisher.fail(job, holder, stage="submit", code="input_missing", message=message)
                return ChangeResult(Outcome.FAILED, job.key, job.job_id, message)
            if in_line:  # back in its place; the line goes on past it (only a full house stops the line)
                self._put_back(job, holder, prepared, Wait("slot"))
                logger.warning("could not send a waiting upload; it is back in line", extra={"reason": redact(reason)})
                return ChangeResult(Outcome.WAITING, job.key, job.job_id, reason)
            code = "fal_key_missing" if isinstance(exc, FalKeyMissing) else "retries_exhausted"
            if isinstance(exc, FalKeyMissing):
                reason = str(exc)  # the whole sentence is the news: it names the secret and the command that stores it
            return self._retry_later(job, holder, receive_count, reason, code=code, sent=False, cause=exc)
        try:
            sending = self._jobs.begin_send(
                job.job_id,
                holder,
                input_json=json.dumps(prepared.body, sort_keys=True),
                slot=admitted.slot,
                budget_day=admitted.budget_day,
                images=admitted.images,
                recipe_json=prepared.recipe_json,
                image_json=prepared.image_json,
            )
        except JobConflict:
            # Our hold lapsed: recovery may have handed our slot on, so nothing is sent. The job is taken up
            # again by whoever took it, or by the line / the message's next delivery, never dropped.
            self._give_back(job.job_id, admitted)
            logger.warning("lost the hold before sending (it lapsed, or another worker took the job); nothing sent")
            if in_line:  # not WAITING: that would stop the dispatcher, and the slot was just given back
                self._jobs.return_to_line(job.job_id)
                return ChangeResult(Outcome.DUPLICATE, job.key, job.job_id, "hold lapsed")
            return self._retry_later(job, holder, receive_count, "the hold lapsed before sending", code="retries_exhausted", sent=False)
        # From here the request may be at fal: every path below ends in a recorded state, never a resend.
        headers = {"X-Fal-Request-Timeout": str(start_within)} if start_within else {}
        if self._settings.fal_media_retention_seconds:
            headers["X-Fal-Object-Lifecycle-Preference"] = json.dumps(
                {"expiration_duration_seconds": self._settings.fal_media_retention_seconds}
            )
        outcome: SubmitOutcome | None = None
        try:
            outcome = self._fal.submit(
                self._settings.fal_endpoint,
                {**prepared.body, "image_url": image_url},
                webhook_url=f"{self._settings.webhook_url}/fal/{job.job_id}",
                deadline=deadline,
                key=key,
                headers=headers,
            )
            return self._settle(sending, holder, admitted, outcome, receive_count=receive_count, in_line=in_line)
        except RetryLater:
            raise
        except Exception as exc:
            reason = f"our own failure after sending ({type(exc).__name__}: {redact(str(exc))}); not resent, to never pay twice"
            request_id = outcome.request.request_id if isinstance(outcome, Accepted) else getattr(outcome, "request_id", None)
            self._record_uncertain(job, holder, reason, request_id)
            return ChangeResult(Outcome.UNCERTAIN, job.key, job.job_id, reason, fal_attempts=getattr(outcome, "attempts", 1))

    def _put_back(self, job: Job, holder: str, prepared: _Prepared, wait: Wait) -> None:
        """The job waits (again) in line, in its arrival order, with what its turn needs."""
        self._jobs.wait(
            job.job_id,
            holder,
            reason=wait.reason,
            until_ms=wait.until_ms,
            input_json=json.dumps(prepared.body, sort_keys=True),
            content_type=prepared.content_type,
            recipe_json=prepared.recipe_json,
            image_json=prepared.image_json,
        )

    def _give_back(self, job_id: str, admitted: Admitted) -> None:
        """What admission granted for a request fal does not hold: the slot and the images.

        The line is not told: this happens when fal (or our own sending) failed, and telling it would
        send the next upload into the same failure at once, and again. Recovery kicks the line on its
        schedule, and every job that ends frees its slot with a signal.
        """
        if self._admission is None:
            return
        self._admission.release(job_id, admitted.slot)
        self._admission.refund(admitted.budget_day, admitted.images)

    def _settle(
        self, job: Job, holder: str, admitted: Admitted, outcome: SubmitOutcome, *, receive_count: int, in_line: bool
    ) -> ChangeResult:
        """Record what fal's answer proves."""
        attempts = outcome.attempts
        match outcome:
            case Accepted(request=queued):
                recorded = self._jobs_write(
                    lambda: self._jobs.mark_submitted(
                        job.job_id,
                        holder,
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
                        self._record_uncertain(job, holder, "fal accepted it but recording that failed; not resent", queued.request_id)
                        return ChangeResult(Outcome.UNCERTAIN, job.key, job.job_id, queued.request_id, attempts)
                logger.info("submitted to fal", extra={"request_id": queued.request_id, "queue_position": queued.queue_position})
                return ChangeResult(Outcome.SUBMITTED, job.key, job.job_id, queued.request_id, attempts)
            case NotEnqueued(reason=reason):
                # Nothing is at fal: what admission granted goes back, and the upload is sent again later.
                self._give_back(job.job_id, admitted)
                if outcome.is_auth:  # our key, not the user's input: keep the upload and let the operator fix the secret
                    reason = f"fal refused our key ({reason}); check the fal key secret"
                if in_line:
                    self._jobs.not_enqueued(job.job_id, holder, reason=reason, wait=True)
                    logger.warning("fal did not take the request; the upload is back in line", extra={"reason": reason})
                    return ChangeResult(Outcome.WAITING, job.key, job.job_id, reason, attempts)
                return self._retry_later(job, holder, receive_count, reason, code="fal_unavailable", sent=True, attempts=attempts)
            case Refused(reason=reason, status_code=status, detail=detail):
                self._finisher.fail(
                    job,
                    holder,
                    stage="submit",
                    code="fal_rejected",
                    message=reason,
                    problems=_fal_problems(detail),
                    fal={"status_code": status, "detail": detail},
                    never_ran=True,
                )
                return ChangeResult(Outcome.FAILED, job.key, job.job_id, reason, attempts)
            case Unknown(reason=reason, request_id=request_id):
                self._record_uncertain(job, holder, f"{reason}; not resent, to never pay twice", request_id)
                return ChangeResult(Outcome.UNCERTAIN, job.key, job.job_id, reason, attempts)
        raise AssertionError(f"unhandled outcome {outcome!r}")

    def _record_uncertain(self, job: Job, holder: str, reason: str, request_id: str | None) -> None:
        """Leave the job UNCERTAIN with whatever id we have; if even that cannot be written, its hold lapses into UNCERTAIN."""
        urls = None
        if request_id:
            built = self._fal.request_urls(self._settings.fal_endpoint, request_id)
            urls = (built.status_url, built.response_url, built.cancel_url)
        written = self._jobs_write(
            lambda: self._jobs.mark_uncertain(job.job_id, holder=holder, reason=reason, request_id=request_id, urls=urls)
        )
        logger.error(
            "fal may hold the request; job left UNCERTAIN for its webhook or recovery, never resent",
            extra={"reason": redact(reason), "request_id": request_id, "recorded": written is not None},
        )

    @staticmethod
    def _jobs_write(write: Any) -> Job | None:
        """A jobs-table write after sending (the SDK retries it); ``None`` when it still fails, which is logged."""
        try:
            result: Job | None = write()
        except ClientError as exc:
            logger.warning("jobs table write failed after sending", extra={"reason": str(exc)})
            return None
        return result

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
                if missing(exc):
                    return None
                raise
        listing = self._s3.list_object_versions(Bucket=change.bucket, Prefix=change.key)
        for candidate in listing.get("Versions", []):  # newest first
            if candidate.get("Key") == change.key and candidate.get("ETag", "").strip('"') == change.etag:
                return candidate.get("VersionId")
        return None

    def _read_tags(self, change: ObjectChange) -> dict[str, str]:
        try:
            tag_set = self._s3.get_object_tagging(**version_args(change))["TagSet"]  # type: ignore[arg-type]
        except ClientError as exc:
            if missing(exc):
                raise _UserError("input_missing", "the uploaded object no longer exists") from exc
            raise
        tags = {t["Key"]: t["Value"] for t in tag_set}
        try:
            fields = decode_tags(tags)
        except TagEncodingError as exc:
            problems = [FieldProblem(field=exc.field or "prompt", message=str(exc))]
            raise _UserError("invalid_tags", str(exc), problems, fields=dict(tags)) from exc
        ignored = sorted(set(tags) - set(fields) - {k for k in tags if k.startswith("kx")})
        if ignored:
            logger.debug("tags that are not model fields were ignored", extra={"ignored_tags": ignored})
        return fields

    def _with_image(self, job: Job, change: ObjectChange, edit: _Prepared, deadline: float) -> _Prepared:
        """The edit with what its image needs (see :class:`InputImages`)."""
        try:
            seen = self._images.examine(change, job.output_prefix, edit.body, deadline=deadline)
        except RefusedInput as exc:
            raise _UserError(exc.code, str(exc)) from exc
        return replace(edit, body=seen.body, content_type=seen.content_type, image_json=seen.image_json)

    def _reachable_image(self, job: Job, prepared: _Prepared) -> tuple[str, int | None]:
        """A URL fal can fetch the uploaded version from, and how soon fal must start the request to find it valid.

        fal's runner fetches the input when the request starts, after any wait in fal's queue; a
        presigned URL expires. So the submit asks fal (``X-Fal-Request-Timeout``) to start it well
        within the URL's life, or not at all: a request that could not start is sent again later,
        with a fresh URL. A data URI does not expire.
        """
        content_type, copy = prepared.content_type, prepared.prepared_key
        kwargs = {"Bucket": job.bucket, "Key": copy} if copy else {"Bucket": job.bucket, "Key": job.key}
        if job.version_id and not copy:
            kwargs["VersionId"] = job.version_id
        if self._settings.image_transport == "data-uri":
            data = self._s3.get_object(**kwargs)["Body"].read()  # type: ignore[arg-type]
            return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}", None
        expiry = self._settings.presign_expiry_seconds
        url = self._s3.generate_presigned_url("get_object", Params=kwargs, ExpiresIn=expiry)
        return url, max(2, expiry - min(60, expiry // 2))

    def _retry_later(
        self,
        job: Job,
        holder: str,
        receive_count: int,
        reason: str,
        *,
        code: str,
        sent: bool,
        attempts: int = 0,
        cause: Exception | None = None,
    ) -> ChangeResult:
        """Nothing is at fal: give the job back for the next delivery, or fail it retryably on the last one."""
        reason = redact(reason)
        if receive_count >= self._settings.max_receive_count:
            self._finisher.fail(
                job,
                holder,
                stage="submit",
                code=code,
                message=f"gave up after {receive_count} deliveries of the S3 event: {reason}",
                retryable=True,
            )
            logger.error("last delivery failed: job marked failed, message goes to the DLQ", extra={"reason": reason})
        else:
            if sent:
                self._jobs.not_enqueued(job.job_id, holder, reason=reason)
            else:
                self._jobs.release(job.job_id, holder, reason=reason)
            logger.warning(
                "transient fault: the message will be retried",
                extra={"reason": reason, "receive_count": receive_count, "fal_attempts": attempts},
            )
        raise RetryLater(reason) from cause


def _event_arrival(change: ObjectChange) -> datetime:
    """When S3 says the upload happened (the event's time); now, if the event's time cannot be read."""
    return _arrival_at(change.event_time) or datetime.now(UTC)


def _arrival_at(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
