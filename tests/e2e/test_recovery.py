"""Lost webhooks, stuck jobs and deleted inputs, through the local stack."""

from __future__ import annotations

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
