"""S3's events through EventBridge (attached buckets) read into the same changes as S3's own notifications."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kontext_s3.s3_events import MalformedNotification, notification, parse_notification


def event(detail_type: str, **object_fields: Any) -> str:
    """An event as AWS's S3 user guide ("EventBridge event message structure") shows it."""
    detail: dict[str, Any] = {
        "version": "0",
        "bucket": {"name": "catalogue"},
        "object": {"key": "inputs/shoes/red.jpg", "size": 5, "etag": "b1946ac92492d2347c6235b4d2611184", "sequencer": "617f08299329d189"},
        "request-id": "N4N7GDK58NMKJ12R",
        "requester": "123456789012",
        "source-ip-address": "1.2.3.4",
        "reason": "PutObject",
    }
    extra = object_fields.pop("detail", {})
    detail["object"].update(object_fields)
    detail.update(extra)
    return json.dumps(
        {
            "version": "0",
            "id": "17793124-05d4-b198-2fde-7ededc63b103",
            "detail-type": detail_type,
            "source": "aws.s3",
            "account": "111122223333",
            "time": "2021-11-12T00:00:00Z",
            "region": "ca-central-1",
            "resources": ["arn:aws:s3:::catalogue"],
            "detail": detail,
        }
    )


def test_an_unversioned_upload_is_named_by_its_etag_and_keeps_its_sequencer() -> None:
    [change] = parse_notification(event("Object Created"))
    assert change.created and change.event_name == "ObjectCreated:Put"
    assert (change.bucket, change.key, change.version_id) == ("catalogue", "inputs/shoes/red.jpg", None)
    assert (change.etag, change.sequencer) == ("b1946ac92492d2347c6235b4d2611184", "617f08299329d189")
    assert change.event_time == "2021-11-12T00:00:00Z"


def test_a_versioned_attached_bucket_gives_its_version() -> None:
    [change] = parse_notification(event("Object Created", **{"version-id": "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e"}))
    assert change.version_id == "IYV3p45BT0ac8hjHg1houSdS1a.Mro8e"
    [moto_like] = parse_notification(event("Object Created", **{"version-id": "null"}))
    assert moto_like.version_id is None


def test_deletes_and_tags_read_as_s3_names_them() -> None:
    [deleted] = parse_notification(event("Object Deleted", detail={"reason": "DeleteObject", "deletion-type": "Permanently Deleted"}))
    assert deleted.removed and deleted.event_name == "ObjectRemoved:Delete"
    [marker] = parse_notification(event("Object Deleted", detail={"reason": "DeleteObject", "deletion-type": "Delete Marker Created"}))
    assert marker.event_name == "ObjectRemoved:DeleteMarkerCreated"
    [tagged] = parse_notification(event("Object Tags Added", detail={"reason": "PutObjectTagging"}))
    assert tagged.tagged


def test_other_s3_event_types_are_acknowledged_as_nothing_of_ours() -> None:
    for detail_type in ("Object Restore Completed", "Object Storage Class Changed", "Object ACL Updated", "Object Tags Deleted"):
        assert parse_notification(event(detail_type)) == []


def test_an_event_from_another_source_is_malformed() -> None:
    body = json.loads(event("Object Created"))
    with pytest.raises(MalformedNotification, match=r"aws\.s3"):
        parse_notification(json.dumps({**body, "source": "aws.ec2"}))
    del body["detail"]["object"]
    with pytest.raises(MalformedNotification, match="lacks"):
        parse_notification(json.dumps(body))


@pytest.mark.parametrize(
    ("sent", "decoded"),
    [("inputs/red shoe.jpg", None), ("inputs/red+shoe.jpg", "inputs/red shoe.jpg"), ("inputs/50%25.jpg", "inputs/50%.jpg")],
)
def test_a_key_that_may_be_url_encoded_keeps_both_readings(sent: str, decoded: str | None) -> None:
    # Whether EventBridge encodes keys as S3's notifications do is not documented: the submit function tries both.
    [change] = parse_notification(event("Object Created", key=sent))
    assert (change.key, change.decoded_key) == (sent, decoded)


def test_a_change_sent_again_by_the_stack_reads_back_the_same() -> None:
    [change] = parse_notification(event("Object Created", key="inputs/a b+c%d.jpg"))
    [again] = parse_notification(notification([change], tags_due=True))
    assert (again.bucket, again.key, again.etag, again.sequencer, again.version_id) == (
        change.bucket,
        change.key,
        change.etag,
        change.sequencer,
        None,
    )
