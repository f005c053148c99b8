"""Admission: slots taken once and given back once on every path that ends a job; a daily budget; nothing failed for waiting."""

from __future__ import annotations

import json
import threading
import time
import uuid
from types import ModuleType
from typing import Any

import pytest

from kontext_s3.admission import Admission, Admitted, Wait, is_dispatch, slot_member
from kontext_s3.jobs import Job, JobState, JobStore, new_holder
from kontext_s3_tools.local_stack import LambdaContext, SqsPoller, sqs_event
from tests.helpers import Aws, dispatch_signal, jpeg_bytes
from tests.helpers import eventually as until
from tests.world import World, world

__all__ = ["world"]

DAY = 24 * 3600


def slots(world: World, count: int = 1) -> set[str]:
    return Admission(world.aws.table(), max_jobs_at_fal=count, daily_image_budget=0).holders()


def dispatch_messages(world: World) -> int:
    """Dispatch signals now in the uploads queue (taken off it)."""
    found = 0
    for message in world.aws.receive(wait=1):
        if is_dispatch(message["Body"]):
            found += 1
            world.aws.sqs.delete_message(QueueUrl=world.aws.resources.queue_url, ReceiptHandle=message["ReceiptHandle"])
        else:
            world.aws.sqs.change_message_visibility(
                QueueUrl=world.aws.resources.queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
            )
    return found


# -- the store of slots and budget ---------------------------------------------------------------


def test_two_takers_never_both_take_the_last_slot(aws: Aws) -> None:
    admission = Admission(aws.table(), max_jobs_at_fal=1, daily_image_budget=0)
    decisions: list[Admitted | Wait] = []
    threads = [threading.Thread(target=lambda i=i: decisions.append(admission.admit(f"{i:032x}", 1, taker="t"))) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(d, Admitted) for d in decisions) == 1
    assert len(admission.holders()) == 1


class CountedTable:
    """The jobs table, counting the writes and reads admission makes (what they cost is the point)."""

    def __init__(self, table: Any) -> None:
        self._table = table
        self.writes = self.refused = self.reads = 0

    def update_item(self, **kwargs: Any) -> Any:
        self.writes += 1
        try:
            return self._table.update_item(**kwargs)
        except Exception:
            self.refused += 1
            raise

    def get_item(self, **kwargs: Any) -> Any:
        self.reads += 1
        return self._table.get_item(**kwargs)


def test_a_slot_costs_one_write_to_take_and_a_full_house_one_refused_write_and_no_read(aws: Aws) -> None:
    counted = CountedTable(aws.table())
    admission = Admission(counted, max_jobs_at_fal=2, daily_image_budget=0)
    first = admission.admit("a" * 32, 1, taker="h1")
    assert isinstance(first, Admitted)
    assert isinstance(admission.admit("b" * 32, 1, taker="h1"), Admitted)
    assert (counted.writes, counted.refused, counted.reads) == (2, 0, 0)
    assert isinstance(admission.admit("c" * 32, 1, taker="h1"), Wait)
    assert (counted.writes, counted.refused, counted.reads) == (3, 1, 0)
    # The SDK's retry of a take (the same taker) is granted in a full house, and holds still one slot.
    assert isinstance(admission.admit("a" * 32, 1, taker="h1"), Admitted)
    assert admission.holders() == {slot_member("a" * 32, "h1"), slot_member("b" * 32, "h1")}
    # Another take of the same job (a delivery that took it up after the first taker's hold lapsed) is a new take:
    # it waits, and the first taker's release frees its own take only.
    assert isinstance(admission.admit("a" * 32, 1, taker="h2"), Wait)
    assert admission.release(first.slot) is True
    later = admission.admit("a" * 32, 1, taker="h2")
    assert isinstance(later, Admitted) and later.slot != first.slot
    assert admission.release(first.slot) is False  # the late first taker frees nothing of the second's


