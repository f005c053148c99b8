"""Performing the transitions: :meth:`JobMoves.move` writes any of them, and the named moves say what each one sets.

The rules (from which states, under which hold, clearing what) are in :mod:`.transitions`; a named move only gives
the values of the moment (fal's request id, the reason, the slot granted). A move returns the job as written when
the caller won, and ``None`` when it lost (the job was not in a state the transition leaves from, or not held as it
asks): lost is always ``None``, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

from kontext_s3.dynamo import conditional_failure
from kontext_s3.jobs.base import TableAccess, plain
from kontext_s3.jobs.index import NOTIFY, NOTIFY_HOLD_MS, open_shard
from kontext_s3.jobs.model import Job, iso, new_holder, now_ms
from kontext_s3.jobs.transitions import Index, T, Transition

_NOTE_CHARS = 500
_REASON_CHARS = 1000
_PLACEHOLDER = re.compile(r":\w+")


class JobMoves(TableAccess):
    def move(
        self,
        transition: Transition,
        job_id: str,
        *,
        holder: str | None = None,
        hold_ms: int = 0,
        sets: Mapping[str, Any] | None = None,
        note: str = "",
        notify: bool = False,
        at: int | None = None,
    ) -> Job | None:
        """Perform ``transition`` as one conditional write; the job as written, or ``None`` when the caller lost."""
        at = at or now_ms()
        writer = new_holder()
        target = transition.target.value
        values: dict[str, Any] = {
            ":new_state": target,
            ":updated": iso(at),
            ":writer": writer,
            ":empty": [],
            ":entry": [{"state": target, "at": iso(at), "note": (note or transition.name)[:_NOTE_CHARS]}],
            ":at": at,
            ":true": True,
            ":holder": holder,
            ":rid": (sets or {}).get("request_id"),
            **{f":s_{case.source.value}": case.source.value for case in transition.cases},
        }
        assignments = [
            "#state = :new_state",
            "updated_at = :updated",
            "last_writer = :writer",
            "history = list_append(if_not_exists(history, :empty), :entry)",
        ]
        removes = list(transition.clears)
        if transition.index is Index.LINE:  # in line by the upload's arrival, not by when it was last looked at
            assignments += ["open_shard = :shard", "open_order = if_not_exists(arrived_at_ms, :at)"]
            values[":shard"] = open_shard(target, job_id)
        elif transition.index is Index.OPEN:
            assignments += ["open_shard = :shard", "open_order = :at"]
            values[":shard"] = open_shard(target, job_id)
        elif notify:  # ended, its event still to be published: the caller that ended it holds the right to publish it
            assignments += ["open_shard = :shard", "open_order = :at", "notify_until_ms = :notify_until"]
            values.update({":shard": open_shard(NOTIFY, job_id), ":notify_until": at + NOTIFY_HOLD_MS})
        else:
            removes += ["open_shard", "open_order"]
        if transition.takes_hold:
            assignments += ["holder = :holder", "held_until_ms = :until"]
            values[":until"] = at + hold_ms
        elif not transition.keeps_hold:
            removes += ["holder", "held_until_ms"]
        if transition.counts_attempt:
            assignments.append("attempts = attempts + :one")
            values[":one"] = 1
        for index, (name, value) in enumerate([*transition.fixed, *(sets or {}).items()]):
            if value is not None:
                assignments.append(f"{name} = :v{index}")
                values[f":v{index}"] = value
        expression = "SET " + ", ".join(assignments) + (" REMOVE " + ", ".join(dict.fromkeys(removes)) if removes else "")
        condition = f"attribute_exists(job_id) AND ({transition.condition()})"
        used = set(_PLACEHOLDER.findall(expression + " " + condition))  # DynamoDB refuses values it is not asked for
        try:
            result = self._table.update_item(
                Key={"job_id": job_id},
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={name: value for name, value in values.items() if name in used},
                ReturnValues="ALL_NEW",
            )
        except ClientError as exc:
            if conditional_failure(exc):
                return self._if_mine(job_id, writer, exc)
            raise
        return Job.model_validate(plain(result["Attributes"]))

    # -- the submit side --------------------------------------------------------------------------

    def take_over(self, job_id: str, *, holder: str, hold_ms: int, sequencer: str | None = None) -> Job | None:
        """``sequencer``: the write of the same bytes that takes it up (an unversioned bucket's), from now on its own."""
        sets = {"sequencer": sequencer} if sequencer else None
        return self.move(T.TAKE_OVER, job_id, holder=holder, hold_ms=hold_ms, sets=sets, note="taken up again")

    def release(self, job_id: str, holder: str, *, reason: str) -> Job | None:
        return self.move(T.RELEASE, job_id, holder=holder, sets={"error_message": reason[:_REASON_CHARS]}, note=f"will retry: {reason}")

    def wait(
        self,
        job_id: str,
        holder: str,
        *,
        reason: str,
        until_ms: int | None,
        input_json: str,
        content_type: str,
        recipe_json: str | None = None,
        image_json: str | None = None,
    ) -> Job | None:
        sets = {
            "wait_reason": reason,
            "wait_until_ms": until_ms or 0,
            "input_json": input_json,
            "content_type": content_type,
            "recipe_json": recipe_json,
            "image_json": image_json,
        }
        note = f"waiting for {'the daily budget' if reason == 'budget' else 'a slot'}"
        return self.move(T.WAIT, job_id, holder=holder, sets=sets, note=note)

    def return_to_line(self, job_id: str) -> Job | None:
        return self.move(T.RETURN_TO_LINE, job_id, note="its taker stopped before sending it: back in line")

    def take_waiting(self, job_id: str, *, holder: str, hold_ms: int) -> Job | None:
        return self.move(T.TAKE_WAITING, job_id, holder=holder, hold_ms=hold_ms)

    def begin_send(
        self,
        job_id: str,
        holder: str,
        *,
        input_json: str,
        slot: str | None = None,
        budget_day: str | None = None,
        images: int = 0,
        recipe_json: str | None = None,
        image_json: str | None = None,
    ) -> Job | None:
        """Records what admission granted (the slot, the budget charged), so every ending can give it back."""
        at = now_ms()
        sets = {
            "input_json": input_json,
            "sent_at_ms": at,
            "admitted_at_ms": at,
            "slot": slot,
            "budget_day": budget_day,
            "budget_images": images if budget_day is not None else None,
            "recipe_json": recipe_json,
            "image_json": image_json,
        }
        return self.move(T.BEGIN_SEND, job_id, holder=holder, sets=sets, note="sending to fal", at=at)

    def requeue(self, job: Job, holder: str, *, reason: str) -> Job | None:
        """The job as its holder read it: the request put back is remembered, so its late webhook is never adopted."""
        sets = {"past_request_ids": [*job.past_request_ids, job.request_id]} if job.request_id else None
        return self.move(T.REQUEUE, job.job_id, holder=holder, sets=sets, note=f"back in line: {reason}")

    def not_enqueued(self, job_id: str, holder: str, *, reason: str, wait: bool = False) -> Job | None:
        """``wait``: the job came from the line (it has no message to retry it), so it goes back in line."""
        transition, note = (T.NOT_ENQUEUED_TO_LINE, "back in line") if wait else (T.NOT_ENQUEUED, "will retry")
        sets = {"error_message": reason[:_REASON_CHARS]}
        return self.move(transition, job_id, holder=holder, sets=sets, note=f"fal did not take it; {note}: {reason}")

    def mark_submitted(
        self,
        job_id: str,
        holder: str,
        *,
        request_id: str,
        gateway_request_id: str | None,
        status_url: str,
        response_url: str,
        cancel_url: str,
        queue_position: int | None = None,
    ) -> Job | None:
        at = now_ms()
        sets = {
            "request_id": request_id,
            "gateway_request_id": gateway_request_id or request_id,
            "status_url": status_url,
            "response_url": response_url,
            "cancel_url": cancel_url,
            "submitted_at_ms": at,
            "queue_position": queue_position if queue_position is not None else -1,
        }
        return self.move(T.MARK_SUBMITTED, job_id, holder=holder, sets=sets, note=f"fal request {request_id}", at=at)

    def mark_uncertain(
        self,
        job_id: str,
        *,
        reason: str,
        holder: str | None = None,
        request_id: str | None = None,
        urls: tuple[str, str, str] | None = None,
    ) -> Job | None:
        """The request may be at fal. Said by its sender (``holder``), or by anyone once a SENDING hold has lapsed."""
        at = now_ms()
        sets: dict[str, Any] = {"error_message": reason[:_REASON_CHARS], "uncertain_since_ms": at}
        if request_id:
            sets.update(request_id=request_id, submitted_at_ms=at)
            if urls:
                sets.update(status_url=urls[0], response_url=urls[1], cancel_url=urls[2])
        transition = T.MARK_UNCERTAIN if holder is not None else T.SENDER_DIED
        return self.move(transition, job_id, holder=holder, sets=sets, note=reason, at=at)

    def sender_died(self, job_id: str) -> Job | None:
        """A SENDING job whose hold lapsed: its sender died mid-request, so fal may hold it. Whoever sees it says so."""
        return self.mark_uncertain(job_id, reason="the worker sending it stopped mid-way; not resent, to never pay twice")

    def adopt_request(self, job_id: str, request_id: str) -> Job | None:
        at = now_ms()
        sets = {"request_id": request_id, "submitted_at_ms": at}
        return self.move(T.ADOPT_REQUEST, job_id, sets=sets, note=f"fal request {request_id} (learned from its webhook)", at=at)
