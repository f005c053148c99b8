"""Start jobs for images that were in the bucket before the stack (``kontext-s3 backfill PREFIX``).

The bucket is the stack's own, or one the stack is attached to (``kontext-s3 backfill --bucket NAME``, its
``AttachedBuckets``): the messages name it, and the submit function takes them for either.

Each object becomes one S3-shaped ``ObjectCreated`` message on the uploads
queue, so it takes the same road as an upload: the submit function reads its
tags and recipe, admission control and the daily budget decide when it goes,
and a job that exists is never sent again. The message is marked ``backfill``
so an untagged object is not left waiting for late tags, and it carries the
edit fields given on the command line (below the object's own tags).

An object whose upload already has a job is not queued at all, so a second
run queues nothing (on an unversioned bucket, such as an attached one may be,
the upload is named by its eTag, as the submit function names it). One listing of the prefix (``ListObjectVersions``, for the
version each job is named by) and one jobs-table read per object are the cost;
for millions of objects, S3 Batch Operations over an inventory would do the
listing instead (not built: see docs/tags-and-recipes.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import JobStore
from kontext_s3.recipes import is_recipe
from kontext_s3.s3_events import ObjectChange, notification


class BackfillError(RuntimeError):
    """The uploads queue refused some messages; what was queued before stays queued."""


@dataclass
class BackfillReport:
    listed: int = 0
    queued: int = 0
    #: Objects whose upload already has a job (done, running or failed): not queued again.
    had_a_job: int = 0

    def line(self) -> str:
        return f"listed {self.listed}, queued {self.queued}, already had a job {self.had_a_job}"


def current_objects(s3: Any, bucket: str, prefix: str) -> Iterator[ObjectChange]:
    """The current version of every object under ``prefix``, as the ``ObjectCreated`` event its upload sent."""
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for version in page.get("Versions", []):
            key = str(version["Key"])
            if not version.get("IsLatest") or key.endswith("/") or is_recipe(key):
                continue
            version_id = version.get("VersionId")
            yield ObjectChange(
                event_name="ObjectCreated:Put",
                bucket=bucket,
                key=key,
                version_id=version_id if version_id and version_id != "null" else None,
                etag=str(version.get("ETag", "")).strip('"') or None,
                sequencer=None,
                size=version.get("Size"),
                event_time=version["LastModified"].isoformat().replace("+00:00", "Z"),
            )


def _upload_id(change: ObjectChange) -> str | None:
    """The id the submit function gives the object's upload: by its version, or on an unversioned bucket its eTag."""
    try:
        return derive_job_id(change.bucket, change.key, change.version_id, change.etag)
    except ValueError:  # neither: nothing to look up, the submit function decides
        return None


def backfill(
    *,
    s3: Any,
    sqs: Any,
    queue_url: str,
    bucket: str,
    prefix: str,
    fields: dict[str, str],
    jobs: JobStore | None,
    progress: Callable[[BackfillReport], None] = lambda _: None,
) -> BackfillReport:
    report = BackfillReport()
    batch: list[ObjectChange] = []
    # The recipe standing now applies, not the one at each object's upload: it may be written for the backfill.
    now = datetime.now(UTC).isoformat()

    def send() -> None:
        if not batch:
            return
        body = {"backfill": True, "fields": fields, "recipe_at": now}
        entries = [{"Id": str(i), "MessageBody": notification([change], **body)} for i, change in enumerate(batch)]
        answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries)
        report.queued += len(answer.get("Successful", []))
        if answer.get("Failed"):
            failed = ", ".join(f"{batch[int(f['Id'])].key}: {f.get('Message', f.get('Code'))}" for f in answer["Failed"])
            raise BackfillError(f"the uploads queue refused some messages ({failed}); {report.line()}; run backfill again")
        batch.clear()
        progress(report)

    for change in current_objects(s3, bucket, prefix):
        report.listed += 1
        upload_id = _upload_id(change)
        if jobs is not None and upload_id and jobs.jobs_of_upload(upload_id):
            report.had_a_job += 1
            continue
        batch.append(change)
        if len(batch) == 10:  # SendMessageBatch's most
            send()
    send()
    progress(report)
    return report