def test_a_slot_is_given_back_once_and_then_taken_by_the_next(aws: Aws) -> None:
    admission = Admission(aws.table(), max_jobs_at_fal=1, daily_image_budget=0)
    first = admission.admit("a" * 32, 1, taker="t")
    assert isinstance(first, Admitted) and first.slot == slot_member("a" * 32, "t")
    assert isinstance(admission.admit("b" * 32, 1, taker="t"), Wait)
    assert admission.release(slot_member("b" * 32, "t")) is False  # not a holder
    assert admission.release(first.slot) is True
    assert admission.release(first.slot) is False  # at most once
    assert isinstance(admission.admit("b" * 32, 1, taker="t"), Admitted)


def test_the_budget_counts_images_refuses_past_it_and_starts_again_the_next_utc_day(aws: Aws) -> None:
    now = [1_795_600_000.0]
    admission = Admission(aws.table(), max_jobs_at_fal=0, daily_image_budget=5, clock=lambda: now[0])
    assert isinstance(admission.admit("a" * 32, 2, taker="t"), Admitted)
    assert isinstance(admission.admit("b" * 32, 3, taker="t"), Admitted)
    refused = admission.admit("c" * 32, 1, taker="t")
    assert isinstance(refused, Wait) and refused.reason == "budget"
    assert refused.until_ms == admission.next_day_ms() and "resets at" in refused.sentence()
    admission.refund(admission.today(), 3)  # fal never ran one of them
    assert isinstance(admission.admit("c" * 32, 1, taker="t"), Admitted)
    assert admission.used_today() == 3
    now[0] += DAY
    assert admission.used_today() == 0 and isinstance(admission.admit("d" * 32, 4, taker="t"), Admitted)


# -- every path that ends a job gives its slot back, once -------------------------------------------------


def submitted_with_slot(world: World, submit: ModuleType, key: str, **faults: int) -> Job:
    # Still at fal when the slot is looked at, on a loaded 2-core CI too (1 s was not always enough there).
    world.emulator.set_faults(**{"processing_ms": 4000, **faults})
    version = world.upload(key)
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job(key, version)
    assert job.slot is not None, job.state
    assert slots(world) == {job.slot}
    return job


def freed_once(world: World, job: Job) -> None:
    until(lambda: slots(world) == set(), what="the slot to be given back")
    assert dispatch_messages(world) == 1  # the line was told once
    assert Admission(world.aws.table(), max_jobs_at_fal=1, daily_image_budget=0).release(job.slot) is False


@pytest.fixture
def limited(world: World) -> tuple[World, ModuleType, str]:
    _, server = world.webhook(MAX_JOBS_AT_FAL="1", FAL_USER_ID=world.emulator.user_id)
    submit = world.submit(webhook_url=server.url, MAX_JOBS_AT_FAL="1")
    return world, submit, server.url


def test_the_slot_comes_back_when_the_webhook_delivers_the_outputs(limited: tuple[World, ModuleType, str]) -> None:
    world, submit, _ = limited
    job = submitted_with_slot(world, submit, "inputs/ok.jpg")
    until(lambda: world.job("inputs/ok.jpg", job.version_id or "").state is JobState.COMPLETED)
    freed_once(world, job)


def test_the_slot_comes_back_when_the_webhook_reports_an_error(limited: tuple[World, ModuleType, str]) -> None:
    world, submit, _ = limited
    job = submitted_with_slot(world, submit, "inputs/error.jpg", error_result=1)
    until(lambda: world.job("inputs/error.jpg", job.version_id or "").state is JobState.FAILED)
    freed_once(world, job)


def test_the_slot_comes_back_when_recovery_finds_the_job_ended(limited: tuple[World, ModuleType, str]) -> None:
    world, submit, _ = limited
    job = submitted_with_slot(world, submit, "inputs/lost.jpg", lose_webhook=1)
    until(lambda: world.emulator.requests[str(job.request_id)].status == "COMPLETED")
    recover = world.recover(MAX_JOBS_AT_FAL="1", RECOVERY_AFTER_SECONDS="0")
    recover.lambda_handler({}, LambdaContext("recover", 60))
    assert world.job("inputs/lost.jpg", job.version_id or "").state is JobState.COMPLETED
    freed_once(world, job)


