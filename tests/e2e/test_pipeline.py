"""Upload -> submit -> emulator -> webhook -> outputs, through the local stack, as a user sees it."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from kontext_s3.jobs import JobState
from kontext_s3.s3_events import parse_notification
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack
from tests.helpers import eventually, jpeg_bytes

pytestmark = pytest.mark.e2e


def image_file(tmp_path: Path, name: str = "photo.jpg", color: tuple[int, int, int] = (90, 140, 200)) -> Path:
    path = tmp_path / name
    path.write_bytes(jpeg_bytes(160, 120, color))
    return path


def test_an_upload_becomes_edited_images_and_a_manifest(stack: LocalStack, tmp_path: Path) -> None:
    target = stack.target()
    fields = {
        "prompt": "Make it look like a rainy night, with neon signs; keep the bag's text!",
        "num_images": 3,
        "seed": 9,
        "aspect_ratio": "1:1",
    }
    uploaded = cli.upload_image(target, image_file(tmp_path), fields, key="inputs/e2e/rainy night.jpg")
    result = cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None)
    assert result.succeeded and result.manifest is not None
    assert result.manifest["input"]["prompt"] == fields["prompt"]
    assert result.manifest["output"]["seed"] == 9
    keys = [image["key"] for image in result.manifest["images"]]
    assert keys == [f"outputs/e2e/rainy night.jpg/{uploaded.job_id}/image-{i}.jpg" for i in range(3)]
    assert all((image["width"], image["height"]) == (120, 120) for image in result.manifest["images"])  # 1:1 crop
    saved = cli.download(target, result, tmp_path / "out")
    assert [p.name for p in saved] == ["image-0.jpg", "image-1.jpg", "image-2.jpg", "manifest.json"]
    assert stack.accepted_requests_per_job() == Counter({uploaded.job_id: 1})


def test_the_cli_round_trip(stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in stack.cli_environment().items():
        monkeypatch.setenv(name, value)
    image = image_file(tmp_path, "cli.jpg")
    code = cli.main(
        [
            "upload",
            str(image),
            "--prompt",
            "Add a red umbrella, please.",
            "--num-images",
            "2",
            "--key",
            "inputs/cli/cli.jpg",
            "--wait",
            "--download",
            str(tmp_path / "dl"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    job_id = out.split("job ", 1)[1].split(";", 1)[0]
    assert f"outputs/cli/cli.jpg/{job_id}/image-1.jpg" in out
    assert (tmp_path / "dl" / job_id / "image-0.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert cli.main(["status", "inputs/cli/cli.jpg"]) == 0
    status = capsys.readouterr().out
    assert "state    COMPLETED" in status and "SUBMITTING" in status and "SUBMITTED" in status
    # Bad arguments are refused by the model's schema before anything is uploaded.
    assert cli.main(["upload", str(image), "--prompt", "x", "--num-images", "7"]) == cli.EXIT_USAGE
    assert "num_images" in capsys.readouterr().err
    assert len(stack.emulator.requests) == 1


def test_duplicate_s3_events_give_one_fal_request_and_one_output_set(stack: LocalStack, tmp_path: Path) -> None:
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "duplicate me"}, key="inputs/e2e/dup.jpg")
    head = stack.client("s3").head_object(Bucket=target.bucket, Key=uploaded.key)
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-24T10:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "s3": {
            "bucket": {"name": target.bucket},
            "object": {
                "key": "inputs/e2e/dup.jpg",
                "eTag": head["ETag"].strip('"'),
                "versionId": uploaded.version_id,
                "size": head["ContentLength"],
                "sequencer": "00A",
            },
        },
    }
    body = json.dumps({"Records": [record]})
    assert parse_notification(body)[0].version_id == uploaded.version_id
    sqs = stack.client("sqs")
    for _ in range(3):  # S3 delivers at least once: here, three more times
        sqs.send_message(QueueUrl=stack.resources.queue_url, MessageBody=body)
    result = cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None)
    assert result.succeeded
    eventually(
        lambda: (
            int(
                stack.client("sqs").get_queue_attributes(
                    QueueUrl=stack.resources.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
                )["Attributes"]["ApproximateNumberOfMessages"]
            )
            == 0
        ),
        what="queue drained",
    )
    time.sleep(1)
    assert stack.accepted_requests_per_job() == Counter({uploaded.job_id: 1})
    listing = stack.client("s3").list_object_versions(Bucket=target.bucket, Prefix=uploaded.output_prefix)
    assert sorted(v["Key"] for v in listing["Versions"]) == [
        f"{uploaded.output_prefix}image-0.jpg",
        f"{uploaded.output_prefix}manifest.json",
    ]


def test_a_lost_webhook_leaves_the_job_visibly_open(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stack.emulator.set_faults(lose_webhook=1)
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "lost"}, key="inputs/e2e/lost.jpg")
    eventually(lambda: any(r.status == "COMPLETED" for r in stack.emulator.requests.values()), what="fal to finish")
    time.sleep(1.0)
    job = stack.jobs().get(uploaded.job_id)
    assert job is not None and job.state is JobState.SUBMITTED
    assert cli.read_result(target, uploaded.job_id, uploaded.output_prefix) is None
    for name, value in stack.cli_environment().items():
        monkeypatch.setenv(name, value)
    assert cli.main(["status", uploaded.job_id]) == 0
    assert "state    SUBMITTED" in capsys.readouterr().out


def test_a_webhook_that_fails_is_retried_by_fal_until_it_lands(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(fail_webhook_attempts=2)
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "third time lucky"}, key="inputs/e2e/retry.jpg")
    assert cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None).succeeded
    attempts = [d for d in stack.emulator.deliveries if d.get("attempt")]
    assert [d["attempt"] for d in attempts] == [1, 2, 3] and attempts[-1]["status_code"] == 200


def test_a_fal_error_gives_an_error_record(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(error_result=1)
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "this one fails"}, key="inputs/e2e/error.jpg")
    result = cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None)
    assert not result.succeeded and result.error is not None
    assert result.error["code"] == "fal_error"
    assert "emulator fault" in result.error["message"]
    job = stack.jobs().get(uploaded.job_id)
    assert job is not None and job.state is JobState.FAILED


def test_a_429_storm_ends_with_every_upload_edited_once(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(submit_429=12, submit_5xx=3)
    target = stack.target()
    uploads = [
        cli.upload_image(
            target, image_file(tmp_path, f"storm-{i}.jpg", (i * 20, 100, 50)), {"prompt": f"storm {i}"}, key=f"inputs/e2e/storm/{i}.jpg"
        )
        for i in range(8)
    ]
    results = [cli.wait_for_result(target, u, timeout=90, progress=lambda _: None) for u in uploads]
    assert all(r.succeeded for r in results)
    assert stack.accepted_requests_per_job() == Counter({u.job_id: 1 for u in uploads})


def test_fal_down_for_good_ends_in_the_dlq_with_a_recorded_failure(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(submit_5xx=100_000)
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "nobody home"}, key="inputs/e2e/down.jpg")
    result = cli.wait_for_result(target, uploaded, timeout=90, progress=lambda _: None)
    assert result.error is not None and result.error["code"] == "fal_unavailable" and result.error["retryable"]
    sqs = stack.client("sqs")
    dead = eventually(
        lambda: sqs.receive_message(QueueUrl=stack.resources.dlq_url, WaitTimeSeconds=1).get("Messages"), timeout=30, what="the DLQ"
    )
    assert parse_notification(dead[0]["Body"])[0].key == "inputs/e2e/down.jpg"
    sqs.delete_message(QueueUrl=stack.resources.dlq_url, ReceiptHandle=dead[0]["ReceiptHandle"])
    assert stack.emulator.requests == {}


def test_a_poison_message_ends_in_the_dlq_not_in_a_loop(stack: LocalStack) -> None:
    sqs = stack.client("sqs")
    sqs.send_message(QueueUrl=stack.resources.queue_url, MessageBody="definitely not an S3 event")
    dead = eventually(
        lambda: sqs.receive_message(QueueUrl=stack.resources.dlq_url, WaitTimeSeconds=1).get("Messages"), timeout=30, what="the DLQ"
    )
    assert dead[0]["Body"] == "definitely not an S3 event"
    sqs.delete_message(QueueUrl=stack.resources.dlq_url, ReceiptHandle=dead[0]["ReceiptHandle"])


def test_the_cli_finds_the_bucket_and_table_in_the_stack_outputs(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = {
        "InputBucketName": stack.resources.bucket,
        "JobsTableName": stack.resources.table,
        "InputPrefix": stack.resources.input_prefix,
        "OutputPrefix": stack.resources.output_prefix,
    }
    template = {
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {name: {"Value": value} for name, value in outputs.items()},
    }
    stack.client("cloudformation").create_stack(StackName="kontext-s3-cli-test", TemplateBody=json.dumps(template))
    for name, value in stack.cli_environment().items():
        monkeypatch.setenv(name, value)  # the stack's endpoint and administrator credentials
    for name in ("KONTEXT_S3_BUCKET", "KONTEXT_S3_TABLE"):
        monkeypatch.delenv(name, raising=False)
    image = image_file(tmp_path, "stacked.jpg")
    code = cli.main(
        [
            "--stack",
            "kontext-s3-cli-test",
            "--region",
            "us-east-1",
            "upload",
            str(image),
            "--prompt",
            "from the stack outputs",
            "--key",
            "inputs/cli/stacked.jpg",
            "--wait",
        ]
    )
    assert code == 0, capsys.readouterr()
    assert "outputs/cli/stacked.jpg/" in capsys.readouterr().out
    assert cli.main(["--region", "us-east-1", "upload", str(image), "--prompt", "x"]) == cli.EXIT_USAGE
    assert "no bucket" in capsys.readouterr().err


def test_a_duplicated_webhook_gives_one_output_set(stack: LocalStack, tmp_path: Path) -> None:
    stack.emulator.set_faults(duplicate_webhook=1, file_delay_ms=100)
    target = stack.target()
    uploaded = cli.upload_image(target, image_file(tmp_path), {"prompt": "twice", "num_images": 2}, key="inputs/e2e/twice.jpg")
    assert cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None).succeeded
    # The duplicate is refused (409) while the first delivery finishes, then retried by fal for up to ~25 s.
    eventually(lambda: len([d for d in stack.emulator.deliveries if d.get("status_code") == 200]) == 2, timeout=45, what="both deliveries")
    job = stack.jobs().get(uploaded.job_id)
    assert job is not None and [h.state for h in job.history].count(JobState.COMPLETED) == 1
    versions = stack.client("s3").list_object_versions(Bucket=target.bucket, Prefix=uploaded.output_prefix)["Versions"]
    etags: dict[str, set[str]] = {}
    for version in versions:
        etags.setdefault(version["Key"], set()).add(version["ETag"])
    assert sorted(etags) == [f"{uploaded.output_prefix}{name}" for name in ("image-0.jpg", "image-1.jpg", "manifest.json")]
    assert all(len(tags) == 1 for tags in etags.values())  # a second write, if any, was identical
