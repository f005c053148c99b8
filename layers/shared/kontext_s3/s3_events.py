"""S3 events as they arrive in an SQS message body: S3's own notifications, and S3's events through EventBridge.

The stack's bucket notifies the uploads queue itself. A bucket the stack was
attached to keeps its own notification configuration and sends its events to
EventBridge instead, whose rule puts each event, as EventBridge shapes it, on
the same queue. Both become one :class:`ObjectChange`.

Real S3 events carry ``userIdentity``, ``requestParameters`` and more that
moto leaves out; Powertools' strict parser models refuse moto's events, its
``S3Event`` data class reads both, so that is what this module uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from aws_lambda_powertools.utilities.data_classes import S3Event


class MalformedNotification(ValueError):
    """The message is not an S3 notification: it goes back to SQS and, in the end, the DLQ."""


@dataclass(frozen=True)
class ObjectChange:
    event_name: str
    bucket: str
    key: str
    version_id: str | None
    etag: str | None
    sequencer: str | None
    size: int | None
    event_time: str
    #: An EventBridge event's key decoded as S3's notifications are (``+`` for a space), when that differs from the
    #: key as sent: whether EventBridge encodes keys is not documented, so both are tried (``Submitter``).
    decoded_key: str | None = None

    @property
    def created(self) -> bool:
        return self.event_name.startswith("ObjectCreated:")

    @property
    def removed(self) -> bool:
        return self.event_name.startswith("ObjectRemoved:")

    @property
    def tagged(self) -> bool:
        """New tags on an existing object (``s3:ObjectTagging:Put``): late tags, or a changed edit."""
        return self.event_name == "ObjectTagging:Put"

    def to_record(self) -> dict[str, Any]:
        """This change as an S3 notification record, for messages the stack sends itself (backfill, a tag deadline)."""
        obj: dict[str, Any] = {"key": quote_plus(self.key, safe="/")}
        for name, value in (("versionId", self.version_id), ("eTag", self.etag), ("sequencer", self.sequencer), ("size", self.size)):
            if value is not None:
                obj[name] = value
        return {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "eventTime": self.event_time,
            "eventName": self.event_name,
            "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": self.bucket, "arn": f"arn:aws:s3:::{self.bucket}"}, "object": obj},
        }


def stack_marks(body: str) -> dict[str, Any]:
    """The marks of a message the stack sent itself (see :func:`notification`); ``{}`` for S3's own."""
    if not body.startswith('{"kontext_s3"'):
        return {}
    try:
        marks = json.loads(body).get("kontext_s3")
    except (ValueError, AttributeError):
        return {}
    return marks if isinstance(marks, dict) else {}


def notification(changes: list[ObjectChange], **marks: Any) -> str:
    """An SQS body in S3's notification shape; ``marks`` (top-level, beside ``Records``) say why the stack sent it."""
    return json.dumps({**({"kontext_s3": marks} if marks else {}), "Records": [change.to_record() for change in changes]})


#: EventBridge's S3 detail types, as the names S3's own notifications give the same change (others are not ours).
EVENTBRIDGE_CHANGES = {"Object Created": "ObjectCreated:", "Object Deleted": "ObjectRemoved:", "Object Tags Added": "ObjectTagging:Put"}


def parse_notification(body: str) -> list[ObjectChange]:
    """The object changes in one SQS message body; ``[]`` for S3's ``s3:TestEvent`` and S3 events that are no change of ours."""
    try:
        document: Any = json.loads(body)
    except ValueError as exc:
        raise MalformedNotification(f"message body is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedNotification("message body is not a JSON object")
    if document.get("Event") == "s3:TestEvent":
        return []
    if "detail-type" in document:
        return _eventbridge_change(document)
    if not isinstance(document.get("Records"), list):
        raise MalformedNotification("message body has no S3 Records")
    changes: list[ObjectChange] = []
    try:
        for record in S3Event(document).records:
            if record.event_source != "aws:s3":
                raise MalformedNotification(f"record from {record.event_source!r}, not aws:s3")
            obj = record.s3.get_object
            changes.append(
                ObjectChange(
                    event_name=record.event_name,
                    bucket=record.s3.bucket.name,
                    # Keys arrive URL-encoded with '+' for spaces.
                    key=unquote_plus(obj["key"]),
                    version_id=obj.get("versionId") or None,
                    etag=obj.get("eTag") or None,
                    sequencer=obj.get("sequencer") or None,
                    size=obj.get("size"),
                    event_time=record.event_time,
                )
            )
    except (KeyError, TypeError) as exc:
        raise MalformedNotification(f"S3 record lacks a field: {exc}") from exc
    return changes


def _eventbridge_change(event: dict[str, Any]) -> list[ObjectChange]:
    """One S3 event as EventBridge delivers it (``detail-type``, ``detail.bucket``, ``detail.object``)."""
    if event.get("source") != "aws.s3":
        raise MalformedNotification(f"EventBridge event from {event.get('source')!r}, not aws.s3")
    kind = EVENTBRIDGE_CHANGES.get(str(event.get("detail-type")))
    if kind is None:
        return []  # restores, storage classes, ACLs: S3 sends every type once EventBridge is on
    try:
        detail = event["detail"]
        obj = detail["object"]
        key, bucket = str(obj["key"]), str(detail["bucket"]["name"])
        reason = str(detail.get("reason") or "")
    except (KeyError, TypeError) as exc:
        raise MalformedNotification(f"EventBridge S3 event lacks a field: {exc}") from exc
    if kind == "ObjectCreated:":
        kind += reason.removesuffix("Object") or "Put"
    elif kind == "ObjectRemoved:":
        kind += "DeleteMarkerCreated" if detail.get("deletion-type") == "Delete Marker Created" else "Delete"
    version = obj.get("version-id")
    decoded = unquote_plus(key)
    return [
        ObjectChange(
            event_name=kind,
            bucket=bucket,
            key=key,
            version_id=str(version) if version and version != "null" else None,
            etag=obj.get("etag") or obj.get("eTag") or None,
            sequencer=obj.get("sequencer") or None,
            size=obj.get("size"),
            event_time=str(event.get("time") or ""),
            decoded_key=decoded if decoded != key else None,
        )
    ]
