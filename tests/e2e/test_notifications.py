"""HTTP notifications (NotifyUrl): one POST per finished job, failures included, through the template's API destination."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack
from tests.e2e.conftest import NotificationReceiver
from tests.helpers import jpeg_bytes

pytestmark = pytest.mark.e2e

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "notification.schema.json").read_text())


def secret_password(stack: LocalStack) -> str:
    outputs = stack.resources.stack
    arn = next(outputs.ensure(lid)["Ref"] for lid, _ in outputs.of_type("AWS::SecretsManager::Secret") if lid == "NotifySecret")
    value = stack.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
    return str(json.loads(value)["password"])


def wait_for_posts(receiver: NotificationReceiver, job_ids: list[str], timeout: float = 60.0) -> dict[str, list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = {job_id: receiver.received(job_id) for job_id in job_ids}
        if all(any(p["status"] == 200 for p in posts) for posts in seen.values()):
            time.sleep(1.0)  # room for a duplicate to show up, if one were coming
            return {job_id: receiver.received(job_id) for job_id in job_ids}
        time.sleep(0.2)
    raise AssertionError(f"no notification for some jobs: { {j: len(p) for j, p in seen.items()} }")


def test_each_finished_job_is_posted_once_failures_included(stack: LocalStack, receiver: NotificationReceiver, tmp_path: Path) -> None:
    target = stack.target()
    good = [
        cli.upload_bytes(
            target, jpeg_bytes(80, 60, (i * 40, 90, 10)), f"n{i}.jpg", {"prompt": f"notify {i}"}, key=f"inputs/e2e/notify/{i}.jpg"
        )
        for i in range(3)
    ]
    for uploaded in good:
        cli.wait_for_result(target, uploaded, timeout=90, progress=lambda _: None)
    stack.emulator.set_faults(error_result=1)  # fal runs the next request and reports an error
    bad = cli.upload_bytes(target, jpeg_bytes(), "bad.jpg", {"prompt": "this one fails at fal"}, key="inputs/e2e/notify/bad.jpg")
    cli.wait_for_result(target, bad, timeout=90, progress=lambda _: None)

    posts = wait_for_posts(receiver, [u.job_id for u in [*good, bad]])
    assert {job_id: len(p) for job_id, p in posts.items()} == {u.job_id: 1 for u in [*good, bad]}
    password = secret_password(stack)
    for uploaded in good:
        (post,) = posts[uploaded.job_id]
        jsonschema.validate(post["body"], SCHEMA)
        assert post["headers"]["X-Kontext-S3-Key"] == password
        assert post["body"]["status"] == "succeeded" and post["body"]["input_key"] == uploaded.key
        assert post["body"]["manifest_key"] == f"{uploaded.output_prefix}manifest.json"
        assert post["body"]["output_keys"] and all(k.startswith(uploaded.output_prefix) for k in post["body"]["output_keys"])
    (failed,) = posts[bad.job_id]
    jsonschema.validate(failed["body"], SCHEMA)
    assert failed["body"]["status"] == "failed" and failed["body"]["output_keys"] == []
    assert failed["body"]["error"]["code"] == "fal_error" and failed["body"]["error"]["record_key"].endswith("error.json")


def test_a_consumer_that_fails_once_gets_the_notification_on_the_retry(
    stack: LocalStack, receiver: NotificationReceiver, tmp_path: Path
) -> None:
    target = stack.target()
    key = "inputs/e2e/notify/retry.jpg"
    uploaded = cli.upload_bytes(target, jpeg_bytes(70, 50, (1, 2, 3)), "retry.jpg", {"prompt": "retry me"}, key=key)
    receiver.answers[uploaded.job_id] = [503]
    cli.wait_for_result(target, uploaded, timeout=90, progress=lambda _: None)
    posts = wait_for_posts(receiver, [uploaded.job_id])[uploaded.job_id]
    assert [p["status"] for p in posts] == [503, 200]


def test_a_notification_the_consumer_refuses_ends_in_the_dead_letter_queue(
    stack: LocalStack, receiver: NotificationReceiver, tmp_path: Path
) -> None:
    target = stack.target()
    uploaded = cli.upload_bytes(
        target, jpeg_bytes(70, 50, (9, 9, 9)), "refused.jpg", {"prompt": "refuse me"}, key="inputs/e2e/notify/refused.jpg"
    )
    receiver.answers[uploaded.job_id] = [400]  # not retried by EventBridge: straight to the dead-letter queue
    cli.wait_for_result(target, uploaded, timeout=90, progress=lambda _: None)
    dlq_url = stack.resources.stack.ensure("NotifyDeadLetterQueue")["Ref"]
    sqs = stack.client("sqs")
    deadline = time.monotonic() + 30
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not found:
        messages = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"])
        found = [m for m in messages.get("Messages", []) if json.loads(m["Body"])["detail"]["job_id"] == uploaded.job_id]
    assert found, "the refused notification is not in the notification DLQ"
    assert found[0]["MessageAttributes"]["ERROR_CODE"]["StringValue"] == "400"
    assert [p["status"] for p in receiver.received(uploaded.job_id)] == [400]
