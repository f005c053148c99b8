"""Holding a job to finish it, and publishing its end once: the finishers' side (webhook, recovery, cancellation).

A claim changes no state: it holds a job fal has (or may have) until its holder ends it with
:attr:`Transitions.COMPLETE <kontext_s3.jobs.transitions.Transitions.COMPLETE>` or ``FAIL``, or lets go.
"""

from __future__ import annotations

from collections.abc import Iterable

from botocore.exceptions import ClientError

from kontext_s3.dynamo import conditional_failure
from kontext_s3.jobs.base import plain
from kontext_s3.jobs.index import NOTIFY_HOLD_MS
from kontext_s3.jobs.model import AT_FAL, Claim, Job, JobState, new_holder, now_ms
from kontext_s3.jobs.moves import JobMoves
from kontext_s3.jobs.transitions import Hold, T


class JobFinishing(JobMoves):
    def claim(
        self, job_id: str, holder: str, *, hold_ms: int, states: Iterable[JobState] = AT_FAL, request_id: str | None = None
    ) -> Claim | None:
        """Hold a job to finish it. ``None`` when it ended, is in another state, or someone holds it.

        ``request_id``: the claim acts on what fal said about that request, so it holds only while the job's request is
        still that one (the job may have been sent again, as another request, since it was read).
        """
        at = now_ms()
        names = {f":s{i}": s.value for i, s in enumerate(states)}
        writer = new_holder()
        same_request = " AND request_id = :rid" if request_id else ""
        try:
            old = self._table.update_item(
                Key={"job_id": job_id},
                UpdateExpression="SET holder = :holder, held_until_ms = :until, last_writer = :writer",
                ConditionExpression=(f"attribute_exists(job_id) AND #state IN ({', '.join(names)}) AND {Hold.FREE.value}" + same_request),
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    **names,
                    ":holder": holder,
                    ":until": at + hold_ms,
                    ":writer": writer,
                    ":at": at,
                    **({":rid": request_id} if request_id else {}),
                },
                ReturnValues="ALL_OLD",
            )["Attributes"]
        except ClientError as exc:
            if not conditional_failure(exc):
                raise
            mine = self._if_mine(job_id, writer, exc)
            return Claim(mine, holder, took_over=False) if mine is not None else None
        job = Job.model_validate({**plain(old), "holder": holder, "held_until_ms": at + hold_ms, "last_writer": writer})
        return Claim(job, holder, took_over=old.get("holder") is not None)

    def unclaim(self, job_id: str, holder: str) -> None:
        """Let go of a job without changing its state (a cancel fal refused)."""
        try:
            self._table.update_item(
                Key={"job_id": job_id},
                UpdateExpression="REMOVE holder, held_until_ms",
                ConditionExpression="holder = :holder",
                ExpressionAttributeValues={":holder": holder},
            )
        except ClientError as exc:
            if not conditional_failure(exc):
                raise

    def claim_notification(self, job_id: str, *, hold_ms: int = NOTIFY_HOLD_MS) -> bool:
        """Win the right to publish an ended job's event: one caller at a time, until it is published."""
        at = now_ms()
        try:
            self._table.update_item(
                Key={"job_id": job_id},
                UpdateExpression="SET notify_until_ms = :until",
                ConditionExpression=(
                    "attribute_exists(job_id) AND #state IN (:completed, :failed) AND attribute_not_exists(notified_at_ms) "
                    "AND (attribute_not_exists(notify_until_ms) OR notify_until_ms < :at)"
                ),
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    ":completed": JobState.COMPLETED.value,
                    ":failed": JobState.FAILED.value,
                    ":until": at + hold_ms,
                    ":at": at,
                },
            )
        except ClientError as exc:
            if conditional_failure(exc):
                return False
            raise
        return True

    def mark_notified(self, job_id: str) -> None:
        self._table.update_item(
            Key={"job_id": job_id},
            UpdateExpression="SET notified_at_ms = :at REMOVE notify_until_ms, open_shard, open_order",
            ExpressionAttributeValues={":at": now_ms()},
        )

    def complete(self, job_id: str, holder: str, *, output_keys: list[str], manifest_key: str, note: str, notify: bool) -> Job | None:
        at = now_ms()
        sets = {"output_keys": output_keys, "manifest_key": manifest_key, "ended_at_ms": at}
        return self.move(T.COMPLETE, job_id, holder=holder, sets=sets, note=note, notify=notify, at=at)

    def fail(
        self,
        job_id: str,
        holder: str,
        *,
        code: str,
        message: str,
        error_key: str,
        retryable: bool = False,
        notify: bool = True,
        error_written: bool = True,
    ) -> Job | None:
        """``retryable`` marks failures where nothing reached fal, so a message redriven from the DLQ takes it up again.

        ``error_written`` is false when S3 refused the error record (a bucket whose KMS key the stack was not given):
        the job's item then holds the only record of the failure."""
        at = now_ms()
        sets = {
            "error_code": code,
            "error_message": message[:4000],
            "error_key": error_key,
            "failure_retryable": retryable,
            "ended_at_ms": at,
            "error_written": error_written,
        }
        return self.move(T.FAIL, job_id, holder=holder, sets=sets, note=f"{code}: {message}", notify=notify, at=at)
