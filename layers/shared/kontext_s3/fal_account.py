"""Which fal account may call our webhook.

fal signs every webhook with the same keys for every account, so a valid
signature proves the sender is fal, not that it is *our* fal account. The
sender's ``X-Fal-Webhook-User-Id`` is accepted only when it is this stack's
account: ``FAL_USER_ID`` when the operator set it; otherwise the account of the
first verified webhook that proves itself ours (its request id is one fal gave
our submit function), pinned in the jobs table with a conditional write and
never changed after.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from kontext_s3 import table_keys
from kontext_s3.dynamo import conditional_failure
from kontext_s3.jobs import iso, now_ms

if TYPE_CHECKING:
    from kontext_s3.dynamo import TableLike


class FalAccount:
    def __init__(self, table: TableLike, *, configured_user_id: str = "") -> None:
        self._table = table
        self._known = configured_user_id or None
        self._configured = bool(configured_user_id)

    def pinned(self) -> str | None:
        if self._known is None:
            item = self._table.get_item(Key=table_keys.fal_account(), ConsistentRead=True).get("Item")
            self._known = str(item["fal_user_id"]) if item else None
        return self._known

    def accepts(self, user_id: str, *, proven: bool) -> bool:
        """Whether ``user_id`` is our account; ``proven`` senders (a request id our submit recorded) may pin it first."""
        pinned = self.pinned()
        if pinned is not None:
            return pinned == user_id
        if not proven:
            return False
        try:
            self._table.put_item(
                Item={**table_keys.fal_account(), "fal_user_id": user_id, "pinned_at": iso(now_ms())},
                ConditionExpression="attribute_not_exists(job_id)",
            )
        except ClientError as exc:
            if not conditional_failure(exc):
                raise
            self._known = None  # someone pinned first: read theirs
            return self.pinned() == user_id
        self._known = user_id
        return True
