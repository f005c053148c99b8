"""The job id: one per upload and edit, the same for every delivery of that upload's event.

S3 delivers events at least once, as different SQS messages, so the SQS
message id cannot deduplicate. An object version can: on a versioned bucket
every write has its own ``versionId``. An unversioned bucket (an attached one)
has no versions; there the upload is its bytes, named by their ``eTag``: a
rewrite of the same bytes is the same upload and is never paid for twice, a
rewrite with other bytes is a new upload. (The event's ``sequencer`` cannot
name it: a tag event on the same object has a sequencer of its own.)

With re-runs on tag changes, an upload's first job keeps this id and records
its edit's fingerprint; tags that ask for another edit make a job whose id
names the edit too, so the same edit of the same version never runs twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def derive_job_id(
    bucket: str,
    key: str,
    version_id: str | None,
    etag: str | None = None,
    edit: Mapping[str, Any] | None = None,
) -> str:
    """A 32-hex-digit id, the same for every delivery of one upload's event (and, when given, one edit of it)."""
    # A JSON array, not a joined string: keys may hold any character, newlines included.
    if version_id and version_id != "null":
        identity = json.dumps(["v1", bucket, key, "version", version_id])
    elif etag:
        identity = json.dumps(["v1", bucket, key, "etag", etag.strip('"')])
    else:
        raise ValueError(f"s3://{bucket}/{key}: an event needs a versionId, or on an unversioned bucket an eTag, to name its job")
    if edit is not None:
        identity = json.dumps([json.loads(identity), "edit", edit_mark(edit)])
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def edit_mark(edit: Mapping[str, Any]) -> str:
    """A short fingerprint of an edit (the model input), so a job can tell whether new tags ask for something else."""
    # Values as text: a tag "7" and a recipe's 7 are the same edit.
    canonical = json.dumps({name: str(value) for name, value in sorted(edit.items())}, sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
