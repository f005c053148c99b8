"""Admission: how many requests this stack keeps open at fal, and how many images a UTC day may cost.

fal runs at most L of an account's requests at once and queues the rest; a
request queued there for long finds its presigned input URL expired when it
finally starts. So the stack keeps its own queue (WAITING jobs in the jobs
table) and submits only when it holds one of ``MAX_JOBS_AT_FAL`` slots, and
only while the day's ``DAILY_IMAGE_BUDGET`` allows the images asked.

* The **slots** are one item, ``_slots``, whose set ``holders`` has one member
  per slot taken: the job's id and its taker's hold (``<job id>#<holder>``).
  Taking one adds the member on condition the set has fewer than
  ``MAX_JOBS_AT_FAL`` (or has that member already: the SDK's retry), so two
  callers can never both take the last one and a full house costs one refused
  write and no read. Releasing removes that member on condition it is there, so
  a slot is freed at most once, whichever path ends the job. A member per take,
  not per job: a taker whose hold lapsed frees its own take, never the slot of
  the one that took the job up after it. The job records its member (``slot``).
* The **budget** is an item ``_budget#<YYYY-MM-DD>`` counting the images
  admitted that UTC day, charged by a conditional add that refuses to pass the
  budget, and refunded when fal never ran the request.
* A slot leaked by a crash (its job ended, waits, or lost its sender before
  sending) is found and freed by :meth:`Admission.reclaim`, which the
  recovery function runs.

``MAX_JOBS_AT_FAL`` 0 and ``DAILY_IMAGE_BUDGET`` 0 mean no limit: every call
admits at once and writes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from kontext_s3 import table_keys
from kontext_s3.dynamo import conditional_failure, retried
from kontext_s3.log import logger

if TYPE_CHECKING:
    from kontext_s3.dynamo import TableLike


@dataclass(frozen=True)
class Admitted:
    #: The slot held: its member of ``_slots`` (None when slots are unlimited).
    slot: str | None
    #: The UTC day charged, and how many images (None when the budget is unlimited).
    budget_day: str | None
    images: int


@dataclass(frozen=True)
class Wait:
    reason: str  # "slot" or "budget"
    #: When waiting for the budget: when the next UTC day starts (epoch ms).
    until_ms: int | None = None

    def sentence(self, ahead: int | None = None) -> str:
        if self.reason == "budget":
            when = datetime.fromtimestamp((self.until_ms or 0) / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
            return f"waiting for the daily budget (resets at {when})"
        return "waiting for a slot" + (f" ({ahead} ahead)" if ahead is not None else "")


def slot_member(job_id: str, taker: str) -> str:
    """The member of ``_slots`` that one take of a slot is: the job, and the hold that took it."""
    return f"{job_id}#{taker}"


def slot_taken_by(slot: str) -> tuple[str, str]:
    """The job and the taker's hold a member of ``_slots`` names (:func:`slot_member`'s inverse)."""
    job_id, _, taker = slot.partition("#")
    return job_id, taker


class Admission:
    def __init__(self, table: TableLike, *, max_jobs_at_fal: int, daily_image_budget: int, clock: Callable[[], float] = time.time) -> None:
        self._table = table
        self.max_jobs_at_fal = max_jobs_at_fal
        self.daily_image_budget = daily_image_budget
        self._clock = clock

    @property
    def limited(self) -> bool:
        return self.max_jobs_at_fal > 0 or self.daily_image_budget > 0

    def today(self) -> str:
        return datetime.fromtimestamp(self._clock(), tz=UTC).strftime("%Y-%m-%d")

    def next_day_ms(self) -> int:
        now = datetime.fromtimestamp(self._clock(), tz=UTC)
        return int((now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)).timestamp() * 1000)

    # -- taking and giving back -------------------------------------------------------------

    def never_admits(self, images: int) -> str | None:
        """Why a request of ``images`` can never be admitted (more than a whole day's budget), or None."""
        if 0 < self.daily_image_budget < images:
            return (
                f"the edit asks for {images} images, more than the whole daily budget of {self.daily_image_budget} "
                "(DailyImageBudget): it could never be sent; ask fewer images (num_images) or raise the budget"
            )
        return None

    def admit(self, job_id: str, images: int, *, taker: str) -> Admitted | Wait:
        """A slot and the day's images for ``job_id``, taken by the hold ``taker``, or why it must wait (nothing is
        held then).

        The slot first: a full house costs one refused write, where charging the day's images first would charge
        and refund them for every upload that meets it.
        """
        slot = None
        if self.max_jobs_at_fal > 0:
            slot = self._take_slot(slot_member(job_id, taker))
            if slot is None:
                return Wait("slot")
        day = None
        if self.daily_image_budget > 0:
            day = self.today()
            if not self._charge(day, images):
                self.release(slot)
                return Wait("budget", self.next_day_ms())
        return Admitted(slot, day, images)

    def release(self, slot: str | None) -> bool:
        """Free ``slot`` (a member of ``_slots``) if it is held; True when this call freed it (so at most one caller
        does, but for the SDK's retry of a release whose first attempt freed it: that one is said freed too)."""
        if slot is None:
            return False
        try:
            self._table.update_item(
                Key=table_keys.slots(),
                UpdateExpression="DELETE holders :slot_set",
                ConditionExpression="contains(holders, :slot)",
                ExpressionAttributeValues={":slot_set": {slot}, ":slot": slot},
            )
        except ClientError as exc:
            if conditional_failure(exc):
                # Refused at the first attempt: another freed it. After a retry, ours may have: the line is told
                # (a second signal costs a dispatch pass; a lost one leaves the line to recovery's next run).
                return retried(exc)
            raise
        return True

    def refund(self, day: str | None, images: int) -> None:
        """Give back a day's images for a request fal never ran (refused, or never started)."""
        if day is None or images <= 0:
            return
        self._table.update_item(
            Key=table_keys.budget(day),
            UpdateExpression="ADD used :minus",
            ExpressionAttributeValues={":minus": -images},
        )

    # -- what recovery reads ------------------------------------------------------------------

    def holders(self) -> set[str]:
        """The slots held now, as members (``<job id>#<holder>``; one consistent read)."""
        item = self._table.get_item(Key=table_keys.slots(), ConsistentRead=True).get("Item") or {}
        return {str(member) for member in item.get("holders", ())}

    def slot_free(self) -> bool:
        """Whether a slot looks free now (one consistent read; always, when slots are unlimited)."""
        return self.max_jobs_at_fal <= 0 or len(self.holders()) < self.max_jobs_at_fal

    def used_today(self) -> int:
        item = self._table.get_item(Key=table_keys.budget(self.today()), ConsistentRead=True).get("Item")
        return int(item.get("used", 0)) if item else 0

    def reclaim(self, still_needs_slot: Callable[[str, str, str], bool]) -> list[str]:
        """Free the slots no take needs any more (a crash leaked them); returns the slots freed.

        ``still_needs_slot(slot, job_id, taker)`` says whether the take is (or may be) at fal, or about to be.
        """
        freed = []
        for slot in sorted(self.holders()):
            job_id, taker = slot_taken_by(slot)
            if not still_needs_slot(slot, job_id, taker) and self.release(slot):
                logger.warning("a leaked slot was freed", extra={"slot": slot, "job_id": job_id})
                freed.append(slot)
        return freed

    # -- plumbing ---------------------------------------------------------------------------------

    def _charge(self, day: str, images: int) -> bool:
        try:
            self._table.update_item(
                Key=table_keys.budget(day),
                UpdateExpression="ADD used :n SET expires_at = if_not_exists(expires_at, :expires)",
                # A condition cannot add: "used + n <= budget" is written "used <= budget - n"; the day's first charge
                # (no "used" yet) must fit the budget too.
                ConditionExpression="(attribute_not_exists(used) AND :n <= :budget) OR used <= :room",
                ExpressionAttributeValues={
                    ":n": images,
                    ":budget": self.daily_image_budget,
                    ":room": self.daily_image_budget - images,
                    ":expires": int(self._clock()) + 8 * 86400,
                },
            )
        except ClientError as exc:
            if conditional_failure(exc):
                return False
            raise
        return True

    def _take_slot(self, slot: str) -> str | None:
        try:
            self._table.update_item(
                Key=table_keys.slots(),
                UpdateExpression="ADD holders :slot_set",
                # The SDK's retry of a take whose first attempt landed finds its member there: granted, nothing changes.
                ConditionExpression="attribute_not_exists(holders) OR size(holders) < :max OR contains(holders, :slot)",
                ExpressionAttributeValues={":slot_set": {slot}, ":max": self.max_jobs_at_fal, ":slot": slot},
            )
        except ClientError as exc:
            if conditional_failure(exc):
                return None
            raise
        return slot


DISPATCH = {"kontext_s3": "dispatch"}


def is_dispatch(body: str) -> bool:
    """Whether an uploads-queue message is the signal that a slot is free (not an S3 notification)."""
    if not body.startswith('{"kontext_s3"'):  # the cheap test first: nearly every message is an S3 notification
        return False
    try:
        return bool(json.loads(body) == DISPATCH)
    except ValueError:
        return False


class DispatchSignal:
    """Tells the submit function (through its own queue) that a slot is free, so the next waiting upload goes promptly."""

    def __init__(self, sqs: Any, queue_url: str) -> None:
        self._sqs = sqs
        self._queue_url = queue_url

    def __call__(self) -> None:
        if not self._queue_url:
            return
        try:
            self._sqs.send_message(QueueUrl=self._queue_url, MessageBody=json.dumps(DISPATCH))
        except (ClientError, BotoCoreError) as exc:
            # The recovery function dispatches on every run: a lost signal delays the line, it loses nothing.
            logger.warning("could not signal the submit function that a slot is free", extra={"reason": str(exc)})
