"""From one S3 notification to (at most) one request in fal's queue: the submit path, top to bottom.

For each uploaded (or newly tagged) object under the input prefix of the input bucket (:meth:`Submitter.upload`):

1. **read the edit** (``edit_reading``): the version's tags and its folder's recipe as they stood when it arrived,
   checked against the model; an upload with no prompt yet waits ``TAG_WAIT_SECONDS`` for late tags (a delayed
   message, not a sleep);
2. **hold its job** (``holding``): create it, or find it: a second delivery of the same upload and edit stops here;
3. **examine the image** (``input_image``): still there, an image within the limits, prepared when fal should not
   see it as stored;
4. **take a turn** (``line``): sent when admission grants a slot and the day's images, else it waits in line;
5. **send** (``sending``): SENDING first, then fal's queue, and what fal's answer proves is recorded.

What the user did wrong ends the job FAILED with an error record, and the message is acknowledged: retrying cannot
fix it. A fault before sending is the attempt's to handle (``delivery``): the message's next delivery, or, on its
last, a recorded retryable failure and the DLQ. Every failed delivery is recorded for whoever follows the upload
(``delivery_failures``). A removed input cancels what it would still cost (``cancellation``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from kontext_s3.admission import Admission, is_dispatch
from kontext_s3.cancellation import Cancellation
from kontext_s3.completion import JobFinisher
from kontext_s3.delivery import MessageAttempt
from kontext_s3.delivery_failures import DeliveryFailure, DeliveryFailures
from kontext_s3.edit_reading import AwaitTags, Edit, EditReader, Intent, NoEdit, arrival_at
from kontext_s3.fal_queue import FalQueueClient
from kontext_s3.holding import Held, Holds, upload_id_of
from kontext_s3.input_image import InputImages, RefusedInput
from kontext_s3.jobs import JobStore
from kontext_s3.line import Line
from kontext_s3.log import logger
from kontext_s3.outcomes import ChangeResult, Outcome, Refusal, RetryLater
from kontext_s3.recipes import is_recipe
from kontext_s3.redact import redact
from kontext_s3.s3_events import MalformedNotification, ObjectChange, notification, parse_notification, stack_marks
from kontext_s3.sending import Sender
from kontext_s3.settings import Settings
from kontext_s3.upload_names import UploadNames

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["ChangeResult", "Outcome", "RetryLater", "Submitter"]

#: A backfill inside an upload's tag wait comes back this long after the upload's own tag deadline.
BACKFILL_MARGIN_SECONDS = 5


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
        self._finisher = finisher
        self._cancellation = cancellation
        admission = admission if admission is not None and admission.limited else None
        self._edits = EditReader(s3, settings)
        self._holds = Holds(jobs, settings)
        self._names = UploadNames(s3, settings)
        self._images = InputImages(s3, settings)
        sender = Sender(settings=settings, s3=s3, jobs=jobs, fal=fal, finisher=finisher, admission=admission)
        self._line = Line(jobs=jobs, admission=admission, images=self._images, finisher=finisher, sender=sender)
        #: Puts a message on the uploads queue after a delay: an upload waiting for its tags is looked at again.
        self._send_later = send_later
        self._failures = failures

    def handle_message(self, body: str, *, message_id: str, receive_count: int, deadline: float) -> list[ChangeResult]:
        """Handle one SQS message body. Raises :class:`RetryLater` (or any error) to have it retried."""
        if is_dispatch(body):
            try:
                return self._line.dispatch_coalesced(deadline=deadline)
            except Exception as exc:
                extra = {"message_id": message_id, "reason": redact(str(exc))}
                logger.exception("dispatching the line failed; the signal will be retried", extra=extra)
                raise
        try:
            changes = parse_notification(body)
        except MalformedNotification as exc:
            extra = {"message_id": message_id, "reason": str(exc)}
            logger.error("message is not an S3 notification; it will be retried into the DLQ", extra=extra)
            raise
        if not changes:
            logger.info("s3:TestEvent acknowledged", extra={"message_id": message_id})
        intent = Intent.of(stack_marks(body))
        results = []
        for change in changes:
            try:
                results.append(self.handle_change(change, receive_count=receive_count, deadline=deadline, intent=intent))
            except RetryLater:
                raise  # logged where it was decided
            except Exception as exc:
                extra = {"message_id": message_id, "object_key": change.key, "receive_count": receive_count, "reason": redact(str(exc))}
                logger.exception("message failed; it will be retried", extra=extra)
                raise
        return results

    def handle_change(self, change: ObjectChange, *, receive_count: int, deadline: float, intent: Intent | None = None) -> ChangeResult:
        """Route one record: an upload (or its new tags) goes down the submit path; a removal cancels; the rest is ignored."""
        logger.thread_safe_append_keys(object_key=change.key, bucket=change.bucket)
        try:
            ignored = self._ignored(change)
            if ignored:
                # Another bucket's record means a misrouted notification: worth a warning, the rest is routine.
                log = logger.info if self._settings.is_input_bucket(change.bucket) else logger.warning
                log(f"ignored: {ignored}", extra={"input_bucket": self._settings.input_bucket})
                return ChangeResult(Outcome.IGNORED, change.key, detail=ignored)
            if change.removed:
                cancelled = self._cancellation.input_removed(change, deadline=deadline) if self._cancellation else []
                return ChangeResult(Outcome.CANCELLED if cancelled else Outcome.IGNORED, change.key, detail=",".join(cancelled))
            change = self._names.named(change)
            attempt = MessageAttempt(self._jobs, self._finisher, receive_count, self._settings.max_receive_count)
            return self.upload(change, intent or Intent(), attempt, deadline=deadline)
        except Exception as exc:
            self._failed_delivery(change, exc, receive_count)
            raise
        finally:
            logger.thread_safe_remove_keys(["object_key", "bucket", "job_id"])

    # -- the submit path ------------------------------------------------------------------------

    def upload(self, change: ObjectChange, intent: Intent, attempt: MessageAttempt, *, deadline: float) -> ChangeResult:
        """Read the edit, hold the job, examine the image, take a turn, send."""
        waits = self._backfill_waits(change, intent)
        if waits:
            return waits
        # The edit is read before the job exists: with re-runs on tag changes, it is part of the job's id.
        try:
            edit = self._edits.read(change, intent)
        except Exception as exc:
            return self._edit_unreadable(change, exc, attempt, deadline)
        if isinstance(edit, AwaitTags):
            return self._tags_due_later(change)
        if isinstance(edit, NoEdit):
            return ChangeResult(Outcome.IGNORED, change.key, detail="new tags that describe no edit")
        if isinstance(edit, Refusal):
            return self._refuse(change, edit, deadline)
        held = self._holds.hold(change, edit.fields, deadline)
        if isinstance(held, ChangeResult):
            return held
        # The image is looked at only once the job is ours, so a duplicate delivery stops at the job.
        try:
            seen = self._images.examine(change, held.job.output_prefix, edit.body, deadline=deadline)
        except RefusedInput as exc:
            return self._fail(held, Refusal(exc.code, str(exc)))
        except Exception as exc:
            return attempt.not_sent(held, edit, f"{type(exc).__name__}: {exc}", code="retries_exhausted", cause=exc)
        ready: Edit = replace(edit, body=seen.body, content_type=seen.content_type, image_json=seen.image_json)
        return self._line.take_turn(held, ready, attempt, deadline=deadline)

    # -- the ways off the path ---------------------------------------------------------------------

    def _ignored(self, change: ObjectChange) -> str:
        """Why a record is no upload of ours, or "" when it is one (or a removal of one)."""
        settings = self._settings
        if not settings.is_input_bucket(change.bucket):
            return "the record is about a bucket the stack is not attached to"
        if not change.key.startswith(settings.input_prefix) or change.key.endswith("/"):
            return "not an object under the input prefix"
        if is_recipe(change.key):
            return "a folder recipe, not an upload"
        if change.removed:
            return ""
        if not (change.created or change.tagged):
            return f"{change.event_name} is not an upload"
        if change.tagged and not settings.rerun_on_tag_change and not settings.tag_wait_seconds:
            return "tags are read at upload only"
        return ""

    def _refuse(self, change: ObjectChange, refusal: Refusal, deadline: float) -> ChangeResult:
        """The user's mistake, recorded once per edit asked for (a fixed edit is a new job)."""
        held = self._holds.hold(change, refusal.fields, deadline)
        return held if isinstance(held, ChangeResult) else self._fail(held, refusal)

    def _fail(self, held: Held, refusal: Refusal) -> ChangeResult:
        self._finisher.fail(
            held.job,
            held.holder,
            stage="validation",
            code=refusal.code,
            message=refusal.message,
            problems=refusal.problems,
            recipe=refusal.recipe,
        )
        return ChangeResult(Outcome.FAILED, held.job.key, held.job.job_id, f"{refusal.code}: {refusal.message}")

    def _edit_unreadable(self, change: ObjectChange, exc: Exception, attempt: MessageAttempt, deadline: float) -> ChangeResult:
        """The edit could not be read: retried by SQS; the last delivery leaves a recorded, retryable failure."""
        reason = f"{type(exc).__name__}: {exc}"
        # A tag event whose edit could not be read names no job of its own: its message goes to the DLQ.
        if attempt.receive_count < attempt.max_receive_count or change.tagged:
            logger.warning(
                "transient fault: the message will be retried", extra={"reason": redact(reason), "receive_count": attempt.receive_count}
            )
            raise RetryLater(redact(reason)) from exc
        held = self._holds.hold(change, None, deadline)
        if isinstance(held, ChangeResult):
            return held
        attempt.retry_later(held, reason, code="retries_exhausted", cause=exc)

    def _tags_due_later(self, change: ObjectChange) -> ChangeResult:
        """Look at the upload again once its tags are due: the same event, marked so it does not wait twice."""
        self._later(notification([change], tags_due=True), self._settings.tag_wait_seconds)
        logger.info("no edit yet: waiting for the upload's tags", extra={"tag_wait_seconds": self._settings.tag_wait_seconds})
        return ChangeResult(Outcome.WAITING, change.key, None, "tags")

    def _backfill_waits(self, change: ObjectChange, intent: Intent) -> ChangeResult | None:
        """A backfill never takes an upload that may still get its own tags: it comes back once their wait is over.

        Taken earlier, the uploader's own tags would arrive as another edit and run a second, paid job.
        """
        uploaded = arrival_at(change.event_time)
        if intent.backfill is None or not self._settings.tag_wait_seconds or uploaded is None:
            return None
        left = self._settings.tag_wait_seconds - (datetime.now(UTC) - uploaded).total_seconds()
        if left <= 0:
            return None
        # A margin past the upload's own tag deadline, so the upload's own tags (or their absence) are heard first.
        self._later(notification([change], **intent.backfill), int(left) + BACKFILL_MARGIN_SECONDS)
        logger.info("backfill waits until the upload's own tags are due", extra={"seconds_left": int(left)})
        return ChangeResult(Outcome.WAITING, change.key, None, "backfill waits for the upload's tags")

    def _later(self, body: str, delay_seconds: int) -> None:
        if self._send_later is None:
            raise RuntimeError("UPLOADS_QUEUE_URL is not set: an upload that must be looked at again later could not be")
        self._send_later(body, delay_seconds)

    def _failed_delivery(self, change: ObjectChange, exc: Exception, receive_count: int) -> None:
        """Tell whoever follows the upload, within seconds, why this delivery failed (see ``delivery_failures``)."""
        if self._failures is None:
            return
        try:
            upload_id = upload_id_of(change)
        except ValueError:
            return  # an event that names no upload: its log line is all there is
        cause = exc.__cause__ if isinstance(exc, RetryLater) and exc.__cause__ is not None else exc
        failure = DeliveryFailure.of(change.key, cause, delivery=receive_count, max_deliveries=self._settings.max_receive_count)
        self._failures.record(upload_id, failure)
