"""An upload is paid for at most once, and one that can no longer be sent is ended with a record, never left behind.

Each test drives the real handlers (loaded as a cold start loads them) against moto and the fal emulator over
sockets, and counts what fal received: every request fal accepted is a paid one.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from kontext_s3.admission import Admission, Wait
from kontext_s3.jobs import JobState, JobStore
from kontext_s3.s3_events import notification, parse_notification
from kontext_s3_tools.aws_gateway import Answer, Call
from kontext_s3_tools.local_stack import LambdaContext
from tests.adversarial.test_recovery_races import fal_request, job_for
from tests.helpers import dispatch_signal, jpeg_bytes
from tests.helpers import eventually as until
from tests.world import World, world

__all__ = ["world"]

RECIPE = "inputs/dam/_kontext.json"


def deliver_queue(world: World, submit: ModuleType) -> int:
    """Every message in the uploads queue, once, as Lambda would deliver it; returns how many."""
    delivered = 0
    while messages := world.aws.receive(wait=1):
        for message in messages:
            world.deliver(submit, message)
            world.aws.sqs.delete_message(QueueUrl=world.aws.resources.queue_url, ReceiptHandle=message["ReceiptHandle"])
            delivered += 1
    return delivered


def dispatch(world: World, submit: ModuleType) -> None:
    """The signal that a slot is free, as the webhook sends it."""
    world.deliver(submit, dispatch_signal())


def removal_of(world: World, version: str) -> dict[str, Any]:
    """The ObjectRemoved event of a versioned delete, naming the version as S3 does (moto does not)."""
    message = world.upload_event()
    body = json.loads(message["Body"])
    body["Records"][0]["s3"]["object"]["versionId"] = version
    return {**message, "Body": json.dumps(body)}


def full_house(world: World, submit: ModuleType) -> str:
    """One upload at fal (30 s in its queue) holding the only slot; returns its job id."""
    world.emulator.set_faults(queue_ms=30_000)
    version = world.upload("inputs/at-fal.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job("inputs/at-fal.jpg", version)
    assert job.state is JobState.SUBMITTED and job.slot is not None
    return job.job_id


def free_the_slot(world: World, holder: str) -> None:
    job = JobStore(world.aws.table()).get(holder)
    assert job is not None and Admission(world.aws.table(), max_jobs_at_fal=1, daily_image_budget=0).release(job.slot)


def test_a_tag_that_asks_no_edit_put_after_the_folders_recipe_changed_runs_nothing(world: World) -> None:
    submit = world.submit(TAG_WAIT_SECONDS="0")
    world.aws.s3.put_object(Bucket=world.aws.resources.bucket, Key=RECIPE, Body=json.dumps({"prompt": "the recipe then"}).encode())
    time.sleep(1.1)  # S3's LastModified is to the second: the upload comes strictly after the recipe
    version = world.upload("inputs/dam/a.jpg", tags={})
    deliver_queue(world, submit)
    assert [s["body"]["prompt"] for s in world.emulator.submits()] == ["the recipe then"]

    time.sleep(1.1)
    world.aws.s3.put_object(Bucket=world.aws.resources.bucket, Key=RECIPE, Body=json.dumps({"prompt": "the recipe now"}).encode())
    # A bulk re-tag (cost tags, a DAM): no edit field among the tags.
    world.aws.s3.put_object_tagging(
        Bucket=world.aws.resources.bucket,
        Key="inputs/dam/a.jpg",
        VersionId=version,
        Tagging={"TagSet": [{"Key": "owner", "Value": "team-a"}]},
    )
    deliver_queue(world, submit)
    assert [s["body"]["prompt"] for s in world.emulator.submits()] == ["the recipe then"]  # one paid request
    assert len(world.jobs_of_upload("inputs/dam/a.jpg", version)) == 1


def test_one_waiting_upload_that_cannot_be_sent_gets_its_record_and_the_line_moves_on(world: World) -> None:
    # With data URIs the image is read at its turn: a version deleted meanwhile cannot be sent.
    submit = world.submit(MAX_JOBS_AT_FAL="1", IMAGE_TRANSPORT="data-uri")
    holder = full_house(world, submit)
    broken = world.upload("inputs/line/1-broken.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    healthy = world.upload("inputs/line/2-healthy.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    world.aws.s3.delete_object(Bucket=world.aws.resources.bucket, Key="inputs/line/1-broken.jpg", VersionId=broken)
    world.aws.receive(wait=1)

    world.emulator.set_faults(queue_ms=0)
    free_the_slot(world, holder)
    dispatch(world, submit)
    assert world.job("inputs/line/1-broken.jpg", broken).state is JobState.FAILED
    assert world.job("inputs/line/2-healthy.jpg", healthy).state is JobState.SUBMITTED
    assert world.posts() == 2


def test_a_request_larger_than_the_whole_daily_budget_is_refused_with_a_record_not_sent(world: World) -> None:
    submit = world.submit(DAILY_IMAGE_BUDGET="2")
    version = world.upload("inputs/four.jpg", {"prompt": "four of them", "num_images": 4})
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job("inputs/four.jpg", version)
    assert job.state is JobState.FAILED and job.error_code == "over_daily_budget"
    assert "DailyImageBudget" in world.error_record(job)["message"]
    assert world.posts() == 0


def test_the_days_first_charge_must_fit_the_budget_too(world: World) -> None:
    admission = Admission(world.aws.table(), max_jobs_at_fal=0, daily_image_budget=2)
    assert isinstance(admission.admit("a" * 32, 3, taker="t"), Wait)
    assert admission.used_today() == 0
    assert not isinstance(admission.admit("b" * 32, 2, taker="t"), Wait)


def test_recovery_does_not_act_on_a_request_the_job_no_longer_has(world: World) -> None:
    # R1 timed out in fal's queue (never started); before recovery claims the job, it is sent again as R2.
    image = world.emulator.host_file("in.jpg", jpeg_bytes(), "image/jpeg")
    world.emulator.set_faults(queue_ms=3_000)
    r1 = fal_request(world, image, headers={"X-Fal-Request-Timeout": "1"})
    job = job_for(world, r1, "inputs/stale.jpg")
    until(lambda: world.emulator.requests[r1.request.request_id].status == "COMPLETED", what="R1 to time out at fal")
    world.emulator.set_faults(queue_ms=30_000)
    r2 = fal_request(world, image)

    def sent_again_before_the_claim(call: Call) -> Answer | None:
        body = call.json() or {}
        if call.action == "UpdateItem" and "held_until_ms < :at" in str(body.get("ConditionExpression", "")) and not resent:
            resent.append(r2.request.request_id)
            world.aws.table().update_item(
                Key={"job_id": job.job_id},
                UpdateExpression="SET request_id = :r, status_url = :s, response_url = :p, cancel_url = :c",
                ExpressionAttributeValues={
                    ":r": r2.request.request_id,
                    ":s": r2.request.status_url,
                    ":p": r2.request.response_url,
                    ":c": r2.request.cancel_url,
                },
            )
        return None

    resent: list[str] = []
    world.gateway.add_fault(sent_again_before_the_claim)
    recover = world.recover(RECOVERY_AFTER_SECONDS="0")
    recover.lambda_handler({"source": "aws.scheduler", "detail": {}}, LambdaContext("recover", 60))
    assert resent, "recovery never tried to claim the job"
    now = JobStore(world.aws.table()).get(job.job_id)
    assert now is not None and now.state is JobState.SUBMITTED and now.request_id == r2.request.request_id
    assert world.posts() == 2  # R1 and R2; nothing put back in line for a third


def test_a_request_fal_runs_past_the_max_age_keeps_its_slot_and_ends_with_its_outputs(world: World) -> None:
    _, server = world.webhook(MAX_JOBS_AT_FAL="1", FAL_USER_ID=world.emulator.user_id)
    submit = world.submit(webhook_url=server.url, MAX_JOBS_AT_FAL="1")
    world.emulator.set_faults(processing_ms=6_000)
    version = world.upload("inputs/long.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job("inputs/long.jpg", version)
    until(lambda: world.emulator.requests[str(job.request_id)].status == "IN_PROGRESS", what="fal to start it")
    time.sleep(1.2)
    recover = world.recover(MAX_JOBS_AT_FAL="1", RECOVERY_AFTER_SECONDS="0", JOB_MAX_AGE_SECONDS="1")
    recover.lambda_handler({"source": "aws.scheduler", "detail": {}}, LambdaContext("recover", 60))
    assert world.job("inputs/long.jpg", version).state is JobState.SUBMITTED  # fal would not cancel it: it runs
    assert Admission(world.aws.table(), max_jobs_at_fal=1, daily_image_budget=0).holders() == {job.slot}

    world.emulator.set_faults(processing_ms=0)
    world.upload("inputs/next.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    until(lambda: world.job("inputs/long.jpg", version).state is JobState.COMPLETED, timeout=30, what="its webhook")
    # The freed slot signals the dispatcher (a message the test delivers by hand; here it may find the line empty).
    world.deliver(submit, dispatch_signal())
    assert world.posts() == 2
    # The slot fal still fills is not given to another request: never two open at fal at once.
    # (Whether next.jpg went by its own delivery or from the line once long.jpg ended is timing.)
    assert world.emulator.state()["queue"]["peak_open"] == 1


def test_a_backfill_never_takes_an_upload_that_may_still_get_its_own_tags(world: World) -> None:
    submit = world.submit(TAG_WAIT_SECONDS="2")
    version = world.upload("inputs/fresh.jpg", tags={})
    upload = world.upload_event()
    assert world.deliver(submit, upload) == []  # no prompt yet: it waits for its tags
    [change] = parse_notification(upload["Body"])
    change = replace(change, version_id=version)
    backfill = notification([change], backfill=True, fields={"prompt": "from the backfill"}, recipe_at=datetime.now(UTC).isoformat())
    assert world.deliver(submit, {**upload, "MessageId": "backfill", "Body": backfill}) == []
    assert world.posts() == 0

    world.aws.s3.put_object_tagging(
        Bucket=world.aws.resources.bucket,
        Key="inputs/fresh.jpg",
        VersionId=version,
        Tagging={"TagSet": [{"Key": "prompt", "Value": "own"}]},
    )
    deliver_for(world, submit, seconds=10)  # the tag event, the upload's tag deadline, and the backfill come back
    assert [s["body"]["prompt"] for s in world.emulator.submits()] == ["own"]


def test_a_backfill_gives_an_edit_to_an_upload_whose_wait_ended_without_one(world: World) -> None:
    submit = world.submit(TAG_WAIT_SECONDS="1")
    version = world.upload("inputs/never-tagged.jpg", tags={})
    upload = world.upload_event()
    assert world.deliver(submit, upload) == []
    deliver_for(world, submit, seconds=4)  # the tag deadline: an invalid_tags record (no prompt), nothing sent
    assert world.job("inputs/never-tagged.jpg", version).error_code == "invalid_tags"
    [change] = parse_notification(upload["Body"])
    backfill = notification(
        [replace(change, version_id=version)], backfill=True, fields={"prompt": "at last"}, recipe_at=datetime.now(UTC).isoformat()
    )
    assert world.deliver(submit, {**upload, "MessageId": "backfill", "Body": backfill}) == []
    assert [s["body"]["prompt"] for s in world.emulator.submits()] == ["at last"]


def deliver_for(world: World, submit: ModuleType, *, seconds: float) -> None:
    """Deliver whatever arrives in the uploads queue for ``seconds`` (delayed messages included)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for message in world.aws.receive(wait=1):
            world.deliver(submit, message)
            world.aws.sqs.delete_message(QueueUrl=world.aws.resources.queue_url, ReceiptHandle=message["ReceiptHandle"])
