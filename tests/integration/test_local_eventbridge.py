"""S3's events through EventBridge, from the project's moto server, as S3 sends them.

A bucket the stack did not create keeps its own notification configuration;
EventBridge is turned on by merging ``EventBridgeConfiguration`` into it, and a
rule on the default bus sends its events to a queue. moto's own delivery is put
right in ``kontext_s3_tools.moto_server``: these tests hold it to S3's shape.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kontext_s3_tools.local_stack import MotoServer, aws_session

ACCOUNT = "123456789012"


@dataclass
class Eb:
    s3: Any
    sqs: Any
    events: Any

    def queue(self, name: str) -> tuple[str, str]:
        url = self.sqs.create_queue(QueueName=f"{name}-{uuid.uuid4().hex[:8]}")["QueueUrl"]
        return url, self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]

    def messages(self, url: str, expected: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """``expected`` message bodies from the queue, and then nothing more."""
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            found.extend(self._receive(url, wait=1))
        found.extend(self._receive(url, wait=0))
        assert len(found) == expected, json.dumps(found, indent=1)
        return found

    def _receive(self, url: str, wait: int) -> list[dict[str, Any]]:
        batch = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait).get("Messages", [])
        for message in batch:
            self.sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        return [json.loads(m["Body"]) for m in batch]


@pytest.fixture
def eb(moto_server: MotoServer) -> Eb:
    session = aws_session()
    return Eb(*(session.client(s, endpoint_url=moto_server.url) for s in ("s3", "sqs", "events")))


@pytest.fixture
def rule(eb: Eb) -> Iterator[Any]:
    """``rule(bucket, queue_arn, bus="default")``: S3's events of one bucket, on a bus, to a queue (removed after)."""
    made: list[tuple[str, str]] = []

    def make(bucket: str, queue_arn: str, bus: str = "default") -> None:
        name = f"s3-{bucket}-{bus}"[:64]
        pattern = {"source": ["aws.s3"], "detail": {"bucket": {"name": [bucket]}}}
        eb.events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps(pattern))
        eb.events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": "queue", "Arn": queue_arn}])
        made.append((name, bus))

    yield make
    for name, bus in made:
        eb.events.remove_targets(Rule=name, EventBusName=bus, Ids=["queue"])
        eb.events.delete_rule(Name=name, EventBusName=bus)


def _bucket(eb: Eb, *, versioned: bool = False) -> str:
    bucket = f"external-{uuid.uuid4().hex[:10]}"
    eb.s3.create_bucket(Bucket=bucket)
    if versioned:
        eb.s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket


def _turn_on_event_bridge(eb: Eb, bucket: str) -> dict[str, Any]:
    """What a tool attaching a bucket does: read the configuration, add EventBridge, put it back whole."""
    configuration = eb.s3.get_bucket_notification_configuration(Bucket=bucket)
    configuration.pop("ResponseMetadata")
    eb.s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={**configuration, "EventBridgeConfiguration": {}})
    return dict(configuration)


def _etag(body: bytes) -> str:
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def _is_sequencer(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 16 and all(c in "0123456789ABCDEF" for c in value)


def test_an_attached_unversioned_buckets_events_reach_the_rules_queue_as_s3_sends_them_and_its_own_queue_still_hears(
    eb: Eb, rule: Any
) -> None:
    bucket = _bucket(eb)
    own_url, own_arn = eb.queue("own")
    events_url, events_arn = eb.queue("events")
    other_bus_url, other_bus_arn = eb.queue("other-bus")
    existing = {"Id": "owners-queue", "QueueArn": own_arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}
    eb.s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [existing]})
    assert eb.messages(own_url, 1)[0]["Event"] == "s3:TestEvent"

    assert _turn_on_event_bridge(eb, bucket) == {"QueueConfigurations": [existing]}
    configuration = eb.s3.get_bucket_notification_configuration(Bucket=bucket)
    assert configuration["QueueConfigurations"] == [existing]
    assert configuration["EventBridgeConfiguration"] == {}
    rule(bucket, events_arn)
    bus = f"custom-{uuid.uuid4().hex[:8]}"
    eb.events.create_event_bus(Name=bus)
    rule(bucket, other_bus_arn, bus)  # S3 sends to the default bus only

    tagged = "inputs/a b+c%d.jpg"  # sent as stored: EventBridge does not URL-encode keys as S3's records do
    eb.s3.put_object(Bucket=bucket, Key="inputs/plain.jpg", Body=b"plain")
    eb.s3.put_object(Bucket=bucket, Key=tagged, Body=b"tagged!", Tagging="prompt=hi")
    eb.s3.put_object_tagging(Bucket=bucket, Key=tagged, Tagging={"TagSet": [{"Key": "prompt", "Value": "night"}]})
    eb.s3.delete_object(Bucket=bucket, Key=tagged)

    events = eb.messages(events_url, 4)
    assert [e["detail-type"] for e in events] == ["Object Created", "Object Created", "Object Tags Added", "Object Deleted"]
    for event in events:
        assert event["source"] == "aws.s3" and event["account"] == ACCOUNT and event["region"] == "us-east-1"
        assert event["resources"] == [f"arn:aws:s3:::{bucket}"]
        detail = event["detail"]
        assert detail["version"] == "0" and detail["bucket"] == {"name": bucket}
        assert detail["requester"] == ACCOUNT and detail["source-ip-address"]
        assert len(detail["request-id"]) == 16
    assert len({e["id"] for e in events}) == 4
    assert len({e["detail"]["request-id"] for e in events}) == 4

    plain, created, tags, deleted = (e["detail"] for e in events)
    # No version-id on an unversioned bucket; "etag", not moto's "eTag"; the API as the reason.
    assert plain["object"] == {"key": "inputs/plain.jpg", "size": 5, "etag": _etag(b"plain"), "sequencer": plain["object"]["sequencer"]}
    assert created["object"] == {"key": tagged, "size": 7, "etag": _etag(b"tagged!"), "sequencer": created["object"]["sequencer"]}
    assert plain["reason"] == created["reason"] == "PutObject"
    assert "deletion-type" not in created
    # One Object Tags Added, from the tagging API (not the upload's own tags): no size, sequencer or reason.
    assert tags["object"] == {"key": tagged, "etag": _etag(b"tagged!")}
    assert "reason" not in tags
    assert deleted["object"] == {"key": tagged, "sequencer": deleted["object"]["sequencer"]}
    assert deleted["reason"] == "DeleteObject" and deleted["deletion-type"] == "Permanently Deleted"
    sequencers = [plain["object"]["sequencer"], created["object"]["sequencer"], deleted["object"]["sequencer"]]
    assert all(_is_sequencer(s) for s in sequencers)
    assert sequencers == sorted(sequencers) and len(set(sequencers)) == 3

    # The bucket's own queue still gets S3's records, with the same sequencers (one counter for every destination).
    # (S3 checks the destinations again when the configuration is put back: one more s3:TestEvent.)
    records = [m["Records"][0] for m in eb.messages(own_url, 4) if m.get("Event") != "s3:TestEvent"]
    assert [r["eventName"] for r in records] == ["ObjectCreated:Put", "ObjectCreated:Put", "ObjectRemoved:Delete"]
    assert [r["s3"]["object"]["sequencer"] for r in records] == sequencers
    assert records[1]["s3"]["object"]["key"] == "inputs%2Fa+b%2Bc%25d.jpg"
    assert "size" not in records[2]["s3"]["object"] and "eTag" not in records[2]["s3"]["object"]

    eb.messages(other_bus_url, 0, timeout=1)


