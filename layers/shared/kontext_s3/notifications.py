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


def event_detail(job: Job) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "job_id": job.job_id,
        "state": job.state.value,
        "bucket": job.bucket,
        "input_key": job.key,
        "input_version_id": job.version_id,
        "output_prefix": job.output_prefix,
        "request_id": job.request_id,
        "uploaded_at": job.event_time,
        "ended_at": job.updated_at,
    }
    if job.state is JobState.COMPLETED:
        detail.update(output_keys=job.output_keys, manifest_key=job.manifest_key)
    else:
        detail.update(error_key=job.error_key, error_code=job.error_code, error_message=job.error_message)
    return dict(redact(detail))


class JobEvents:
    def __init__(self, client: EventBridgeClient | None, *, bus_name: str, source: str) -> None:
        self._client = client
        self._bus = bus_name
        self._source = source

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
                    "Resources": [f"arn:aws:s3:::{job.bucket}/{job.key}"],
                    "Detail": json.dumps(event_detail(job)),
                }
            ]
        )
        if result.get("FailedEntryCount"):
            raise NotificationError(f"EventBridge refused the event: {result.get('Entries')}")
