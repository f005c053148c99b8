"""Deleting an upload through the local stack: a request fal has not started is cancelled; one it started finishes.

(The same over the handlers alone, with the line and admission: tests/integration/test_cancellation.py.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kontext_s3.jobs import JobState
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack
from tests.e2e.test_pipeline import image_file
from tests.helpers import eventually

pytestmark = pytest.mark.e2e


def s3_removal_event(bucket: str, key: str, event_name: str, version_id: str) -> str:
    """The ObjectRemoved notification S3 sends (moto sends none for a delete marker, and no versionId)."""
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-24T10:00:00.000Z",
        "eventName": event_name,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.7"},
        "responseElements": {"x-amz-request-id": "0", "x-amz-id-2": "0"},
        "s3": {
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": key.replace(" ", "+"), "versionId": version_id, "sequencer": "00B"},
        },
    }
    return json.dumps({"Records": [record]})


@pytest.mark.parametrize("how", ["delete marker", "version deleted"])
def test_deleting_the_input_of_a_queued_job_cancels_it_at_fal(stack: LocalStack, tmp_path: Path, how: str) -> None:
    stack.emulator.set_faults(queue_ms=20_000)
    target = stack.target()
    key = f"inputs/recovery/deleted {how}.jpg"
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "never mind"}, key=key)
    eventually(lambda: (job := stack.jobs().get(uploaded.job_id)) is not None and job.state is JobState.SUBMITTED, what="submit")
    s3 = stack.client("s3")
    if how == "delete marker":
        marker = s3.delete_object(Bucket=target.bucket, Key=key)["VersionId"]
        body = s3_removal_event(target.bucket, key, "ObjectRemoved:DeleteMarkerCreated", marker)
    else:
        assert uploaded.version_id
        s3.delete_object(Bucket=target.bucket, Key=key, VersionId=uploaded.version_id)
        body = s3_removal_event(target.bucket, key, "ObjectRemoved:Delete", uploaded.version_id)
    stack.client("sqs").send_message(QueueUrl=stack.resources.queue_url, MessageBody=body)
    ended = eventually(lambda: (job := stack.jobs().get(uploaded.job_id)) is not None and job.state.ended and job, what="the cancellation")
    assert ended.state is JobState.FAILED and ended.error_code == "cancelled"
    assert [r.cancelled for r in stack.emulator.requests.values()] == [True]
    error = cli.read_result(target, uploaded.job_id, uploaded.output_prefix)
    assert error is not None and error.error is not None and "deleted" in error.error["message"]


def test_deleting_an_input_fal_already_started_lets_it_finish(stack: LocalStack, tmp_path: Path) -> None:
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "too late to cancel"}, key="inputs/recovery/late.jpg")
    assert cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None).succeeded
    marker = stack.client("s3").delete_object(Bucket=target.bucket, Key=uploaded.key)["VersionId"]
    stack.client("sqs").send_message(
        QueueUrl=stack.resources.queue_url,
        MessageBody=s3_removal_event(target.bucket, uploaded.key, "ObjectRemoved:DeleteMarkerCreated", marker),
    )
    time.sleep(2)
    job = stack.jobs().get(uploaded.job_id)
    assert job is not None and job.state is JobState.COMPLETED  # outputs of a finished job are kept
