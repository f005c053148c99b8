"""The job id: one per upload, the same for every delivery of that upload's event.

S3 delivers events at least once, as different SQS messages, so the SQS
message id cannot deduplicate. An object version can: on a versioned bucket
every write has its own ``versionId``. Unversioned buckets fall back to the
eTag and the event's ``sequencer``, which S3 documents as ordering events for
one key. A producer that sends neither a version nor a sequencer (moto's S3
does that) gets its version looked up by the submit function first; failing
that, the caller passes the event time as the ordering token.
"""

from __future__ import annotations

import hashlib
import json


def derive_job_id(bucket: str, key: str, version_id: str | None, etag: str | None = None, sequencer: str | None = None) -> str:
    """A 32-hex-digit id, the same for every delivery of one upload's event."""
    # A JSON array, not a joined string: keys may hold any character, newlines included.
    if version_id and version_id != "null":
        identity = json.dumps(["v1", bucket, key, "version", version_id])
    elif etag and sequencer:
        identity = json.dumps(["v1", bucket, key, "etag", etag, sequencer])
    else:
        raise ValueError(f"s3://{bucket}/{key}: an event needs a versionId, or an eTag and a sequencer, to name its job")
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]
