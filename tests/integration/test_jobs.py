"""The jobs table's transitions against DynamoDB (moto over HTTP)."""

from __future__ import annotations

from typing import Any

import httpx
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ReadTimeoutError

from kontext_s3.dynamo import Table
from kontext_s3.jobs import Job, JobState, JobStore, now_ms
from tests.helpers import Aws


def answer_lost_once(aws: Aws) -> Table:
    """The jobs table over a client whose every write lands but loses its first answer, so the SDK sends it again.

    This is what botocore's retry does after a timeout or a reset connection: the write reaches DynamoDB, its answer
    never arrives, and the retry of a conditional write then fails the condition its own first attempt changed.
    """
    client = aws.client("dynamodb")
    answered: set[bytes] = set()

    def send_then_lose_the_answer(request: AWSRequest, **_: Any) -> None:
        raw = request.body or b""
        body, url = raw.encode() if isinstance(raw, str) else bytes(raw), str(request.url)
        if body in answered:
            return  # the retry: sent as usual
        answered.add(body)
        httpx.post(url, headers=dict(request.headers.items()), content=body).raise_for_status()
        raise ReadTimeoutError(endpoint_url=url)

    for operation in ("PutItem", "UpdateItem"):
        client.meta.events.register(f"before-send.dynamodb.{operation}", send_then_lose_the_answer)
    return Table(client, aws.resources.table)


HOLDER = "h" * 32


def new_job(store: JobStore, job_id: str = "a" * 32, hold_ms: int = 60_000, holder: str = HOLDER) -> Any:
    return store.create(
        job_id=job_id,
        bucket="b",
        key="inputs/k.jpg",
        version_id="v",
        etag="e",
        sequencer=None,
        event_time=None,
        output_prefix="outputs/k.jpg/x/",
        holder=holder,
        hold_ms=hold_ms,
    )


def submitted(store: JobStore, job_id: str = "a" * 32, request_id: str = "r1") -> Job:
    assert new_job(store, job_id) is not None
    store.begin_send(job_id, HOLDER, input_json="{}")
    job = store.mark_submitted(
        job_id, HOLDER, request_id=request_id, gateway_request_id=None, status_url="s", response_url="r", cancel_url="c"
    )
    assert job is not None
    return job


def test_only_one_create_wins(aws: Aws) -> None:
    store = JobStore(aws.table())
    assert new_job(store) is not None
    assert new_job(store) is None


def test_a_retried_create_whose_first_attempt_landed_is_still_ours(aws: Aws) -> None:
    store = JobStore(answer_lost_once(aws))
    job = new_job(store)
    assert job is not None and job.state is JobState.SUBMITTING
    assert new_job(JobStore(aws.table())) is None  # and it is still a duplicate for anyone else


def test_a_retried_transition_whose_first_attempt_landed_is_still_ours(aws: Aws) -> None:
    store = JobStore(answer_lost_once(aws))
    job = submitted(store)
    assert job.state is JobState.SUBMITTED
    claim = store.claim(job.job_id, "finisher", hold_ms=10_000)
    assert claim is not None
    done = store.complete(job.job_id, "finisher", output_keys=["o"], manifest_key="m", note="1 image", notify=False)
    assert done is not None and done.state is JobState.COMPLETED


def test_the_hold_decides_who_may_take_a_job_up_again(aws: Aws) -> None:
    store = JobStore(aws.table())
    job = new_job(store)
    assert job is not None and job.holder == HOLDER
    assert store.take_over(job.job_id, holder="other", hold_ms=1000) is None  # held
    store.release(job.job_id, HOLDER, reason="503")
    taken = store.take_over(job.job_id, holder="other", hold_ms=1000)
    assert taken is not None and taken.attempts == 2 and taken.holder == "other"
    assert store.take_over(job.job_id, holder="third", hold_ms=1000) is None


def test_a_lapsed_hold_before_sending_may_be_taken_over_but_never_after(aws: Aws) -> None:
    store = JobStore(aws.table())
    assert new_job(store, "b" * 32, hold_ms=-1) is not None  # its holder died before sending
    assert store.take_over("b" * 32, holder="other", hold_ms=1000) is not None
    assert new_job(store, "c" * 32, hold_ms=60_000) is not None
    store.begin_send("c" * 32, HOLDER, input_json="{}")
    store.release("c" * 32, HOLDER, reason="nope")  # release is not a way back from SENDING
    job = store.get("c" * 32)
    assert job is not None and job.state is JobState.SENDING
    assert store.begin_send("c" * 32, "other", input_json="{}") is None  # lost: not the holder


def test_a_holder_whose_hold_lapsed_may_not_send(aws: Aws) -> None:
    store = JobStore(aws.table())
    assert new_job(store, "d" * 32, hold_ms=-1) is not None  # still ours by name, but anyone may take it now
    assert store.begin_send("d" * 32, HOLDER, input_json="{}") is None
    job = store.get("d" * 32)
    assert job is not None and job.state is JobState.SUBMITTING and job.sent_at_ms is None


