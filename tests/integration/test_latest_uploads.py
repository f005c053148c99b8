"""The latest upload of a key of an unversioned bucket (what a delete there cancels), in DynamoDB (moto, over HTTP)."""

from __future__ import annotations

from kontext_s3.latest_uploads import LatestUploads
from kontext_s3.s3_events import ObjectChange
from tests.helpers import Aws


def change(event_name: str, sequencer: str | None) -> ObjectChange:
    return ObjectChange(event_name, "photos", "inputs/a.jpg", None, "e", sequencer, 3, "2026-12-07T00:00:00Z")


def test_writes_are_ordered_by_sequencer_whatever_order_their_events_come_in(aws: Aws) -> None:
    latest = LatestUploads(aws.table())
    latest.record(change("ObjectCreated:Put", "00000000000000000B"), "second", 1)
    latest.record(change("ObjectCreated:Put", "0A"), "first", 2)  # an older write's event, late
    assert latest.latest("photos", "inputs/a.jpg") == "second"
    assert latest.removed_by(change("ObjectRemoved:Delete", "0C")) == "second"
    assert latest.removed_by(change("ObjectRemoved:Delete", "0A")) is None  # a delete before the latest write


def test_a_tag_event_which_has_no_sequencer_makes_its_upload_the_latest(aws: Aws) -> None:
    # S3's tag events carry no sequencer: the job they create is for the object as it stands, the key's latest write.
    latest = LatestUploads(aws.table())
    latest.record(change("ObjectCreated:Put", "0B"), "old", 1)
    latest.record(change("ObjectTagging:Put", None), "tagged", 2)
    assert latest.latest("photos", "inputs/a.jpg") == "tagged"
    assert latest.removed_by(change("ObjectRemoved:Delete", "0C")) == "tagged"
