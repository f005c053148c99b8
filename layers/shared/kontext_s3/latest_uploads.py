"""The latest upload of each key of an unversioned bucket: the one a delete there cancels.

On a versioned bucket a delete names versions, and each version names its upload. On an unversioned one (an
attached bucket) a delete names only the key; the bytes it removed were the key's last write, and S3 orders an
object's events by their ``sequencer``. So each upload's first job records itself here as its key's latest, unless a
later write's did first, and a delete cancels the latest upload written before it. An earlier upload of the key
was overwritten, not deleted: its job goes on with its pinned copy (``input_image``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from botocore.exceptions import ClientError

from kontext_s3 import table_keys
from kontext_s3.dynamo import TableLike, conditional_failure
from kontext_s3.s3_events import ObjectChange

#: Sequencers are hexadecimal strings of varying length, ordered by length and then lexically: padded to this many
#: digits, they order as strings (DynamoDB's comparison).
SEQUENCER_DIGITS = 40


def sequencer_order(sequencer: str | None) -> str:
    return (sequencer or "").upper().rjust(SEQUENCER_DIGITS, "0")


def key_id(bucket: str, key: str) -> str:
    return hashlib.sha256(json.dumps([bucket, key]).encode("utf-8")).hexdigest()[:32]


class LatestUploads:
    def __init__(self, table: TableLike, *, ttl_days: int = 30) -> None:
        self._table = table
        self._ttl_seconds = ttl_days * 86400

    def record(self, change: ObjectChange, upload_id: str, at_ms: int) -> None:
        """This upload is its key's latest, unless a later write of the key was recorded first.

        An event without a sequencer (S3's tag events have none) is about the object as it stands: its upload is the
        latest, whatever came before."""
        item = {
            **table_keys.latest_upload(key_id(change.bucket, change.key)),
            "upload_id": upload_id,
            "sequencer": sequencer_order(change.sequencer),
            "expires_at": at_ms // 1000 + self._ttl_seconds,
        }
        if not change.sequencer:
            self._table.put_item(Item=item)
            return
        try:
            self._table.put_item(
                Item=item,
                ConditionExpression="attribute_not_exists(upload_id) OR #s < :s",
                ExpressionAttributeNames={"#s": "sequencer"},
                ExpressionAttributeValues={":s": sequencer_order(change.sequencer)},
            )
        except ClientError as exc:
            if not conditional_failure(exc):
                raise

    def latest(self, bucket: str, key: str) -> str | None:
        item = self._table.get_item(Key=table_keys.latest_upload(key_id(bucket, key)), ConsistentRead=True).get("Item") or {}
        return str(item["upload_id"]) if item.get("upload_id") else None

    def removed_by(self, change: ObjectChange) -> str | None:
        """The upload a delete of the key removed: its latest, when that was written before the delete."""
        item: dict[str, Any] = (
            self._table.get_item(Key=table_keys.latest_upload(key_id(change.bucket, change.key)), ConsistentRead=True).get("Item") or {}
        )
        if not item.get("upload_id"):
            return None
        if change.sequencer and str(item.get("sequencer", "")) > sequencer_order(change.sequencer):
            return None  # written again after the delete: the new upload is not what was deleted
        return str(item["upload_id"])
