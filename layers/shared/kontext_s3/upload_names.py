"""What names an upload in an event: its key as stored, and its version, or on an unversioned bucket its eTag.

The stack's own bucket is versioned (the template says so): an event of it without a ``versionId`` comes from a
producer that left it out, so the version is looked up. An attached bucket's event says by itself whether the bucket
is versioned; a tag event there may name no eTag, so the object's is read. EventBridge may or may not URL-encode
keys (it is not documented): a key that decodes to another is tried as sent, then decoded.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from kontext_s3.input_image import missing
from kontext_s3.s3_events import ObjectChange
from kontext_s3.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class UploadNames:
    def __init__(self, s3: S3Client, settings: Settings) -> None:
        self._s3 = s3
        self._settings = settings

    def named(self, change: ObjectChange) -> ObjectChange:
        """The change with its key as stored and what names its upload: a version, or on an unversioned bucket an eTag."""
        if change.decoded_key is not None:
            change = replace(change, key=self._stored_key(change), decoded_key=None)
        if change.version_id:
            return change
        if change.bucket == self._settings.input_bucket:  # versioned by the template: an event without one left it out
            return replace(change, version_id=self._resolve_version(change))
        if change.etag:  # an attached bucket's event says whether it is versioned
            return change
        try:  # a tag event that names no eTag: the object's, as it stands
            head = self._s3.head_object(Bucket=change.bucket, Key=change.key)
        except ClientError as exc:
            if missing(exc):
                return change  # deleted since: nothing names it, and reading its edit will say so
            raise
        version = head.get("VersionId")
        return replace(change, version_id=version if version and version != "null" else None, etag=str(head.get("ETag", "")).strip('"'))

    def _stored_key(self, change: ObjectChange) -> str:
        """EventBridge's key as sent, or decoded as S3's notifications are: the one that exists."""
        try:
            self._s3.head_object(Bucket=change.bucket, Key=change.key)
        except ClientError as exc:
            if missing(exc) and change.decoded_key is not None:
                return change.decoded_key
            raise
        return change.key

    def _resolve_version(self, change: ObjectChange) -> str | None:
        """The version an event without ``versionId`` is about: the one whose eTag it names.

        Real S3 sends ``versionId`` on versioned buckets; other producers may not. A ``HEAD`` with ``If-Match`` finds
        the current version when it is still the uploaded one, the version list finds it when it was overwritten since.
        """
        try:
            if change.etag:
                head = self._s3.head_object(Bucket=change.bucket, Key=change.key, IfMatch=f'"{change.etag}"')
            else:
                head = self._s3.head_object(Bucket=change.bucket, Key=change.key)
            current = head.get("VersionId")
            return current if current and current != "null" else None
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("412", "PreconditionFailed"):
                if missing(exc):
                    return None
                raise
        listing = self._s3.list_object_versions(Bucket=change.bucket, Prefix=change.key)
        for candidate in listing.get("Versions", []):  # newest first
            if candidate.get("Key") == change.key and candidate.get("ETag", "").strip('"') == change.etag:
                return candidate.get("VersionId")
        return None
