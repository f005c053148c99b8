"""The latest failed delivery of an upload's event, kept where whoever follows the upload can read it.

A delivery that fails (a refused call, a fal key never stored, an endpoint out
of reach) goes back to SQS and is tried again; only the last one leaves an
error record. Until then the failure would be in the function's log alone,
and someone waiting on the upload (``kontext-s3 upload --wait``, ``status``,
``make demo``) would see nothing for minutes. So the submit function writes
each failed delivery to the jobs table under the upload's id (``table_keys``):
what failed, on which delivery of how many, and what to do. It is one
unconditional write, made only when a delivery fails, and never allowed to
fail the delivery further: when the table itself refuses, the log line is
what is left (and the queue's alarms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from kontext_s3 import table_keys
from kontext_s3.fal_queue import FalKeyMissing
from kontext_s3.jobs import now_ms
from kontext_s3.log import logger
from kontext_s3.redact import redact
from kontext_s3.text import shorten

if TYPE_CHECKING:
    from kontext_s3.dynamo import TableLike

#: How much of an error's text a failure keeps: one line on a terminal, with its hint.
REASON_CHARS = 300
_DENIED = {"AccessDenied", "AccessDeniedException", "403", "UnauthorizedOperation"}


@dataclass(frozen=True)
class DeliveryFailure:
    key: str
    #: ``access_denied``, ``fal_key_missing``, ``unreachable`` or ``error``.
    kind: str
    reason: str
    hint: str
    delivery: int
    max_deliveries: int
    at_ms: int

    def sentence(self, function: str = "submit") -> str:
        """One line: what failed, on which delivery of how many, and what to do."""
        last = self.delivery >= self.max_deliveries
        then = "no delivery is left: an error record follows" if last else "it will be tried again"
        return f"{function} failed on delivery {self.delivery} of {self.max_deliveries} ({then}): {self.reason}; {self.hint}"

    @classmethod
    def of(cls, key: str, exc: BaseException, *, delivery: int, max_deliveries: int) -> DeliveryFailure:
        kind, hint = classify(exc)
        reason = shorten(redact(f"{type(exc).__name__}: {exc}" if kind == "error" else str(exc)), REASON_CHARS)
        return cls(key=key, kind=kind, reason=reason, hint=hint, delivery=delivery, max_deliveries=max_deliveries, at_ms=now_ms())


def classify(exc: BaseException) -> tuple[str, str]:
    """What kind of failure this is, and what the operator can do about it."""
    seen: BaseException | None = exc
    while seen is not None:  # the cause may be wrapped (a retry, Powertools' GetParameterError)
        if isinstance(seen, FalKeyMissing):
            return "fal_key_missing", "the upload is kept and sent once the key is stored"
        if isinstance(seen, ClientError) and seen.response.get("Error", {}).get("Code") in _DENIED:
            return "access_denied", "the function's role lacks this permission: compare its policy with template.yaml and redeploy"
        if isinstance(seen, EndpointConnectionError | httpx.ConnectError | httpx.ConnectTimeout):
            return "unreachable", "an endpoint could not be reached: check the network, and FalQueueUrl or the AWS endpoint"
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, BotoCoreError):
        return "error", "an AWS call failed; the function's log has the details"
    return "error", "the function's log has the details (search it for the object key)"


class DeliveryFailures:
    def __init__(self, table: TableLike, *, ttl_days: int = 30) -> None:
        self._table = table
        self._ttl_seconds = ttl_days * 86400

    def record(self, upload_id: str, failure: DeliveryFailure) -> None:
        """Keep the failure for the upload's followers; a failure to keep it is logged, never raised."""
        try:
            self._table.put_item(
                Item={
                    **table_keys.failure(upload_id),
                    "key": failure.key,
                    "kind": failure.kind,
                    "reason": failure.reason,
                    "hint": failure.hint,
                    "delivery": failure.delivery,
                    "max_deliveries": failure.max_deliveries,
                    "at_ms": failure.at_ms,
                    "expires_at": failure.at_ms // 1000 + self._ttl_seconds,
                }
            )
        except (ClientError, BotoCoreError) as exc:
            logger.warning("the failed delivery could not be recorded for the upload's followers", extra={"reason": redact(str(exc))})

    def latest(self, upload_id: str) -> DeliveryFailure | None:
        item: dict[str, Any] | None = self._table.get_item(Key=table_keys.failure(upload_id), ConsistentRead=True).get("Item")
        if not item:
            return None
        return DeliveryFailure(
            key=str(item.get("key", "")),
            kind=str(item.get("kind", "error")),
            reason=str(item.get("reason", "")),
            hint=str(item.get("hint", "")),
            delivery=int(item.get("delivery", 0)),
            max_deliveries=int(item.get("max_deliveries", 0)),
            at_ms=int(item.get("at_ms", 0)),
        )
