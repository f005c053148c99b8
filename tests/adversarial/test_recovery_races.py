"""Recovery against a backlog, a job fal forgot, and the races between recovery, webhooks and cancellation."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from kontext_s3.fal_queue import Accepted, FalQueueClient
from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobState, JobStore, new_holder
from kontext_s3.output_store import OutputLayout
from kontext_s3_tools.local_stack import LambdaContext
from tests.adversarial.hostile import Reply, ScriptedHost
from tests.adversarial.test_webhook_attacks import _consistent, post
from tests.helpers import FAL_KEY, jpeg_bytes
from tests.world import World

pytestmark = pytest.mark.adversarial

ENDPOINT = "fal-ai/flux-pro/kontext/max"


def fal_request(world: World, image_url: str, headers: dict[str, str] | None = None) -> Accepted:
    fal = FalQueueClient(httpx.Client(), base_url=world.emulator.base_url, key=lambda: FAL_KEY)
    outcome = fal.submit(
        ENDPOINT,
        {"prompt": "x", "image_url": image_url, "num_images": 1},
        webhook_url="http://127.0.0.1:9/lost",
        deadline=time.monotonic() + 10,
        key=FAL_KEY,
        headers=headers,
    )
    assert isinstance(outcome, Accepted)
    return outcome


def job_for(
    world: World, accepted: Accepted, key: str, *, version: str | None = None, cancel_url: str | None = None, store: JobStore | None = None
) -> Job:
    """The job the submit function would have left for this fal request."""
    store = store or JobStore(world.aws.table())
    version = version or uuid.uuid4().hex
    job_id = derive_job_id(world.aws.resources.bucket, key, version)
    holder = new_holder()
    created = store.create(
        job_id=job_id,
        bucket=world.aws.resources.bucket,
        key=key,
        version_id=version,
        etag="e",
        sequencer=None,
        event_time=None,
        output_prefix=OutputLayout("inputs/", "outputs/").job_prefix(key, job_id),
        holder=holder,
        hold_ms=60_000,
    )
    assert created is not None
    store.begin_send(job_id, holder, input_json=json.dumps({"prompt": "x", "num_images": 1, "output_format": "jpeg"}))
    queued = accepted.request
    job = store.mark_submitted(
        job_id,
        holder,
        request_id=queued.request_id,
        gateway_request_id=None,
        status_url=queued.status_url,
        response_url=queued.response_url,
        cancel_url=cancel_url or queued.cancel_url,
    )
    assert job is not None
    return job


def run_recovery(module: Any) -> dict[str, Any]:
    result: dict[str, Any] = module.lambda_handler({"source": "aws.scheduler", "detail": {}}, LambdaContext("recover", 120))
    return result


def until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_job_fal_no_longer_knows_is_failed_with_a_record_past_its_max_age(world: World) -> None:
    recover = world.recover(RECOVERY_AFTER_SECONDS="0", JOB_MAX_AGE_SECONDS="4")
    accepted = fal_request(world, world.emulator.host_file("in.jpg", jpeg_bytes(), "image/jpeg"))
    job = job_for(world, accepted, "inputs/forgotten.jpg")
    world.emulator.requests.clear()  # fal answers 404 for it from now on
    assert run_recovery(recover)["failed"] == 0  # young: an error, retried by the next run
    time.sleep(max(0.0, (job.submitted_at_ms or 0) / 1000 + 4.2 - time.time()))
    assert run_recovery(recover)["failed"] == 1
    ended = JobStore(world.aws.table()).get(job.job_id)
    assert ended is not None and ended.state is JobState.FAILED and ended.error_code == "timed_out"
    assert "404" in world.aws.get_json(f"{job.output_prefix}error.json")["message"]
    assert JobStore(world.aws.table()).open_job_ids("SUBMITTED", checked_before_ms=int(time.time() * 1000) + 1000) == []


def test_recovery_reaches_finished_jobs_behind_a_backlog_of_long_running_ones(world: World) -> None:
    recover = world.recover(RECOVERY_AFTER_SECONDS="0", JOB_MAX_AGE_SECONDS="86400")
    image = world.emulator.host_file("in.jpg", jpeg_bytes(), "image/jpeg")
    world.emulator.set_faults(processing_ms=600_000)  # still running for the whole test
    running = [fal_request(world, image) for _ in range(250)]
    world.emulator.set_faults(processing_ms=0, lose_webhook=50)
    finished = [fal_request(world, image) for _ in range(50)]
    until(lambda: all(world.emulator.requests[f.request.request_id].status == "COMPLETED" for f in finished))
    # The long-running jobs are the oldest: a recovery that always takes the 200 oldest never sees the others.
    store = JobStore(world.aws.table())
    for index, accepted in enumerate(running):
        job_for(world, accepted, f"inputs/running/{index}.jpg", store=store)
    done = [job_for(world, accepted, f"inputs/finished/{index}.jpg", store=store) for index, accepted in enumerate(finished)]
    started = time.monotonic()
    first, second = run_recovery(recover), run_recovery(recover)
    assert time.monotonic() - started < 120
    assert first["checked"] <= 200 and second["checked"] <= 200
    assert first["completed"] + second["completed"] == 50
    assert all((j := store.get(d.job_id)) is not None and j.state is JobState.COMPLETED for d in done)


@pytest.mark.parametrize("trial", range(10))
def test_a_webhook_retry_landing_while_recovery_completes_the_job_announces_it_once(world: World, trial: int) -> None:
    recover = world.recover(RECOVERY_AFTER_SECONDS="0", JOB_MAX_AGE_SECONDS="86400")
    _, server = world.webhook()
    world.emulator.set_faults(lose_webhook=1)
    accepted = fal_request(world, world.emulator.host_file("in.jpg", jpeg_bytes(), "image/jpeg"))
    request = world.emulator.requests[accepted.request.request_id]
    until(lambda: request.status == "COMPLETED")
    job = job_for(world, accepted, f"inputs/race-{trial}.jpg")
    world.emulator.set_faults(file_delay_ms=150)
    document = {"request_id": request.request_id, "gateway_request_id": request.request_id, "status": "OK", "payload": request.result}
    answers: list[int] = []
    webhook = threading.Thread(target=lambda: answers.append(post(world, server.url, job, document).status_code))
    recovery = threading.Thread(target=lambda: run_recovery(recover))
    for thread in (recovery, webhook) if trial % 2 else (webhook, recovery):
        thread.start()
        time.sleep(0.02 * (trial % 3))
    webhook.join()
    recovery.join()
    if answers == [409]:  # fal retries until it hears a 2xx
        assert post(world, server.url, job, document).status_code == 200
    assert _consistent(world, job) is JobState.COMPLETED
    succeeded = [e for e in world.events() if e["detail"]["job_id"] == job.job_id]
    assert len(succeeded) == 1


@pytest.mark.parametrize("first", ["webhook", "cancel"])
def test_a_cancel_racing_a_success_leaves_one_outcome(world: World, first: str) -> None:
    cancels = ScriptedHost(lambda _: Reply(202, b'{"status": "CANCELLATION_REQUESTED"}', {"Content-Type": "application/json"}, delay=0.8))
    try:
        submit = world.submit()
        _, server = world.webhook()
        world.emulator.set_faults(lose_webhook=1)
        accepted = fal_request(world, world.emulator.host_file("in.jpg", jpeg_bytes(), "image/jpeg"))
        request = world.emulator.requests[accepted.request.request_id]
        until(lambda: request.status == "COMPLETED")
        key = f"inputs/cancel-{first}.jpg"
        job = job_for(world, accepted, key, version="v-cancel", cancel_url=f"{cancels.url}/cancel")
        document = {"request_id": request.request_id, "gateway_request_id": request.request_id, "status": "OK", "payload": request.result}
        removal = {
            "Records": [
                {
                    "eventSource": "aws:s3",
                    "eventName": "ObjectRemoved:Delete",
                    "eventTime": "2026-11-25T10:00:00.000Z",
                    "s3": {"bucket": {"name": world.aws.resources.bucket}, "object": {"key": key, "versionId": "v-cancel"}},
                }
            ]
        }
        message = {"MessageId": str(uuid.uuid4()), "ReceiptHandle": "r", "Body": json.dumps(removal), "Attributes": {}}
        world.emulator.set_faults(file_delay_ms=800)
        answers: list[int] = []
        webhook = threading.Thread(target=lambda: answers.append(post(world, server.url, job, document).status_code))
        cancel = threading.Thread(target=lambda: world.deliver(submit, message))
        store = JobStore(world.aws.table())
        for thread in (webhook, cancel) if first == "webhook" else (cancel, webhook):
            thread.start()
            if thread is not (cancel if first == "webhook" else webhook):
                until(lambda: (held := store.get(job.job_id)) is not None and held.holder is not None)  # the first one holds it
        webhook.join()
        cancel.join()
        if answers == [409]:
            assert post(world, server.url, job, document).status_code == 200  # fal's retry finds it ended
        state = _consistent(world, job)
        assert state is (JobState.COMPLETED if first == "webhook" else JobState.FAILED)
    finally:
        cancels.stop()
