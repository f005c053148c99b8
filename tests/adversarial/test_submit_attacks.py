"""The submit path attacked: fal answers that lie or half-answer, AWS failing at the worst moment, hostile tags and events.

Every case counts the POSTs fal received for the upload across every delivery
SQS would make and a DLQ redrive: a POST that may have been enqueued is paid.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
import zlib
from typing import Any

import pytest

from kontext_s3.jobs import JobState
from kontext_s3.model_schema import MAX_PROMPT_CHARS
from kontext_s3.tag_codec import PIECE_CHARS, encode_tags
from kontext_s3_tools.aws_gateway import Call, dynamodb_error
from tests.adversarial.hostile import Reply, ScriptedHost, Seen
from tests.world import World, our_log_lines

pytestmark = pytest.mark.adversarial


def packed(document: str, codec: int = 1) -> dict[str, str]:
    """kx tags carrying ``document`` as the codec ships it (1 = raw DEFLATE), whatever the document is."""
    if codec == 1:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        blob = bytes([1]) + deflater.compress(document.encode("utf-8", "surrogatepass")) + deflater.flush()
    else:
        blob = bytes([0]) + document.encode("utf-8", "surrogatepass")
    chars = base64.urlsafe_b64encode(blob).rstrip(b"=").decode()
    tags = {}
    for index, start in enumerate(range(0, len(chars), PIECE_CHARS)):
        piece = chars[start : start + PIECE_CHARS]
        tags[f"kx{index}.{piece[:124]}"] = piece[124:]
    assert len(tags) <= 10
    return tags


def only_one_paid_post(world: World, key: str, version: str) -> None:
    assert world.posts() == 1, f"fal received {world.posts()} POSTs for one upload"
    assert len(world.emulator.requests) == 1


# -- paying twice --------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["submit_garbage_2xx", "submit_500_enqueued"])
def test_an_answer_that_proves_nothing_or_names_a_request_is_never_resent(world: World, fault: str, caplog: Any) -> None:
    world.emulator.set_faults(**{fault: 100})
    submit = world.submit()
    version = world.upload("inputs/lie.jpg")
    message = world.upload_event()
    assert world.deliver_until_dead(submit, message) == 0  # acknowledged: the job is recorded, not retried
    only_one_paid_post(world, "inputs/lie.jpg", version)
    job = world.job("inputs/lie.jpg", version)
    assert job.state is JobState.UNCERTAIN
    [held] = world.emulator.requests
    assert job.request_id == held  # the id fal named is kept, so the job can still be found at fal
    assert job.status_url and job.status_url.endswith(f"/requests/{held}/status")
    assert any("never resent" in r.getMessage() for r in our_log_lines(caplog, level=logging.ERROR))


@pytest.mark.parametrize(
    "failure",
    [
        dynamodb_error(
            "ProvisionedThroughputExceededException", "The level of configured provisioned throughput for the table was exceeded"
        ),
        dynamodb_error("ValidationException", "Item size has exceeded the maximum allowed size"),
    ],
    ids=["throttled", "item too large"],
)
def test_a_jobs_table_failure_while_recording_the_accepted_submit_keeps_the_request_id_and_pays_once(
    world: World, failure: Any, caplog: Any
) -> None:
    def recording_the_submit(call: Call) -> Any:
        body = call.body.decode("utf-8", "replace")
        if call.action == "UpdateItem" and '"SUBMITTED"' in body and "request_id = " in body:  # fal's answer being recorded
            return failure
        return None

    world.gateway.add_fault(recording_the_submit)
    submit = world.submit(AWS_MAX_ATTEMPTS="2")
    version = world.upload("inputs/throttled.jpg")
    message = world.upload_event()
    assert world.deliver_until_dead(submit, message) == 0
    only_one_paid_post(world, "inputs/throttled.jpg", version)
    job = world.job("inputs/throttled.jpg", version)
    assert job.state is JobState.UNCERTAIN
    assert job.request_id in world.emulator.requests  # the first request id is not lost


def test_when_no_write_lands_after_sending_the_job_stays_sending_until_recovery_makes_it_uncertain(world: World) -> None:
    world.gateway.add_fault(
        lambda call: (
            dynamodb_error("ProvisionedThroughputExceededException", "throttled")
            if call.action == "UpdateItem" and any(s in call.body for s in (b'"SUBMITTED"', b'"UNCERTAIN"'))
            else None
        )
    )
    submit = world.submit(FAL_TIMEOUT_SECONDS="1", AWS_MAX_ATTEMPTS="2")
    version = world.upload("inputs/table-down.jpg")
    message = world.upload_event()
    world.deliver(submit, message, timeout=6.0)  # the hold lapses 4 + 10 s after sending
    job = world.job("inputs/table-down.jpg", version)
    assert job.state is JobState.SENDING and world.posts() == 1
    assert world.deliver_until_dead(submit, message, timeout=6.0) == 0  # held: a duplicate
    world.gateway.clear_faults()
    time.sleep(max(0.0, (job.held_until_ms or 0) / 1000 - time.time()) + 0.5)
    assert world.deliver_until_dead(submit, message, timeout=6.0) == 0  # lapsed while SENDING: UNCERTAIN, never resent
    assert world.job("inputs/table-down.jpg", version).state is JobState.UNCERTAIN
    assert world.posts() == 1


def test_packed_tags_that_inflate_without_bound_are_an_invalid_tag_and_nothing_is_sent(world: World) -> None:
    bomb = json.dumps({"prompt": "A" * 2_800_000})  # 2.8 MB of prompt in under 4 kB of tags
    tags = packed(bomb)
    assert sum(len(k) + len(v) for k, v in tags.items()) < 4000
    submit = world.submit()
    version = world.upload("inputs/bomb.jpg", tags=tags)
    started = time.monotonic()
    assert world.deliver_until_dead(submit, world.upload_event()) == 0
    assert time.monotonic() - started < 10
    assert world.posts() == 0
    job = world.job("inputs/bomb.jpg", version)
    assert job.state is JobState.FAILED and job.error_code == "invalid_tags"
    assert "inflates to more than" in world.error_record(job)["message"]


def test_a_prompt_over_the_documented_maximum_is_refused_and_the_longest_allowed_pays_once_in_a_small_record(world: World) -> None:
    submit = world.submit()
    too_long = world.upload("inputs/too-long.jpg", tags=packed(json.dumps({"prompt": "Make it purple, please. " * 200})))
    assert world.deliver_until_dead(submit, world.upload_event()) == 0
    refused = world.job("inputs/too-long.jpg", too_long)
    assert refused.error_code == "invalid_tags"
    assert f"at most {MAX_PROMPT_CHARS} characters" in json.dumps(world.error_record(refused))
    assert world.posts() == 0

    prompt = ("Replace the sky with a storm, keep the people! " * 80)[:MAX_PROMPT_CHARS]
    fields: dict[str, Any] = {"prompt": prompt, "seed": 1, "num_images": 4, "aspect_ratio": "16:9"}
    version = world.upload("inputs/longest.jpg", tags=encode_tags(fields))
    assert world.deliver_until_dead(submit, world.upload_event()) == 0
    only_one_paid_post(world, "inputs/longest.jpg", version)
    job = world.job("inputs/longest.jpg", version)
    assert job.state is JobState.SUBMITTED
    assert len(json.dumps(world.raw_job_item(job.job_id))) < 40_000  # far under DynamoDB's 400 KB item


# -- messages and events that are not what they seem -------------------------------------


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("this is not JSON", "not JSON"),
        (json.dumps({"hello": "world"}), "no Records"),
        (json.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}}}]}), "no key"),
    ],
)
def test_a_poison_message_fails_with_a_log_line_of_ours_naming_it(world: World, caplog: Any, body: str, why: str) -> None:
    submit = world.submit()
    message = {"MessageId": str(uuid.uuid4()), "ReceiptHandle": "r", "Body": body, "Attributes": {}}
    assert world.deliver(submit, message) == [message["MessageId"]]
    lines = [r for r in our_log_lines(caplog) if getattr(r, "message_id", None) == message["MessageId"]]
    assert lines, f"no log line of ours for a message with {why}"


@pytest.mark.parametrize(
    "document",
    [
        '{"prompt": ' + "[" * 30_000 + "]" * 30_000 + "}",  # nesting deep enough to exhaust the parser
        '{"prompt": "a lone surrogate \\ud800 here"}',
        '{"prompt": "\\udfff"}',
    ],
    ids=["deep nesting", "lone surrogate", "lone low surrogate"],
)
def test_malformed_but_decodable_packed_tags_are_an_immediate_invalid_tag(world: World, document: str) -> None:
    submit = world.submit()
    version = world.upload("inputs/malformed.jpg", tags=packed(document))
    assert world.deliver(submit, world.upload_event()) == []  # not retried: retrying cannot fix a tag
    job = world.job("inputs/malformed.jpg", version)
    assert job.state is JobState.FAILED and job.error_code == "invalid_tags" and job.attempts == 1
    assert world.posts() == 0


def test_a_key_with_dot_segments_is_refused_before_any_submit(world: World) -> None:
    submit = world.submit()
    world.upload("inputs/placeholder.jpg")
    message = world.upload_event()
    body = json.loads(message["Body"])
    body["Records"][0]["s3"]["object"]["key"] = "inputs/../private/x.png"
    body["Records"][0]["s3"]["object"]["versionId"] = "v-dots"
    assert world.deliver(submit, {**message, "Body": json.dumps(body)}) == []
    job = world.job("inputs/../private/x.png", "v-dots")
    assert job.state is JobState.FAILED and job.error_code == "unsupported_key"
    assert job.output_prefix.startswith("outputs/_unsupported-keys/")
    assert world.error_record(job)["code"] == "unsupported_key"
    assert world.posts() == 0


def test_a_record_for_another_bucket_is_ignored_with_a_log_line(world: World, caplog: Any) -> None:
    submit = world.submit()
    world.upload("inputs/elsewhere.jpg")
    message = world.upload_event()
    body = json.loads(message["Body"])
    body["Records"][0]["s3"]["bucket"]["name"] = "someone-elses-bucket"
    assert world.deliver(submit, {**message, "Body": json.dumps(body)}) == []
    assert world.posts() == 0
    assert world.aws.table().scan()["Items"] == []
    assert any("a bucket the stack is not attached to" in r.getMessage() for r in our_log_lines(caplog))


# -- credentials at rest --------------------------------------------------------------------


def test_a_refusal_that_echoes_the_presigned_url_stores_no_credential(world: World) -> None:
    def echoing_fal(request: Seen) -> Reply:
        sent = json.loads(request.body)
        detail = [{"loc": ["body", "image_url"], "msg": f"could not read {sent['image_url']}", "input": sent}]
        return Reply(422, json.dumps({"detail": detail}).encode(), {"Content-Type": "application/json"})

    fal = ScriptedHost(echoing_fal)
    try:
        submit = world.submit(FAL_QUEUE_URL=fal.url)
        version = world.upload("inputs/echo.jpg")
        assert world.deliver(submit, world.upload_event()) == []
        assert "X-Amz-Signature" in fal.seen[0].body.decode()  # fal did get a credential-bearing URL
        job = world.job("inputs/echo.jpg", version)
        assert job.state is JobState.FAILED and job.error_code == "fal_rejected"
        for stored in (json.dumps(world.error_record(job)), json.dumps(world.raw_job_item(job.job_id)), json.dumps(world.events())):
            assert "X-Amz-" not in stored and "x-amz-" not in stored.lower(), stored[:500]
    finally:
        fal.stop()
