"""The uploads dead-letter queue: what is in it and why (``kontext-s3 dlq list``), and moving it back (``dlq redrive``).

SQS's own move task (``start_message_move_task``) moves a whole queue, not one
upload's message, and moto's server lacks it: a redrive here is send, then delete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from kontext_s3.admission import is_dispatch
from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import JobStore
from kontext_s3.output_store import ERROR_NAME, OutputLayout
from kontext_s3.s3_events import ObjectChange

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import MessageTypeDef

#: Why an upload's message ended in the DLQ, or None when no record says.
Reasons = Callable[[ObjectChange], str | None]


@dataclass(frozen=True)
class DeadLetter:
    message_id: str
    receipt_handle: str
    body: str
    keys: tuple[str, ...]  # the objects an S3 notification is about (URL-decoded); () for any other body
    receive_count: int  # SQS's count, which includes the receive that read it here
    sent_at: datetime | None
    first_received_at: datetime | None
    reason: str | None
    note: str | None = None  # what the body is when it is not an S3 notification (a dispatch signal, garbage)


def list_dead_letters(sqs: SQSClient, dlq_url: str, reasons: Reasons | None = None, visibility: int = 30) -> list[DeadLetter]:
    """Every message in the DLQ, left there and visible again."""
    messages = _read(sqs, dlq_url, visibility)
    try:
        return [_dead_letter(message, reasons) for message in messages]
    finally:
        _release(sqs, dlq_url, messages)


def redrive(
    sqs: SQSClient, dlq_url: str, queue_url: str, *, key: str | None = None, everything: bool = False, visibility: int = 120
) -> list[DeadLetter]:
    """Move the messages about ``key`` (or ``everything``) back to the uploads queue; returns those moved."""
    if (key is not None) == everything:
        raise ValueError("redrive needs exactly one of key or everything")
    messages = _read(sqs, dlq_url, visibility)
    moved: list[DeadLetter] = []
    try:
        for letter in (_dead_letter(message, None) for message in messages):
            if everything or key in letter.keys:
                # Send before delete: a crash in between duplicates the message, and the
                # submit function ignores an upload whose job already ended; a loss is silent.
                sqs.send_message(QueueUrl=queue_url, MessageBody=letter.body)
                sqs.delete_message(QueueUrl=dlq_url, ReceiptHandle=letter.receipt_handle)
                moved.append(letter)
    finally:
        gone = {letter.message_id for letter in moved}
        _release(sqs, dlq_url, [message for message in messages if message["MessageId"] not in gone])
    return moved


def failure_reasons(s3: S3Client, layout: OutputLayout, jobs: JobStore | None = None) -> Reasons:
    """From the upload's jobs when its event names a version (real S3), so its upload id; else from the key's newest
    ``error.json`` (the table has no index by key, and moto's events name no version)."""

    def reason(change: ObjectChange) -> str | None:
        found = jobs.jobs_of_upload(derive_job_id(change.bucket, change.key, change.version_id)) if jobs and change.version_id else []
        # The newest job that says something (one per edit); an open one may hold its last transient fault, without a code.
        job = next((job for job in reversed(found) if job.error_message), None)
        if found:
            return _say(job.error_code, job.error_message) if job else None
        return _newest_error(s3, change.bucket, layout, change.key, change.version_id)

    return reason


def _read(sqs: SQSClient, queue_url: str, visibility: int) -> list[MessageTypeDef]:
    seen: dict[str, MessageTypeDef] = {}
    while True:
        # One second of long polling: a short poll samples only some of SQS's servers and may come back empty early.
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=visibility, WaitTimeSeconds=1, MessageSystemAttributeNames=["All"]
        ).get("Messages", [])
        repeated = any(message["MessageId"] in seen for message in messages)
        # A message seen again keeps only its newest receipt handle: SQS may ignore older ones.
        seen.update((message["MessageId"], message) for message in messages)
        if not messages or repeated:
            return list(seen.values())


def _release(sqs: SQSClient, queue_url: str, messages: list[MessageTypeDef]) -> None:
    # Failures are not retried: such a message reappears once its short visibility timeout ends anyway.
    for start in range(0, len(messages), 10):
        batch = messages[start : start + 10]
        entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0} for i, m in enumerate(batch)]
        sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)  # type: ignore[arg-type]


def _dead_letter(message: MessageTypeDef, reasons: Reasons | None) -> DeadLetter:
    body = message.get("Body", "")
    changes, note = _parse(body)
    attributes = message.get("Attributes", {})
    sent, first = (attributes.get(name) for name in ("SentTimestamp", "ApproximateFirstReceiveTimestamp"))
    reason = next(filter(None, map(reasons, changes)), None) if reasons else None
    keys = tuple(change.key for change in changes)
    count = int(attributes.get("ApproximateReceiveCount", 0))
    return DeadLetter(message["MessageId"], message["ReceiptHandle"], body, keys, count, _time(sent), _time(first), reason, note)


def _parse(body: str) -> tuple[list[ObjectChange], str | None]:
    """The changes an S3 notification names (leniently: a record refused for a missing field still shows its key), or a note."""
    if is_dispatch(body):
        return [], "dispatch signal (a slot was freed)"
    try:
        document: Any = json.loads(body)
        changes = [_change(record) for record in document["Records"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        changes = []
    if changes:
        return changes, None
    return [], f"not an S3 notification: {body[:80]!r}"


def _change(record: dict[str, Any]) -> ObjectChange:
    s3, obj = record["s3"], record["s3"]["object"]
    # S3 event keys are URL-encoded, '+' for spaces.
    key, bucket = unquote_plus(obj["key"]), str(s3.get("bucket", {}).get("name", ""))
    version, etag, sequencer = (obj.get(name) or None for name in ("versionId", "eTag", "sequencer"))
    return ObjectChange(
        event_name=record.get("eventName", ""),
        bucket=bucket,
        key=key,
        version_id=version,
        etag=etag,
        sequencer=sequencer,
        size=obj.get("size"),
        event_time=record.get("eventTime", ""),
    )


def _newest_error(s3: S3Client, bucket: str, layout: OutputLayout, key: str, version_id: str | None) -> str | None:
    # The folder's own runs only: a dummy 32-character job id keeps the layout's long-key rule exact.
    folder = layout.job_prefix(key, "-" * 32)[:-33]
    found = [
        item
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder)
        for item in page.get("Contents", [])
        if item["Key"].count("/") == folder.count("/") + 1 and item["Key"].endswith("/" + ERROR_NAME)
    ]
    for item in sorted(found, key=lambda item: item["LastModified"], reverse=True):
        record = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
        source = (record.get("source") or {}) if isinstance(record, dict) else {}
        # Shared folders (``_long-keys/``) hold other keys' runs, and the key's folder its other versions'.
        if source.get("key") == key and (version_id is None or source.get("version_id") in (version_id, None)):
            return _say(record.get("code"), record.get("message"))
    return None


def _say(code: Any, message: Any) -> str | None:
    return ": ".join(str(part) for part in (code, message) if part) or None


def _time(ms: str | None) -> datetime | None:
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC) if ms else None
