"""Reading jobs: one by id, an upload's jobs, and the open ones in the order recovery and the line take them."""

from __future__ import annotations

import heapq
from concurrent.futures import ThreadPoolExecutor

from botocore.exceptions import ClientError

from kontext_s3 import table_keys
from kontext_s3.dynamo import conditional_failure
from kontext_s3.jobs.base import TableAccess
from kontext_s3.jobs.index import NOTIFY, OPEN_JOBS_INDEX, open_shard, shards_of
from kontext_s3.jobs.model import Job, JobState, now_ms


class JobReads(TableAccess):
    def open_job_ids(self, state: str, *, checked_before_ms: int, limit: int = 100) -> list[str]:
        """Ids of jobs in ``state`` (or ``NOTIFY``) least recently checked first, all last checked before ``checked_before_ms``."""

        def shard_head(shard: int) -> list[tuple[int, str]]:
            page = self._table.query(
                IndexName=OPEN_JOBS_INDEX,
                KeyConditionExpression="open_shard = :shard AND open_order < :before",
                ExpressionAttributeValues={":shard": f"{state}#{shard}", ":before": checked_before_ms},
                Limit=limit,
            )
            return [(int(item["open_order"]), str(item["job_id"])) for item in page.get("Items", [])]

        shards = shards_of(state)
        if shards == 1:
            return [job_id for _, job_id in shard_head(0)]
        # The shards are read at once: one query's latency, not one per shard.
        with ThreadPoolExecutor(max_workers=shards, thread_name_prefix="open-jobs") as pool:
            heads = list(pool.map(shard_head, range(shards)))
        return [job_id for _, job_id in heapq.merge(*heads)][:limit]

    def waiting_ahead(self, job: Job) -> int:
        """How many uploads wait in line before ``job`` (for people following it; one count query per shard)."""
        if job.state is not JobState.WAITING or job.open_order is None:
            return 0

        def count(shard: int) -> int:
            total, start = 0, None
            while True:
                page = self._table.query(
                    IndexName=OPEN_JOBS_INDEX,
                    KeyConditionExpression="open_shard = :shard AND open_order < :mine",
                    ExpressionAttributeValues={":shard": f"{JobState.WAITING.value}#{shard}", ":mine": job.open_order},
                    Select="COUNT",
                    **({"ExclusiveStartKey": start} if start else {}),
                )
                total += int(page.get("Count", 0))
                start = page.get("LastEvaluatedKey")
                if not start:
                    return total

        return sum(count(shard) for shard in range(shards_of(JobState.WAITING.value)))

    def touch(self, job: Job) -> None:
        """Mark an open job as just checked, so the next recovery run looks at others first."""
        shard = open_shard(NOTIFY if job.state.ended else job.state.value, job.job_id)
        try:
            self._table.update_item(
                Key={"job_id": job.job_id},
                UpdateExpression="SET open_order = :now",
                ConditionExpression="open_shard = :shard",
                ExpressionAttributeValues={":now": now_ms(), ":shard": shard},
            )
        except ClientError as exc:
            if not conditional_failure(exc):
                raise

    def jobs_of_upload(self, upload_id: str) -> list[Job]:
        """Every job of one upload (its first, and one per changed edit), oldest first."""
        item = self._table.get_item(Key=table_keys.upload(upload_id), ConsistentRead=True).get("Item") or {}
        ids = sorted({upload_id, *(str(job_id) for job_id in item.get("job_ids", ()))})
        jobs = [job for job_id in ids if (job := self.get(job_id)) is not None]
        return sorted(jobs, key=lambda job: (job.arrived_at_ms or 0, job.created_at))
