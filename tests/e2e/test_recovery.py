"""Lost webhooks, stuck jobs and deleted inputs, through the local stack."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from kontext_s3.completion import JobFinisher, MediaPolicy
from kontext_s3.fal_queue import FalQueueClient
from kontext_s3.jobs import JobState
from kontext_s3.notifications import JobEvents
from kontext_s3.output_store import OutputLayout
from kontext_s3.recovery import Recovery
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack
from tests.e2e.test_pipeline import image_file
from tests.helpers import eventually

pytestmark = pytest.mark.e2e


def recovery_with(stack: LocalStack, *, after: int, max_age: int) -> Recovery:
    """The recovery domain with other thresholds than the stack's function (to age jobs in seconds)."""
    jobs = stack.jobs()
    finisher = JobFinisher(
        s3=stack.client("s3"),
        jobs=jobs,
        events=JobEvents(None, bus_name="", source="kontext-s3"),
        layout=OutputLayout(stack.resources.input_prefix, stack.resources.output_prefix),
        http=httpx.Client(),
        media=MediaPolicy(allowed_urls=(stack.emulator.files_url,), max_image_bytes=10**8),
    )
    fal = FalQueueClient(httpx.Client(), base_url=stack.emulator.base_url, key=lambda: stack.fal_key)
    return Recovery(jobs=jobs, fal=fal, finisher=finisher, recovery_after_seconds=after, job_max_age_seconds=max_age)


def wait_for_fal(stack: LocalStack) -> None:
    eventually(
        lambda: stack.emulator.requests and all(r.status == "COMPLETED" for r in stack.emulator.requests.values()), what="fal to finish"
    )


def test_recovery_completes_a_job_whose_webhook_was_lost(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(lose_webhook=1)
    target = stack.target()
    uploaded = cli.upload_image(
        target, image_file(tmp_path), {"prompt": "the webhook gets lost", "num_images": 2}, key="inputs/recovery/lost.jpg"
    )
    wait_for_fal(stack)
    job = stack.jobs().get(uploaded.job_id)
    assert job is not None and job.state is JobState.SUBMITTED
    time.sleep(int(stack.environment["RECOVERY_AFTER_SECONDS"]) + 0.5)
    stack.run_recovery()  # the production recover function, as its schedule (also running) invokes it
    assert [d.get("lost") for d in stack.emulator.deliveries] == [True]  # so only recovery can have finished it
    result = cli.read_result(target, uploaded.job_id, uploaded.output_prefix)
    assert result is not None and result.succeeded and result.manifest is not None
    assert [image["key"] for image in result.manifest["images"]] == [f"{uploaded.output_prefix}image-{i}.jpg" for i in range(2)]
    ended = stack.jobs().get(uploaded.job_id)
    assert ended is not None and ended.state is JobState.COMPLETED
    # The same outputs the webhook would have written: seed, prompt and the input sent.
    assert result.manifest["input"]["prompt"] == "the webhook gets lost"


def test_recovery_records_a_failure_fal_reported_only_to_the_lost_webhook(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(lose_webhook=1, error_result=1)
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "fails quietly"}, key="inputs/recovery/failed.jpg")
    wait_for_fal(stack)
    report = recovery_with(stack, after=0, max_age=600).run(deadline=time.monotonic() + 30)
    assert report.failed >= 1
    result = cli.read_result(target, uploaded.job_id, uploaded.output_prefix)
    assert result is not None and result.error is not None and result.error["code"] == "fal_error"


def test_a_request_stuck_at_fal_past_the_max_age_is_cancelled_and_failed(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(queue_ms=20_000)
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "stuck in the queue"}, key="inputs/recovery/stuck.jpg")
    eventually(lambda: (job := stack.jobs().get(uploaded.job_id)) is not None and job.state is JobState.SUBMITTED, what="submit")
    recovery = recovery_with(stack, after=0, max_age=1)
    time.sleep(1.2)
    report = recovery.run(deadline=time.monotonic() + 30)
    assert report.failed >= 1
    result = cli.read_result(target, uploaded.job_id, uploaded.output_prefix)
    assert result is not None and result.error is not None and result.error["code"] == "timed_out"
    assert "cancelled" in result.error["message"]
    assert [r.cancelled for r in stack.emulator.requests.values()] == [True]


