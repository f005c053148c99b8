"""What every part of the jobs store shares: the table, and telling "my write landed" from "another's did".

Every write stamps a fresh ``last_writer`` token: when the SDK retries a write whose first attempt landed but whose
answer was lost, the retry fails its own condition, and the token tells the two apart. A condition that failed on the
first attempt was another's write: no read is needed to know it (racing dispatchers lose many).
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from kontext_s3.dynamo import retried
from kontext_s3.jobs.model import Job

if TYPE_CHECKING:
    from kontext_s3.dynamo import TableLike


class TableAccess:
    def __init__(self, table: TableLike, *, ttl_days: int = 30) -> None:
        self.table = table
        self._table = table
        self._ttl_seconds = ttl_days * 86400

    def get(self, job_id: str) -> Job | None:
        item = self._table.get_item(Key={"job_id": job_id}, ConsistentRead=True).get("Item")
        return Job.model_validate(plain(item)) if item else None

    def _if_mine(self, job_id: str, writer: str, refusal: ClientError) -> Job | None:
        """After a failed condition: the job, if the write that changed it was ours (a retried write)."""
        if not retried(refusal):
            return None  # refused at the first attempt: no earlier attempt of ours can have landed
        current = self.get(job_id)
        return current if current is not None and current.last_writer == writer else None


def plain(value: Any) -> Any:
    """DynamoDB's Decimals as ints/floats, recursively."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