def test_a_versioned_buckets_events_name_versions_apis_and_delete_markers_as_s3_does(eb: Eb, rule: Any) -> None:
    bucket = _bucket(eb, versioned=True)
    events_url, events_arn = eb.queue("events")
    _turn_on_event_bridge(eb, bucket)
    assert eb.s3.get_bucket_notification_configuration(Bucket=bucket)["EventBridgeConfiguration"] == {}
    rule(bucket, events_arn)

    first = eb.s3.put_object(Bucket=bucket, Key="inputs/a.jpg", Body=b"1")["VersionId"]
    second = eb.s3.put_object(Bucket=bucket, Key="inputs/a.jpg", Body=b"2")["VersionId"]
    copied = eb.s3.copy_object(Bucket=bucket, Key="inputs/copy.jpg", CopySource={"Bucket": bucket, "Key": "inputs/a.jpg"})["VersionId"]
    upload = eb.s3.create_multipart_upload(Bucket=bucket, Key="inputs/big.jpg")["UploadId"]
    part = eb.s3.upload_part(Bucket=bucket, Key="inputs/big.jpg", UploadId=upload, PartNumber=1, Body=b"big")
    parts = {"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]}
    big = eb.s3.complete_multipart_upload(Bucket=bucket, Key="inputs/big.jpg", UploadId=upload, MultipartUpload=parts)["VersionId"]
    marker = eb.s3.delete_object(Bucket=bucket, Key="inputs/a.jpg")["VersionId"]
    eb.s3.delete_object(Bucket=bucket, Key="inputs/a.jpg", VersionId=first)

    events = eb.messages(events_url, 6)
    details = [e["detail"] for e in events]
    assert [(e["detail-type"], e["detail"]["reason"]) for e in events] == [
        ("Object Created", "PutObject"),
        ("Object Created", "PutObject"),
        ("Object Created", "CopyObject"),
        ("Object Created", "CompleteMultipartUpload"),  # once: not also as a PutObject
        ("Object Deleted", "DeleteObject"),
        ("Object Deleted", "DeleteObject"),
    ]
    assert [d["object"].get("version-id") for d in details[:4]] == [first, second, copied, big]
    assert details[4]["object"]["version-id"] == marker
    assert details[4]["deletion-type"] == "Delete Marker Created"
    assert details[4]["object"]["etag"] == _etag(b"")  # a delete marker's: the empty object's
    assert details[5]["object"] == {"key": "inputs/a.jpg", "version-id": first, "sequencer": details[5]["object"]["sequencer"]}
    assert details[5]["deletion-type"] == "Permanently Deleted"
    sequencers = [d["object"]["sequencer"] for d in details]
    assert sequencers == sorted(sequencers) and len(set(sequencers)) == len(sequencers)


def test_a_bucket_with_only_event_bridge_says_so_and_one_without_says_nothing(eb: Eb) -> None:
    bucket = _bucket(eb)
    assert "EventBridgeConfiguration" not in eb.s3.get_bucket_notification_configuration(Bucket=bucket)
    eb.s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"EventBridgeConfiguration": {}})
    configuration = eb.s3.get_bucket_notification_configuration(Bucket=bucket)
    configuration.pop("ResponseMetadata")
    assert configuration == {"EventBridgeConfiguration": {}}
    eb.s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={})
    assert "EventBridgeConfiguration" not in eb.s3.get_bucket_notification_configuration(Bucket=bucket)