def test_only_a_definite_not_enqueued_answer_leads_back_from_sending(aws: Aws) -> None:
    store = JobStore(aws.table())
    assert new_job(store) is not None
    store.begin_send("a" * 32, HOLDER, input_json="{}")
    back = store.not_enqueued("a" * 32, HOLDER, reason="503 without x-fal-request-id")
    assert back is not None and back.state is JobState.SUBMITTING and back.holder is None


def test_endings_are_final_and_need_the_hold(aws: Aws) -> None:
    store = JobStore(aws.table())
    job = submitted(store)
    assert store.complete(job.job_id, "nobody", output_keys=["o"], manifest_key="m", note="", notify=False) is None  # not held
    assert store.claim(job.job_id, "f1", hold_ms=10_000) is not None
    assert store.claim(job.job_id, "f2", hold_ms=10_000) is None  # one finisher at a time
    assert store.complete(job.job_id, "f1", output_keys=["o"], manifest_key="m", note="", notify=False) is not None
    assert store.claim(job.job_id, "f2", hold_ms=10_000) is None
    assert store.fail(job.job_id, "f1", code="x", message="y", error_key="e") is None
    ended = store.get(job.job_id)
    assert ended is not None and ended.state is JobState.COMPLETED


def test_a_lapsed_finisher_claim_is_taken_over_and_says_so(aws: Aws) -> None:
    store = JobStore(aws.table())
    job = submitted(store)
    assert store.claim(job.job_id, "dead", hold_ms=-1) is not None
    claim = store.claim(job.job_id, "alive", hold_ms=10_000)
    assert claim is not None and claim.took_over
    assert store.complete(job.job_id, "dead", output_keys=[], manifest_key="m", note="", notify=False) is None


def test_only_one_caller_wins_the_notification_and_the_one_that_ended_the_job_holds_it_first(aws: Aws) -> None:
    store = JobStore(aws.table())
    job = submitted(store)
    store.claim(job.job_id, "f", hold_ms=10_000)
    store.complete(job.job_id, "f", output_keys=[], manifest_key="m", note="", notify=True)
    assert store.claim_notification(job.job_id) is False  # the finisher that ended it publishes it
    # It died before publishing: once its right lapses, one other caller (recovery) wins it.
    aws.table().update_item(
        Key={"job_id": job.job_id}, UpdateExpression="SET notify_until_ms = :past", ExpressionAttributeValues={":past": 1}
    )
    assert store.claim_notification(job.job_id) is True
    assert store.claim_notification(job.job_id) is False
    store.mark_notified(job.job_id)
    assert store.claim_notification(job.job_id, hold_ms=-1) is False


def test_open_jobs_are_listed_least_recently_checked_first_and_leave_the_index_when_they_end(aws: Aws) -> None:
    store = JobStore(aws.table())
    ids = [f"{i:04x}" + "0" * 28 for i in range(5)]  # spread over shards
    for job_id in ids:
        submitted(store, job_id, request_id=job_id)
    assert store.open_job_ids("SUBMITTED", checked_before_ms=now_ms() + 1) == ids
    assert store.open_job_ids("SUBMITTED", checked_before_ms=now_ms() - 60_000) == []
    first = store.get(ids[0])
    assert first is not None
    store.touch(first)  # checked now: it goes to the back
    assert store.open_job_ids("SUBMITTED", checked_before_ms=now_ms() + 1) == [*ids[1:], ids[0]]
    store.claim(ids[1], "f", hold_ms=10_000)
    store.complete(ids[1], "f", output_keys=[], manifest_key="m", note="", notify=False)
    assert ids[1] not in store.open_job_ids("SUBMITTED", checked_before_ms=now_ms() + 1)
    assert store.open_job_ids("NOTIFY", checked_before_ms=now_ms() + 1) == []


def test_a_late_webhook_of_a_request_put_back_in_line_is_never_adopted_by_the_jobs_next_request(aws: Aws) -> None:
    # Found by a hostile review: r1 never started, so the job went back in line and was sent again (r2, whose answer
    # was lost: UNCERTAIN, no request id). r1's late webhook would have made r1 the job's request, and "r1 never
    # started" would have put it back in line a third time while r2 may be running at fal.
    store = JobStore(aws.table())
    job = submitted(store, request_id="r1")
    claim = store.claim(job.job_id, "finisher", hold_ms=10_000)
    assert claim is not None
    back = store.requeue(claim.job, "finisher", reason="request_timeout")
    assert back is not None and back.state is JobState.WAITING and back.past_request_ids == ["r1"]
    assert store.take_waiting(job.job_id, holder="dispatcher", hold_ms=10_000) is not None
    assert store.begin_send(job.job_id, "dispatcher", input_json="{}") is not None
    assert store.mark_uncertain(job.job_id, holder="dispatcher", reason="no answer from fal") is not None
    assert store.adopt_request(job.job_id, "r1") is None  # r1's late webhook: not this job's any more
    adopted = store.adopt_request(job.job_id, "r2")
    assert adopted is not None and adopted.state is JobState.SUBMITTED and adopted.request_id == "r2"
