"""Creating a job: the one write that is not a transition (the item is new), held by its creator in SUBMITTING."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from kontext_s3 import table_keys
from kontext_s3.dynamo import conditional_failure
from kontext_s3.jobs.base import TableAccess
from kontext_s3.jobs.index import open_shard
from kontext_s3.jobs.model import Job, JobState, iso, new_holder, now_ms


class JobCreation(TableAccess):
    def create(
        self,
        *,
        job_id: str,
        bucket: str,
        key: str,
        version_id: str | None,
        etag: str | None,
        sequencer: str | None,
        event_time: str | None,
        output_prefix: str,
        holder: str,
        hold_ms: int,
        upload_id: str | None = None,
        edit_mark: str | None = None,
    ) -> Job | None:
        """Create the job, held by ``holder``; ``None`` when it already exists.

        ``upload_id`` names the upload (the object version) when this is not its first job (its tags asked for
        another edit): the job is listed under it first, so :meth:`jobs_of_upload` finds every job that may exist.
        """
        at = now_ms()
        if upload_id is not None and upload_id != job_id:
            self._table.update_item(
                Key=table_keys.upload(upload_id),
                UpdateExpression="ADD job_ids :ids SET expires_at = :expires",  # lives as long as its newest job
                ExpressionAttributeValues={":ids": {job_id}, ":expires": at // 1000 + self._ttl_seconds},
            )
        writer = new_holder()
        item: dict[str, Any] = {
            "job_id": job_id,
            "last_writer": writer,
            "state": JobState.SUBMITTING.value,
            "bucket": bucket,
            "key": key,
            "output_prefix": output_prefix,
            "created_at": iso(at),
            "updated_at": iso(at),
            "attempts": 1,
            "arrived_at_ms": at,
            "holder": holder,
            "held_until_ms": at + hold_ms,
            "open_shard": open_shard(JobState.SUBMITTING.value, job_id),
            "open_order": at,
            "expires_at": at // 1000 + self._ttl_seconds,
            "history": [{"state": JobState.SUBMITTING.value, "at": iso(at), "note": "upload seen"}],
        }
        item.update(
            {
                k: v
                for k, v in (
                    ("version_id", version_id),
                    ("etag", etag),
                    ("sequencer", sequencer),
                    ("event_time", event_time),
                    ("edit_mark", edit_mark),
                )
                if v
            }
        )
        try:
            self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(job_id)")
        except ClientError as exc:
            if conditional_failure(exc):
                return self._if_mine(job_id, writer, exc)
            raise
        return Job.model_validate(item)