def test_the_slot_comes_back_when_recovery_ends_a_job_past_its_max_age(limited: tuple[World, ModuleType, str]) -> None:
    world, submit, _ = limited
    job = submitted_with_slot(world, submit, "inputs/old.jpg", queue_ms=30_000)
    time.sleep(1.2)
    recover = world.recover(MAX_JOBS_AT_FAL="1", RECOVERY_AFTER_SECONDS="0", JOB_MAX_AGE_SECONDS="1")
    recover.lambda_handler({}, LambdaContext("recover", 60))
    assert world.job("inputs/old.jpg", job.version_id or "").error_code == "timed_out"
    freed_once(world, job)


def test_the_slot_comes_back_when_fal_refuses_the_submit(world: World) -> None:
    submit = world.submit(MAX_JOBS_AT_FAL="1", FAL_ENDPOINT="fal-ai/flux-pro/kontext/max/unknown")
    version = world.upload("inputs/refused.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job("inputs/refused.jpg", version)
    assert job.state is JobState.FAILED and job.error_code == "fal_rejected"
    freed_once(world, job)


def test_an_uncertain_submit_keeps_its_slot_until_it_is_resolved(limited: tuple[World, ModuleType, str]) -> None:
    world, _, webhook_url = limited
    submit = world.submit(webhook_url=webhook_url, MAX_JOBS_AT_FAL="1", FAL_TIMEOUT_SECONDS="0.5")
    world.emulator.set_faults(submit_delay_ms=1500)  # fal takes it, but answers after our timeout
    version = world.upload("inputs/uncertain.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job("inputs/uncertain.jpg", version)
    assert job.state is JobState.UNCERTAIN and slots(world) == {job.slot}  # fal may hold it: the slot is held
    until(lambda: world.job("inputs/uncertain.jpg", version).state is JobState.COMPLETED, what="its webhook")
    freed_once(world, job)


def test_a_request_fal_could_not_start_in_time_goes_back_in_line_and_is_sent_again_with_a_fresh_url(world: World) -> None:
    world.emulator.queue.set_concurrency(1)
    try:
        _, server = world.webhook(MAX_JOBS_AT_FAL="2")
        # A 60 s URL gives fal 30 s to start the request.
        submit = world.submit(webhook_url=server.url, MAX_JOBS_AT_FAL="2", PRESIGN_EXPIRY_SECONDS="60")
        world.emulator.set_faults(processing_ms=35_000)
        blocker = world.upload("inputs/slow.jpg")
        assert world.deliver(submit, world.upload_event()) == []
        world.emulator.set_faults(processing_ms=0)
        starved = world.upload("inputs/starved.jpg")
        assert world.deliver(submit, world.upload_event()) == []
        first = world.job("inputs/starved.jpg", starved)
        first_url = world.emulator.submits()[-1]["body"]["image_url"]
        assert world.emulator.submits()[-1]["headers"]["X-Fal-Request-Timeout"] == "30"
        back = until(
            lambda: (j := world.job("inputs/starved.jpg", starved)).state is JobState.WAITING and j, timeout=45, what="it back in line"
        )
        assert back.request_id is None and back.slot is None and back.attempts == first.attempts  # not failed, not retried as a fault
        assert world.emulator.requests[str(first.request_id)].started_at is None  # it never ran
        assert dispatch_messages(world) >= 1
        # Its turn again: a new request, with a new URL.
        assert submit.lambda_handler(dispatch_event(world), LambdaContext("submit", 60)) == {"batchItemFailures": []}
        again = world.job("inputs/starved.jpg", starved)
        assert again.state in (JobState.SUBMITTED, JobState.COMPLETED) and again.request_id != first.request_id
        assert world.emulator.submits()[-1]["body"]["image_url"] != first_url
        assert world.job("inputs/slow.jpg", blocker).state is not JobState.FAILED
    finally:
        world.emulator.queue.set_concurrency(None)


def dispatch_event(world: World) -> dict[str, Any]:
    return sqs_event([{**dispatch_signal(), "MessageId": str(uuid.uuid4())}], world.aws.resources.queue_arn)


# -- races and leaks -------------------------------------------------------------------------------------


def test_two_submit_functions_racing_for_the_last_slot_send_one_and_line_up_the_other(world: World) -> None:
    first, second = world.submit(MAX_JOBS_AT_FAL="1"), world.submit(MAX_JOBS_AT_FAL="1")
    world.emulator.set_faults(queue_ms=30_000, submit_delay_ms=200)
    versions = [world.upload("inputs/race-a.jpg"), world.upload("inputs/race-b.jpg")]
    messages = world.aws.upload_events(2)
    threads = [
        threading.Thread(target=world.deliver, args=(module, message)) for module, message in zip((first, second), messages, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    states = sorted(
        world.job(key, version).state.value for key, version in zip(("inputs/race-a.jpg", "inputs/race-b.jpg"), versions, strict=True)
    )
    assert states == ["SUBMITTED", "WAITING"]
    assert world.posts() == 1 and len(slots(world)) == 1


def test_a_slot_leaked_by_a_crash_is_found_and_given_back_by_recovery(world: World) -> None:
    store = JobStore(world.aws.table())
    job_id = uuid.uuid4().hex
    # A submit function took a slot for this job, then died before sending it: its hold lapses.
    store.create(
        job_id=job_id, bucket=world.aws.resources.bucket, key="inputs/crash.jpg", version_id="v", etag=None, sequencer=None,
        event_time=None, output_prefix="outputs/crash.jpg/x/", holder=(holder := new_holder()), hold_ms=-1,
    )  # fmt: skip
    assert isinstance(Admission(world.aws.table(), max_jobs_at_fal=1, daily_image_budget=0).admit(job_id, 1, taker=holder), Admitted)
    recover = world.recover(MAX_JOBS_AT_FAL="1")
    report = recover.lambda_handler({}, LambdaContext("recover", 60))
    assert report["slots_reclaimed"] == 1 and slots(world) == set()


def test_a_taker_whose_hold_lapsed_after_recovery_handed_its_slot_on_sends_nothing(world: World) -> None:
    # The clean-clone `make load` found 5 open at fal with MaxJobsAtFal 4: a submit function slow past its hold
    # still sent after recovery had freed its slot and a second upload had taken it.
    store = JobStore(world.aws.table())
    admission = Admission(world.aws.table(), max_jobs_at_fal=1, daily_image_budget=0)
    slow, holder = uuid.uuid4().hex, new_holder()
    store.create(
        job_id=slow, bucket=world.aws.resources.bucket, key="inputs/slow.jpg", version_id="v", etag=None, sequencer=None,
        event_time=None, output_prefix="outputs/slow.jpg/x/", holder=holder, hold_ms=300,
    )  # fmt: skip
    taken = admission.admit(slow, 1, taker=holder)
    assert isinstance(taken, Admitted)
    time.sleep(0.4)  # the taker stalls past its hold
    report = world.recover(MAX_JOBS_AT_FAL="1").lambda_handler({}, LambdaContext("recover", 60))
    assert report["slots_reclaimed"] == 1
    assert isinstance(admission.admit("f" * 32, 1, taker="t"), Admitted)  # the next upload takes the freed slot
    assert store.begin_send(slow, holder, input_json="{}", slot=taken.slot) is None  # lost: nothing may be sent
    assert slots(world) == {slot_member("f" * 32, "t")}
    job = store.get(slow)
    assert job is not None and job.state is JobState.SUBMITTING and job.sent_at_ms is None


def test_waiting_uploads_do_not_count_towards_the_dlq(world: World) -> None:
    submit = world.submit(MAX_JOBS_AT_FAL="1")
    world.emulator.set_faults(queue_ms=60_000)
    world.upload("inputs/holds-the-slot.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    version = world.upload("inputs/waits.jpg")
    message = world.upload_event()
    for receive_count in range(1, 4):  # redelivered (an at-least-once duplicate), it stays waiting
        assert world.deliver(submit, message, receive_count) == []
    job = world.job("inputs/waits.jpg", version)
    assert job.state is JobState.WAITING and job.attempts == 1
    assert world.aws.receive(world.aws.resources.dlq_url, wait=0) == []


# -- the daily budget ---------------------------------------------------------------------------------------


def test_a_day_of_80_uploads_with_a_budget_of_50_images_runs_50_and_the_rest_the_next_day(world: World) -> None:
    _, server = world.webhook(MAX_JOBS_AT_FAL="0", DAILY_IMAGE_BUDGET="50")
    submit = world.submit(webhook_url=server.url, MAX_JOBS_AT_FAL="0", DAILY_IMAGE_BUDGET="50")
    today = [1_795_600_000.0]
    assert submit.finisher.admission is not None
    submit.finisher.admission._clock = lambda: today[0]  # the injected clock (the one Admission the handler shares)
    keys = [f"inputs/day/{i:02d}.jpg" for i in range(80)]
    for key in keys:
        world.aws.s3.put_object(Bucket=world.aws.resources.bucket, Key=key, Body=jpeg_bytes(), Tagging="prompt=a%20day")
    poller = SqsPoller(
        submit.lambda_handler, endpoint=world.aws.endpoint, queue_url=world.aws.resources.queue_url, queue_arn=world.aws.resources.queue_arn
    )
    until(lambda: poller.poll_once(wait_seconds=1) == 0 and len(world.jobs_states()) == 80, timeout=120, what="every upload handled")
    until(lambda: world.jobs_states().count("COMPLETED") == 50, timeout=60, what="50 edits")
    states = world.jobs_states()
    assert states.count("WAITING") == 30 and "FAILED" not in states
    assert world.posts() == 50
    today[0] += 86_400  # the UTC day turns; recovery kicks the line
    for _ in range(2):
        submit.lambda_handler(dispatch_event(world), LambdaContext("submit", 60))
    until(lambda: world.jobs_states().count("COMPLETED") == 80, timeout=90, what="the other 30")
    assert world.posts() == 80


def test_a_dispatch_that_fills_the_freed_slot_leaves_the_rest_of_the_line_untouched(world: World) -> None:
    submit = world.submit(MAX_JOBS_AT_FAL="1")
    world.emulator.set_faults(queue_ms=60_000)
    first = world.upload("inputs/line/first.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    waiting = {}
    for name in ("second", "third"):
        version = world.upload(f"inputs/line/{name}.jpg")
        assert world.deliver(submit, world.upload_event()) == []
        waiting[name] = world.job(f"inputs/line/{name}.jpg", version)
        assert waiting[name].state is JobState.WAITING
    # The first job's end frees its slot and signals the line (as its webhook does).
    assert Admission(world.aws.table(), max_jobs_at_fal=1, daily_image_budget=0).release(world.job("inputs/line/first.jpg", first).slot)
    world.deliver(submit, dispatch_signal())
    assert JobStore(world.aws.table()).get(waiting["second"].job_id).state is JobState.SUBMITTED  # type: ignore[union-attr]
    third = JobStore(world.aws.table()).get(waiting["third"].job_id)
    assert third is not None and third.state is JobState.WAITING
    # Not taken from its place only to be put back: no writes, no second look at its input, for a slot that is not there.
    assert third.history == waiting["third"].history and third.attempts == waiting["third"].attempts


def test_a_late_taker_frees_its_own_take_and_never_the_slot_of_the_delivery_that_took_the_job_up(aws: Aws) -> None:
    # A hostile review found this with slots held by job id alone: the first taker stalls past its hold, a redelivery
    # takes the job up, and the first taker's give-back freed the redelivery's slot: two at fal with MaxJobsAtFal 1.
    store = JobStore(aws.table())
    admission = Admission(aws.table(), max_jobs_at_fal=1, daily_image_budget=0)
    job_id, first = uuid.uuid4().hex, new_holder()
    store.create(
        job_id=job_id, bucket="b", key="inputs/j.jpg", version_id="v", etag=None, sequencer=None, event_time=None,
        output_prefix="outputs/j.jpg/x/", holder=first, hold_ms=300,
    )  # fmt: skip
    taken = admission.admit(job_id, 1, taker=first)
    assert isinstance(taken, Admitted)
    time.sleep(0.4)  # the first taker stalls past its hold
    second = new_holder()
    assert store.take_over(job_id, holder=second, hold_ms=60_000) is not None
    assert isinstance(admission.admit(job_id, 1, taker=second), Wait)  # the first take still counts
    assert store.begin_send(job_id, first, input_json="{}", slot=taken.slot) is None  # the late taker lost the job
    assert admission.release(taken.slot) is True  # and gives back its own take (as sending does)
    again = admission.admit(job_id, 1, taker=second)
    assert isinstance(again, Admitted)
    sent = store.begin_send(job_id, second, input_json="{}", slot=again.slot)
    assert sent is not None and sent.state is JobState.SENDING
    assert admission.release(taken.slot) is False  # a second give-back of the late take frees nothing
    assert isinstance(admission.admit(uuid.uuid4().hex, 1, taker=new_holder()), Wait)  # the house is full: one at fal


def test_dispatchers_racing_for_one_line_fill_every_freed_slot(world: World) -> None:
    # A dispatcher that loses a waiting upload to another stops; the winner goes on while slots are free.
    first, second = world.submit(MAX_JOBS_AT_FAL="2"), world.submit(MAX_JOBS_AT_FAL="2")
    world.emulator.set_faults(queue_ms=60_000)
    at_fal = []
    for key in ("inputs/race/a.jpg", "inputs/race/b.jpg"):
        at_fal.append((key, world.upload(key)))
        assert world.deliver(first, world.upload_event()) == []
    line = []
    for name in ("c", "d", "e"):
        version = world.upload(f"inputs/race/{name}.jpg")
        assert world.deliver(first, world.upload_event()) == []
        line.append(world.job(f"inputs/race/{name}.jpg", version))
    assert [job.state for job in line] == [JobState.WAITING] * 3 and world.posts() == 2
    admission = Admission(world.aws.table(), max_jobs_at_fal=2, daily_image_budget=0)
    for key, version in at_fal:  # both end at once, and each signals the line
        assert admission.release(world.job(key, version).slot)
    signal = dispatch_signal()
    threads = [threading.Thread(target=world.deliver, args=(module, signal)) for module in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = JobStore(world.aws.table())
    states = [store.get(job.job_id).state for job in line]  # type: ignore[union-attr]
    assert states == [JobState.SUBMITTED, JobState.SUBMITTED, JobState.WAITING]  # in arrival order
    assert world.posts() == 4 and len(admission.holders()) == 2


def test_a_dispatcher_that_meets_an_upload_ended_as_it_took_it_goes_on_to_the_next(world: World) -> None:
    # Stopping on a lost upload is for one another dispatcher took: it goes on down the line. An upload that ended
    # instead (cancelled as the dispatcher reached it) leaves nobody to go on, so the dispatcher does.
    submit = world.submit(MAX_JOBS_AT_FAL="1")
    world.emulator.set_faults(queue_ms=60_000)
    first = world.upload("inputs/gone/first.jpg")
    assert world.deliver(submit, world.upload_event()) == []
    line = []
    for name in ("cancelled", "next"):
        version = world.upload(f"inputs/gone/{name}.jpg")
        assert world.deliver(submit, world.upload_event()) == []
        line.append(world.job(f"inputs/gone/{name}.jpg", version))
    cancelled, after = line

    def ended_just_before_its_take(call: Any) -> None:
        body = json.loads(call.body or b"{}") if call.service == "dynamodb" else {}
        if call.action == "UpdateItem" and body.get("Key", {}).get("job_id", {}).get("S") == cancelled.job_id and not ended:
            ended.append(True)
            store, holder = JobStore(world.aws.table()), new_holder()
            assert store.take_waiting(cancelled.job_id, holder=holder, hold_ms=60_000) is not None
            assert store.fail(cancelled.job_id, holder, code="cancelled", message="deleted", error_key="e", notify=False)

    ended: list[bool] = []
    world.gateway.add_fault(ended_just_before_its_take)
    assert Admission(world.aws.table(), max_jobs_at_fal=1, daily_image_budget=0).release(world.job("inputs/gone/first.jpg", first).slot)
    world.deliver(submit, dispatch_signal())
    assert ended, "the dispatcher never reached the upload"
    sent = JobStore(world.aws.table()).get(after.job_id)
    assert sent is not None and sent.state is JobState.SUBMITTED and world.posts() == 2
