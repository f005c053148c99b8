"""Deleting an upload cancels what it would still cost, over the real handlers against moto and the fal emulator.

A request fal has not started is cancelled at fal and its slot comes back; an upload still in line is ended
without being sent, whether its deletion was heard or the line finds the input gone at its turn; an upload deleted
before its event is handled is never sent. (The same through the local stack: tests/e2e/test_cancellation.py.)
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from kontext_s3.jobs import JobState
from tests.integration.test_admission import freed_once, limited, submitted_with_slot
from tests.integration.test_never_pay_twice import dispatch, free_the_slot, full_house, removal_of
from tests.world import World, our_log_lines, world

__all__ = ["limited", "world"]


def test_an_upload_deleted_while_it_waits_for_a_slot_is_cancelled_and_never_sent(world: World) -> None:
    submit = world.submit(MAX_JOBS_AT_FAL="1")
    holder = full_house(world, submit)
    version = world.upload("inputs/waits.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    assert world.job("inputs/waits.jpg", version).state is JobState.WAITING

    world.aws.s3.delete_object(Bucket=world.aws.resources.bucket, Key="inputs/waits.jpg", VersionId=version)
    assert world.deliver(submit, removal_of(world, version)) == []
    job = world.job("inputs/waits.jpg", version)
    assert job.state is JobState.FAILED and job.error_code == "cancelled"
    assert "waited for its turn" in world.error_record(job)["message"]

    free_the_slot(world, holder)
    dispatch(world, submit)
    assert world.posts() == 1  # only the upload that was at fal already


def test_the_line_checks_the_input_before_it_sends_even_when_the_deletion_was_not_yet_heard(world: World) -> None:
    submit = world.submit(MAX_JOBS_AT_FAL="1")
    holder = full_house(world, submit)
    version = world.upload("inputs/gone.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    world.aws.s3.delete_object(Bucket=world.aws.resources.bucket, Key="inputs/gone.jpg", VersionId=version)
    world.aws.receive(wait=1)  # its removal event is still on its way (taken off the queue here, undelivered)

    free_the_slot(world, holder)
    dispatch(world, submit)
    job = world.job("inputs/gone.jpg", version)
    assert job.state is JobState.FAILED and job.error_code == "cancelled"
    assert world.posts() == 1


def test_a_cancel_fal_answers_404_is_logged_and_does_not_poison_the_message(world: World, caplog: Any) -> None:
    submit = world.submit()
    version = world.upload("inputs/forgotten.jpg")
    world.deliver(submit, world.upload_event())
    world.emulator.requests.clear()  # fal no longer knows the request
    world.aws.s3.delete_object(Bucket=world.aws.resources.bucket, Key="inputs/forgotten.jpg", VersionId=version)
    removal = world.upload_event()  # moto sends ObjectRemoved:Delete for the last version, without its versionId (S3 names it)
    body = json.loads(removal["Body"])
    assert body["Records"][0]["eventName"] == "ObjectRemoved:Delete"
    body["Records"][0]["s3"]["object"]["versionId"] = version
    assert world.deliver(submit, {**removal, "Body": json.dumps(body)}) == []
    assert any("refused the cancel" in r.getMessage() for r in our_log_lines(caplog))
    job = world.job("inputs/forgotten.jpg", version)
    assert job.state is JobState.SUBMITTED and job.holder is None  # left for recovery, not held


def test_an_upload_deleted_before_its_event_is_handled_is_not_paid_for(world: World) -> None:
    submit = world.submit()
    world.upload("inputs/regret.jpg")
    message = world.upload_event()
    world.aws.s3.delete_object(Bucket=world.aws.resources.bucket, Key="inputs/regret.jpg")  # a delete marker
    assert world.deliver(submit, message) == []
    [job] = world.jobs_of("inputs/regret.jpg")
    assert job.state is JobState.FAILED and job.error_code == "input_missing"
    assert world.posts() == 0


def test_the_slot_comes_back_when_a_deleted_input_is_cancelled_at_fal(limited: tuple[World, ModuleType, str]) -> None:
    world, submit, _ = limited
    job = submitted_with_slot(world, submit, "inputs/deleted.jpg", queue_ms=30_000)
    world.aws.s3.delete_object(Bucket=job.bucket, Key=job.key, VersionId=job.version_id)
    removal = world.upload_event()
    body = json.loads(removal["Body"])
    body["Records"][0]["s3"]["object"]["versionId"] = job.version_id  # S3 names it; moto does not
    assert world.deliver(submit, {**removal, "Body": json.dumps(body)}) == []
    assert world.job("inputs/deleted.jpg", job.version_id or "").error_code == "cancelled"
    freed_once(world, job)
