"""One EventBridge event per ended job, for consumers who should not poll S3.

``detail-type`` is ``Kontext Edit Succeeded`` or ``Kontext Edit Failed``;
``source`` is ``EVENT_SOURCE`` (``kontext-s3``). Delivery is at least once: a
consumer deduplicates on ``detail.job_id``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kontext_s3.jobs import Job, JobState
from kontext_s3.redact import redact

if TYPE_CHECKING:
    from mypy_boto3_events import EventBridgeClient

SUCCEEDED = "Kontext Edit Succeeded"
FAILED = "Kontext Edit Failed"


class NotificationError(RuntimeError):
    pass


#: The version of the event detail (and of the HTTP notification body, which is the detail itself).
NOTIFICATION_VERSION = 1


def event_detail(job: Job) -> dict[str, Any]:
    """The event's detail, which is also the body POSTed to ``NotifyUrl``: stable, described by
    ``schemas/notification.schema.json``. New fields may be added; none is removed or changes meaning
    without a new ``kontext_s3_notification`` version."""
    succeeded = job.state is JobState.COMPLETED
    detail: dict[str, Any] = {
        "kontext_s3_notification": NOTIFICATION_VERSION,
        "job_id": job.job_id,
        "status": "succeeded" if succeeded else "failed",
        "state": job.state.value,
        "bucket": job.bucket,
        "input_key": job.key,
        "input_version_id": job.version_id,
        "output_prefix": job.output_prefix,
        "output_keys": list(job.output_keys) if succeeded else [],
        "manifest_key": job.manifest_key if succeeded else None,
        "error": None if succeeded else {"code": job.error_code, "message": job.error_message, "record_key": job.error_key},
        "request_id": job.request_id,
        "uploaded_at": job.event_time,
        "ended_at": job.updated_at,
    }
    if not succeeded:
        # The flat error fields of the first version of the event, kept for EventBridge rules that match on them.
        detail.update(error_key=job.error_key, error_code=job.error_code, error_message=job.error_message)
    return dict(redact(detail))


class JobEvents:
    def __init__(self, client: EventBridgeClient | None, *, bus_name: str, source: str, stack_bucket: str = "") -> None:
        self._client = client
        self._bus = bus_name
        self._source = source
        #: Named in every event's resources: the stack's rule matches it, whichever bucket the job's upload is in
        #: (an attached bucket's jobs are this stack's too; other stacks may share the bus).
        self._stack = [f"arn:aws:s3:::{stack_bucket}"] if stack_bucket else []

    @property
    def enabled(self) -> bool:
        return bool(self._client and self._bus)

    def ended(self, job: Job) -> None:
        if not self._client or not self._bus:
            return
        result = self._client.put_events(
            Entries=[
                {
                    "EventBusName": self._bus,
                    "Source": self._source,
                    "DetailType": SUCCEEDED if job.state is JobState.COMPLETED else FAILED,
                    "Resources": [f"arn:aws:s3:::{job.bucket}/{job.key}", *self._stack],
                    "Detail": json.dumps(event_detail(job)),
                }
            ]
        )
        if result.get("FailedEntryCount"):
            raise NotificationError(f"EventBridge refused the event: {result.get('Entries')}")
