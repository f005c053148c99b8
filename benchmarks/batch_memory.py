"""Peak memory of the submit function on one SQS batch of sideways phone photos, as deployed.

Each photo is stored sideways (EXIF orientation 6), so the submit function must decode it, turn it upright and
write a prepared copy. The batch's records run on ten threads of one execution environment: python3.13, the built
artifact, the template's environment (``MALLOC_ARENA_MAX`` included). The uploads' own S3 notifications are handed to the
function as one batch; the figure is the environment's peak resident memory (``VmHWM``), read from the process after
the batch. Lambda kills a function that passes its memory size.
"""

from __future__ import annotations

import io
import time
from typing import Any

from PIL import Image

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import JobState
from kontext_s3.s3_events import parse_notification
from kontext_s3_tools.load import _peak_rss_mb
from kontext_s3_tools.local_stack import LocalStack, sqs_event


def sideways_photo(width: int, height: int, shade: int) -> bytes:
    """A ``width`` x ``height`` JPEG stored sideways, as a phone stores a portrait photo (EXIF orientation 6)."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    image.paste((shade, 80, 200), (0, 0, width // 5, height // 5))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, exif=exif.tobytes())
    return out.getvalue()


def stack_for_one_batch(**parameters: str) -> LocalStack:
    # No admission: every photo is prepared and sent in the one invocation measured.
    return LocalStack(recovery_interval_seconds=None, parameters={"MaxJobsAtFal": "0", **parameters})


def peak_of_one_batch(stack: LocalStack, *, count: int, width: int, height: int, prefix: str) -> dict[str, Any]:
    """Upload ``count`` sideways photos and hand their events to the submit function as one batch, as SQS would.

    The stack's own poller is stopped first (its pollers would split the events into several batches): the batch is
    the uploads' real S3 notifications, received from the queue and invoked in one execution environment.
    """
    target = stack.target()
    s3, sqs = target.client("s3"), target.client("sqs")
    stack.poller.stop()
    queue_url = stack.resources.queue_url
    while sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages"):
        pass  # the s3:TestEvent, and nothing else: this stack has had no upload yet
    photos = [sideways_photo(width, height, 40 + 20 * i) for i in range(count)]
    for index, photo in enumerate(photos):
        key = f"{target.input_prefix}{prefix}/photo-{index}.jpg"
        s3.put_object(Bucket=target.bucket, Key=key, Body=photo, Tagging="prompt=Add%20a%20hat")
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(messages) < count and time.monotonic() < deadline:
        messages += sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageSystemAttributeNames=["All"]
        ).get("Messages", [])
    assert len(messages) == count, f"{len(messages)} of {count} upload events"
    submit = stack.functions[stack.function_id("submit")]
    started = time.monotonic()
    response = submit.invoke(sqs_event(messages, stack.resources.queue_arn))
    seconds = time.monotonic() - started
    peaks = [peak for pid in submit.pids() if (peak := _peak_rss_mb(pid)) is not None]
    jobs = target.jobs()
    assert jobs is not None
    prepared = 0
    for message in messages:
        for change in parse_notification(message["Body"]):
            version = s3.head_object(Bucket=change.bucket, Key=change.key)["VersionId"]
            job = jobs.get(derive_job_id(change.bucket, change.key, version))
            prepared += bool(job and job.state is not JobState.FAILED and (job.image or {}).get("prepared"))
    return {
        "photos": count,
        "megapixels": round(width * height / 1e6, 1),
        "upload_mb": round(sum(len(p) for p in photos) / 1e6, 1),
        "failed_records": len(response.get("batchItemFailures", [])),
        "prepared": prepared,
        "peak_rss_mb": max(peaks) if peaks else None,
        "memory_size_mb": submit.spec.memory_mb,
        "seconds": round(seconds, 1),
    }
