"""The uploads DLQ: listing it without taking anything, and redriving by key or all (moto over HTTP)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import JobStore
from kontext_s3.output_store import OutputLayout, write_json
from kontext_s3_tools.dead_letters import failure_reasons, list_dead_letters, redrive
from tests.helpers import Aws

DISPATCH = json.dumps({"kontext_s3": "dispatch"})


def notification(bucket: str, encoded_key: str, version_id: str | None = None) -> str:
    """An S3 event body; moto's carry no versionId or sequencer, real S3's do."""
    obj: dict[str, Any] = {"key": encoded_key, "size": 1234, "eTag": "d41d8cd98f00b204e9800998ecf8427e"}
    if version_id:
        obj |= {"versionId": version_id, "sequencer": "0062E4F5A1B2C3D4E5"}
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-24T10:15:30.123Z",
        "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj},
    }
    return json.dumps({"Records": [record]})


def dead(aws: Aws, *bodies: str) -> None:
    for body in bodies:
        aws.sqs.send_message(QueueUrl=aws.resources.dlq_url, MessageBody=body)


def uploads_queue_bodies(aws: Aws) -> list[str]:
    """What reached the uploads queue, without S3's s3:TestEvent from when the notification was set up."""
    bodies: list[str] = []
    while messages := aws.receive(wait=1):
        bodies.extend(m["Body"] for m in messages if "s3:TestEvent" not in m["Body"])
    return bodies


def layout(aws: Aws) -> OutputLayout:
    return OutputLayout(aws.resources.input_prefix, aws.resources.output_prefix)


def test_list_shows_keys_counts_and_times_and_leaves_every_message_in_the_queue(aws: Aws) -> None:
    bucket = aws.resources.bucket
    dead(aws, notification(bucket, "inputs/kitchen/my+flour%C3%A9.jpg"), DISPATCH, "not json at all")

    first = {letter.message_id: letter for letter in list_dead_letters(aws.sqs, aws.resources.dlq_url)}
    second = {letter.message_id: letter for letter in list_dead_letters(aws.sqs, aws.resources.dlq_url)}

    assert first.keys() == second.keys() and len(first) == 3
    by_body = {letter.body: letter for letter in second.values()}
    upload = by_body[notification(bucket, "inputs/kitchen/my+flour%C3%A9.jpg")]
    assert upload.keys == ("inputs/kitchen/my flouré.jpg",) and upload.note is None
    assert by_body[DISPATCH].keys == () and "dispatch" in (by_body[DISPATCH].note or "")
    assert by_body["not json at all"].keys == () and "not json at all" in (by_body["not json at all"].note or "")
    # Each listing is itself a receive: the counts go up by one per look.
    assert all(first[i].receive_count == 1 and second[i].receive_count == 2 for i in first)
    for letter in second.values():
        assert letter.sent_at is not None and letter.first_received_at is not None
        assert letter.first_received_at == first[letter.message_id].first_received_at
        assert letter.reason is None


def test_a_failed_job_gives_its_reason_when_the_event_names_its_version(aws: Aws) -> None:
    bucket, key = aws.resources.bucket, "inputs/shelf/jar.jpg"
    jobs = JobStore(aws.table())
    # A job of one edit of the upload: found through the upload's id, as the event names no edit.
    upload_id = derive_job_id(bucket, key, "v1")
    job_id = derive_job_id(bucket, key, "v1", edit={"prompt": "make it blue"})
    prefix = layout(aws).job_prefix(key, job_id)
    created = jobs.create(
        job_id=job_id,
        bucket=bucket,
        key=key,
        version_id="v1",
        etag=None,
        sequencer=None,
        event_time=None,
        output_prefix=prefix,
        holder="h",
        hold_ms=60_000,
        upload_id=upload_id,
    )
    assert created is not None
    message = "gave up after 2 deliveries of the S3 event: ReadTimeout"
    assert jobs.fail(job_id, "h", code="retries_exhausted", message=message, error_key=prefix + "error.json", retryable=True)
    source = {"bucket": bucket, "key": key, "version_id": "v1"}
    write_json(aws.s3, bucket, prefix + "error.json", {"code": "retries_exhausted", "message": message, "source": source})
    dead(aws, notification(bucket, key, version_id="v1"), notification(bucket, key, version_id="v2"))

    reasons = failure_reasons(aws.s3, layout(aws), jobs)
    found = {letter.body: letter.reason for letter in list_dead_letters(aws.sqs, aws.resources.dlq_url, reasons)}

    assert found[notification(bucket, key, version_id="v1")] == f"retries_exhausted: {message}"
    # Another version of the key, with no job: the first version's error record is not its reason.
    assert found[notification(bucket, key, version_id="v2")] is None


def test_without_a_version_the_error_record_under_the_key_gives_the_reason(aws: Aws) -> None:
    bucket, key = aws.resources.bucket, "inputs/shelf/jar.jpg"
    ours = layout(aws).job_prefix(key, "1" * 32) + "error.json"
    write_json(aws.s3, bucket, ours, {"code": "input_missing", "message": "gone", "source": {"bucket": bucket, "key": key}})
    # An input *under* the key's name (the key used as a folder) has its runs below ours: not ours.
    nested = f"{key}/lid.jpg"
    theirs = layout(aws).job_prefix(nested, "2" * 32) + "error.json"
    write_json(aws.s3, bucket, theirs, {"code": "invalid_tags", "message": "no", "source": {"bucket": bucket, "key": nested}})
    dead(aws, notification(bucket, key), notification(bucket, "inputs/shelf/other.jpg"))

    found = {
        letter.keys: letter.reason
        for letter in list_dead_letters(aws.sqs, aws.resources.dlq_url, failure_reasons(aws.s3, layout(aws), JobStore(aws.table())))
    }

    assert found == {(key,): "input_missing: gone", ("inputs/shelf/other.jpg",): None}


def test_redrive_by_key_moves_only_that_keys_message_then_all_moves_the_rest(aws: Aws) -> None:
    bucket, resources = aws.resources.bucket, aws.resources
    ours, other = notification(bucket, "inputs/a+b.jpg"), notification(bucket, "inputs/c.jpg")
    dead(aws, ours, other, DISPATCH)

    moved = redrive(aws.sqs, resources.dlq_url, resources.queue_url, key="inputs/a b.jpg")

    assert [letter.body for letter in moved] == [ours]
    assert uploads_queue_bodies(aws) == [ours]
    assert sorted(letter.body for letter in list_dead_letters(aws.sqs, resources.dlq_url)) == sorted([other, DISPATCH])

    # --key never matches a body that is not an S3 notification; --all moves it too.
    assert redrive(aws.sqs, resources.dlq_url, resources.queue_url, key="inputs/missing.jpg") == []
    moved = redrive(aws.sqs, resources.dlq_url, resources.queue_url, everything=True)

    assert sorted(letter.body for letter in moved) == sorted([other, DISPATCH])
    assert sorted(uploads_queue_bodies(aws)) == sorted([other, DISPATCH])
    assert list_dead_letters(aws.sqs, resources.dlq_url) == []


@pytest.mark.parametrize("choice", [{}, {"key": "inputs/a.jpg", "everything": True}])
def test_redrive_needs_exactly_one_of_a_key_or_everything(aws: Aws, choice: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        redrive(aws.sqs, aws.resources.dlq_url, aws.resources.queue_url, **choice)
