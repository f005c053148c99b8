"""The ``open-jobs`` index: where each open job stands, so recovery and the line read them in order.

Open jobs carry ``open_shard`` (``<STATE>#<n>``) and ``open_order`` (when the
job was last looked at), the keys of the sparse, sharded ``open-jobs`` index:
the recovery function reads the least recently checked jobs of each state
first, and marks each one it checks, so it rotates through any backlog. A
WAITING job's order is its arrival, so the oldest upload waiting goes first. Ended
jobs leave the index, except those whose event is still to be published
(``NOTIFY#<n>``).
"""

from __future__ import annotations

from kontext_s3.jobs.model import JobState

OPEN_JOBS_INDEX = "open-jobs"
#: Partitions per open state in the index; a job's shard comes from its id. Every recovery run reads each shard of
#: each open state, so fewer is cheaper; four partitions take thousands of index writes a second, far more than
#: fal's concurrency lets a stack make.
OPEN_SHARDS = 4
NOTIFY = "NOTIFY"
#: How long the right to publish an ended job's event is held before another caller (recovery) may take it.
NOTIFY_HOLD_MS = 30_000


def shards_of(state: str) -> int:
    """How many shards a state's open jobs spread over in the index.

    The line (WAITING) is one shard: it is read on every dispatch, at the rate slots free up, and its writes come at
    the rate uploads wait, far below one partition's limit; one query then reads it instead of one per shard. The states
    recovery reads in the background spread over :data:`OPEN_SHARDS`.
    """
    return 1 if state == JobState.WAITING.value else OPEN_SHARDS


def shard_of(job_id: str, shards: int = OPEN_SHARDS) -> int:
    try:
        return int(job_id[:4], 16) % shards
    except ValueError:
        return sum(job_id.encode()) % shards


def open_shard(state: str, job_id: str) -> str:
    return f"{state}#{shard_of(job_id, shards_of(state))}"
