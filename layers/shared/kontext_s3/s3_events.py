"""S3 event notifications as they arrive in an SQS message body.

Real S3 events carry ``userIdentity``, ``requestParameters`` and more that
moto leaves out; Powertools' strict parser models refuse moto's events, its
``S3Event`` data class reads both, so that is what this module uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

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

    @property
    def created(self) -> bool:
        return self.event_name.startswith("ObjectCreated:")

    @property
    def removed(self) -> bool:
        return self.event_name.startswith("ObjectRemoved:")


def parse_notification(body: str) -> list[ObjectChange]:
    """The object changes in one SQS message body; ``[]`` for S3's ``s3:TestEvent``."""
    try:
        document: Any = json.loads(body)
    except ValueError as exc:
        raise MalformedNotification(f"message body is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedNotification("message body is not a JSON object")
    if document.get("Event") == "s3:TestEvent":
        return []
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