def s3_removal_event(bucket: str, key: str, event_name: str, version_id: str) -> str:
    """The ObjectRemoved notification S3 sends (moto sends none for a delete marker, and no versionId)."""
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-24T10:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.7"},
        "responseElements": {"x-amz-request-id": "0", "x-amz-id-2": "0"},
        "s3": {
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": key.replace(" ", "+"), "versionId": version_id, "sequencer": "00B"},
        },
    }
    return json.dumps({"Records": [record]})


@pytest.mark.parametrize("how", ["delete marker", "version deleted"])
def test_deleting_the_input_of_a_queued_job_cancels_it_at_fal(stack: LocalStack, tmp_path: Path, how: str) -> None:
    stack.emulator.set_faults(queue_ms=20_000)
    target = stack.target()
    key = f"inputs/recovery/deleted {how}.jpg"
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "never mind"}, key=key)
    eventually(lambda: (job := stack.jobs().get(uploaded.job_id)) is not None and job.state is JobState.SUBMITTED, what="submit")
    s3 = stack.client("s3")
    if how == "delete marker":
        marker = s3.delete_object(Bucket=target.bucket, Key=key)["VersionId"]
        body = s3_removal_event(target.bucket, key, "ObjectRemoved:DeleteMarkerCreated", marker)
    else:
        assert uploaded.version_id
        s3.delete_object(Bucket=target.bucket, Key=key, VersionId=uploaded.version_id)
        body = s3_removal_event(target.bucket, key, "ObjectRemoved:Delete", uploaded.version_id)
    stack.client("sqs").send_message(QueueUrl=stack.resources.queue_url, MessageBody=body)
    ended = eventually(lambda: (job := stack.jobs().get(uploaded.job_id)) is not None and job.state.ended and job, what="the cancellation")
    assert ended.state is JobState.FAILED and ended.error_code == "cancelled"
    assert [r.cancelled for r in stack.emulator.requests.values()] == [True]
    error = cli.read_result(target, uploaded.job_id, uploaded.output_prefix)
    assert error is not None and error.error is not None and "deleted" in error.error["message"]


def test_deleting_an_input_fal_already_started_lets_it_finish(stack: LocalStack, tmp_path: Path) -> None:
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "too late to cancel"}, key="inputs/recovery/late.jpg")
    assert cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None).succeeded
    marker = stack.client("s3").delete_object(Bucket=target.bucket, Key=uploaded.key)["VersionId"]
    stack.client("sqs").send_message(
        QueueUrl=stack.resources.queue_url,
        MessageBody=s3_removal_event(target.bucket, uploaded.key, "ObjectRemoved:DeleteMarkerCreated", marker),
    )
    time.sleep(2)
    job = stack.jobs().get(uploaded.job_id)
    assert job is not None and job.state is JobState.COMPLETED  # outputs of a finished job are kept


def test_an_uncertain_job_is_failed_with_its_reason_once_too_old(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(submit_delay_ms=25_000)  # fal takes the request, answers after our timeout
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "no answer"}, key="inputs/recovery/uncertain.jpg")
    eventually(
        lambda: (job := stack.jobs().get(uploaded.job_id)) is not None and job.state is JobState.UNCERTAIN, timeout=40, what="UNCERTAIN"
    )
    stack.emulator.set_faults(submit_delay_ms=0, lose_webhook=100)
    time.sleep(1.2)
    report = recovery_with(stack, after=0, max_age=1).run(deadline=time.monotonic() + 30)
    assert report.failed >= 1
    result = cli.read_result(target, uploaded.job_id, uploaded.output_prefix)
    assert result is not None and result.error is not None and result.error["code"] == "submit_uncertain"
    assert len(stack.emulator.submits()) == 1  # never resent
