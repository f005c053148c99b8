"""The jobs table: one item per job, the only thing that stops a second paid request.

- :mod:`.model`: the job as stored, its states;
- :mod:`.transitions`: every change of state, as data;
- :mod:`.index`: the ``open-jobs`` index (where open jobs stand, and the line);
- :mod:`.store`: :class:`JobStore`, which reads jobs and performs the transitions.
"""

from kontext_s3.jobs.index import NOTIFY, NOTIFY_HOLD_MS, OPEN_JOBS_INDEX, OPEN_SHARDS, open_shard, shard_of, shards_of
from kontext_s3.jobs.model import AT_FAL, Claim, HistoryEntry, Job, JobState, hold_ms, iso, new_holder, now_ms
from kontext_s3.jobs.store import JobStore

__all__ = [
    "AT_FAL",
    "NOTIFY",
    "NOTIFY_HOLD_MS",
    "OPEN_JOBS_INDEX",
    "OPEN_SHARDS",
    "Claim",
    "HistoryEntry",
    "Job",
    "JobState",
    "JobStore",
    "hold_ms",
    "iso",
    "new_holder",
    "now_ms",
    "open_shard",
    "shard_of",
    "shards_of",
]
