"""Buckets people already have (issue 22), over the local stack: attached, unversioned, with consumers of their own.

The buckets are made before the stack, outside its template, as an operator's are: an unversioned photo bucket whose
notification configuration already feeds another team's queue, a bucket encrypted with a KMS key the stack is given,
and one encrypted with a key it is not given. The stack attaches all three (``AttachedBuckets``); ``kontext-s3 attach``
turns on their EventBridge delivery. What the README promises for unversioned buckets is what is paid here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import boto3
import pytest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobState
from kontext_s3.tag_codec import encode_tags, tagging_header
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack, aws_session
from tests.helpers import eventually as until
from tests.helpers import jpeg_bytes


@dataclass
class Existing:
    photos: str
    vault: str
    locked: str
    given_key: str
    other_key: str
    other_queue: str


@dataclass
class Attached:
    stack: LocalStack
    existing: Existing

    def s3(self) -> Any:
        return self.stack.client("s3")

    def posts(self) -> int:
        """Requests fal accepted (each one is paid)."""
        return len(self.stack.emulator.submits())

    def job(self, bucket: str, key: str) -> Job | None:
        head = self.s3().head_object(Bucket=bucket, Key=key)
        return self.stack.jobs().get(derive_job_id(bucket, key, None, head["ETag"].strip('"')))

    def ended(self, bucket: str, key: str) -> Job | None:
        job = self.job(bucket, key)
        return job if job is not None and job.state.ended else None


def make_existing(endpoint: str, admin: Credentials) -> tuple[Existing, dict[str, str]]:
    session = aws_session(admin)
    # Typed loosely: the test writes the requests as the operator's tools would.
    s3: Any = session.client("s3", endpoint_url=endpoint)
    kms: Any = session.client("kms", endpoint_url=endpoint)
    sqs: Any = session.client("sqs", endpoint_url=endpoint)
    suffix = uuid.uuid4().hex[:8]
    existing = Existing(
        photos=f"team-photos-{suffix}",
        vault=f"team-vault-{suffix}",
        locked=f"team-locked-{suffix}",
        given_key=kms.create_key(Description="the vault's key")["KeyMetadata"]["Arn"],
        other_key=kms.create_key(Description="a key the stack is not given")["KeyMetadata"]["Arn"],
        other_queue=sqs.create_queue(QueueName=f"another-team-{suffix}")["QueueUrl"],
    )
    other_arn = sqs.get_queue_attributes(QueueUrl=existing.other_queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    for bucket in (existing.photos, existing.vault, existing.locked):
        s3.create_bucket(Bucket=bucket)  # unversioned, as most existing buckets are
    s3.put_bucket_notification_configuration(
        Bucket=existing.photos,
        NotificationConfiguration={
            "QueueConfigurations": [{"Id": "another-team", "QueueArn": other_arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    for bucket, key in ((existing.vault, existing.given_key), (existing.locked, existing.other_key)):
        rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key}}
        s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [rule]})
    # An image from before the stack: no event will ever name it (backfill's job).
    s3.put_object(Bucket=existing.photos, Key="inputs/archive/2019.jpg", Body=jpeg_bytes(64, 48, (10, 200, 90)))
    parameters = {
        "AttachedBuckets": ",".join((existing.photos, existing.vault, existing.locked)),
        "AttachedKmsKeyArns": existing.given_key,
        "MaxJobsAtFal": "1",  # so an upload can be made to wait in line
        "TagWaitSeconds": "3",  # a backfill waits out an upload's own tag wait; the archive's is long over
    }
    return existing, parameters


@pytest.fixture(scope="module")
def attached() -> Iterator[Attached]:
    made: list[Existing] = []

    def before_deploy(endpoint: str, admin: Credentials) -> dict[str, str]:
        existing, parameters = make_existing(endpoint, admin)
        made.append(existing)
        return parameters

    with LocalStack(before_deploy=before_deploy, recovery_interval_seconds=None) as stack:
        yield Attached(stack, made[0])


@pytest.fixture
def run_cli(attached: Attached, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    for name, value in attached.stack.cli_environment().items():
        monkeypatch.setenv(name, value)

    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(list(argv))
        return code, capsys.readouterr().out

    return run


def upload(attached: Attached, bucket: str, key: str, body: bytes, fields: dict[str, Any] | None = None) -> None:
    tags = tagging_header(encode_tags(fields)) if fields else ""
    attached.s3().put_object(Bucket=bucket, Key=key, Body=body, **({"Tagging": tags} if tags else {}))


def test_1_attach_turns_on_eventbridge_and_keeps_the_buckets_own_notifications(
    attached: Attached, run_cli: Callable[..., tuple[int, str]]
) -> None:
    existing = attached.existing
    code, out = run_cli("attach", "--check", existing.photos)
    assert code == 1 and "off" in out
    code, out = run_cli("attach", existing.photos, existing.vault, existing.locked)
    assert code == 0, out
    code, out = run_cli("attach", "--check", existing.photos, existing.vault, existing.locked)
    assert code == 0, out
    config = attached.s3().get_bucket_notification_configuration(Bucket=existing.photos)
    assert "EventBridgeConfiguration" in config
    assert [c["Id"] for c in config["QueueConfigurations"]] == ["another-team"]


def test_2_a_tagged_upload_completes_with_outputs_beside_it(attached: Attached) -> None:
    photos = attached.existing.photos
    upload(attached, photos, "inputs/shoes/red shoe+1.jpg", jpeg_bytes(64, 48, (200, 30, 30)), {"prompt": "Make it blue"})
    job = until(lambda: attached.ended(photos, "inputs/shoes/red shoe+1.jpg"), timeout=60, what="the attached upload's job")
    assert job.state is JobState.COMPLETED, job.error_message
    assert job.output_prefix.startswith("outputs/shoes/red shoe+1.jpg/")
    manifest = json.loads(attached.s3().get_object(Bucket=photos, Key=job.output_prefix + "manifest.json")["Body"].read())
    assert manifest["input"]["prompt"] == "Make it blue"
    # fal was given the bytes as uploaded: a pinned copy, since an unversioned key may change under a waiting job.
    assert manifest["source"]["etag"] == job.etag
    assert manifest["input_image"]["prepared"]["changes"][0]["change"] == "pinned"
    for output in job.output_keys:
        attached.s3().head_object(Bucket=photos, Key=output)


def test_3_a_folder_recipe_edits_uploads_with_no_tags(attached: Attached) -> None:
    photos = attached.existing.photos
    recipe = json.dumps({"prompt": "Put it on a white background"}).encode()
    attached.s3().put_object(Bucket=photos, Key="inputs/catalogue/_kontext.json", Body=recipe)
    time.sleep(1.1)  # the recipe stands before the upload arrives (S3 stamps to the second here)
    upload(attached, photos, "inputs/catalogue/bag.jpg", jpeg_bytes(64, 48, (90, 90, 10)))
    job = until(lambda: attached.ended(photos, "inputs/catalogue/bag.jpg"), timeout=60, what="the recipe's job")
    assert job.state is JobState.COMPLETED, job.error_message
    manifest = json.loads(attached.s3().get_object(Bucket=photos, Key=job.output_prefix + "manifest.json")["Body"].read())
    assert manifest["input"]["prompt"] == "Put it on a white background"


def test_4_a_duplicate_event_and_a_same_bytes_rewrite_pay_nothing_and_new_bytes_pay_once(attached: Attached) -> None:
    photos, key = attached.existing.photos, "inputs/dup/hat.jpg"
    body = jpeg_bytes(64, 48, (10, 10, 200))
    upload(attached, photos, key, body, {"prompt": "Make it red"})
    first = until(lambda: attached.ended(photos, key), timeout=60, what="the first job")
    assert first.state is JobState.COMPLETED
    paid = attached.posts()

    # S3 delivers at least once: the same event again, as EventBridge would send it.
    head = attached.s3().head_object(Bucket=photos, Key=key)
    again = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "123456789012",
        "time": "2026-12-07T00:00:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:s3:::{photos}"],
        "detail": {
            "bucket": {"name": photos},
            "object": {"key": key, "etag": head["ETag"].strip('"'), "sequencer": "00"},
            "reason": "PutObject",
        },
    }
    sqs = attached.stack.client("sqs")
    sqs.send_message(QueueUrl=attached.stack.resources.queue_url, MessageBody=json.dumps(again))
    # The same bytes written again (a sync tool re-uploading): the same upload.
    upload(attached, photos, key, body, {"prompt": "Make it red"})
    time.sleep(6)
    assert attached.posts() == paid
    assert len([i for i in attached.stack.jobs().table.scan()["Items"] if i.get("key") == key]) == 1

    # Other bytes under the same key: a new upload, paid once.
    upload(attached, photos, key, jpeg_bytes(64, 48, (250, 250, 0)), {"prompt": "Make it red"})
    second = until(lambda: attached.ended(photos, key), timeout=60, what="the overwrite's job")
    assert second.job_id != first.job_id and second.state is JobState.COMPLETED
    assert attached.posts() == paid + 1


def test_5_a_delete_cancels_the_keys_latest_upload_in_line_and_the_same_bytes_again_start_it_again(attached: Attached) -> None:
    photos = attached.existing.photos
    emulator = attached.stack.emulator
    emulator.set_faults(processing_ms=12_000)
    blocker, key = "inputs/line/blocker.jpg", "inputs/line/waits.jpg"
    first_bytes, second_bytes = jpeg_bytes(64, 48, (3, 2, 1)), jpeg_bytes(64, 48, (9, 9, 9))
    try:
        upload(attached, photos, blocker, jpeg_bytes(64, 48, (1, 2, 3)), {"prompt": "Make it night"})
        until(lambda: (j := attached.job(photos, blocker)) and j.state is JobState.SUBMITTED, timeout=30, what="fal's one slot")
        paid = attached.posts()
        upload(attached, photos, key, first_bytes, {"prompt": "Make it night"})
        overwritten = until(lambda: (j := attached.job(photos, key)) and j.state is JobState.WAITING and j, timeout=30, what="the line")
        upload(attached, photos, key, second_bytes, {"prompt": "Make it night"})  # other bytes: a new upload, in line too
        latest = until(
            lambda: (j := attached.job(photos, key)) and j.job_id != overwritten.job_id and j.state is JobState.WAITING and j,
            timeout=30,
            what="the overwrite in line",
        )
        attached.s3().delete_object(Bucket=photos, Key=key)
        cancelled = until(lambda: (j := attached.stack.jobs().get(latest.job_id)) and j.state.ended and j, timeout=30, what="the cancel")
        assert (cancelled.state, cancelled.error_code) == (JobState.FAILED, "cancelled")
        # Cancelled by the delete itself (latest_uploads), while fal still runs the blocker: not found later by the line.
        assert attached.stack.jobs().get(attached.job(photos, blocker).job_id).state is JobState.SUBMITTED  # type: ignore[union-attr]
        assert attached.posts() == paid
    finally:
        emulator.set_faults(processing_ms=0)
    # The overwritten upload was not deleted: it goes on, with the bytes it was uploaded with (its pinned copy).
    done = until(lambda: (j := attached.stack.jobs().get(overwritten.job_id)) and j.state.ended and j, timeout=90, what="the overwritten")
    assert done.state is JobState.COMPLETED, done.error_message
    # The user uploads the cancelled bytes again: the same upload, never sent, so it runs now (once).
    upload(attached, photos, key, second_bytes, {"prompt": "Make it night"})
    again = until(lambda: (j := attached.stack.jobs().get(latest.job_id)) and j.state is JobState.COMPLETED and j, timeout=60, what="again")
    assert again.job_id == latest.job_id
    assert attached.stack.accepted_requests_per_job()[latest.job_id] == 1


def test_6_backfill_starts_what_was_in_the_bucket_before_the_stack(attached: Attached, run_cli: Callable[..., tuple[int, str]]) -> None:
    photos = attached.existing.photos
    code, out = run_cli("backfill", "--bucket", photos, "archive/", "--prompt", "Restore the colours")
    assert code == 0, out
    job = until(lambda: attached.ended(photos, "inputs/archive/2019.jpg"), timeout=60, what="the backfilled job")
    assert job.state is JobState.COMPLETED, job.error_message


def test_7_a_kms_bucket_works_with_its_key_and_fails_clearly_without(attached: Attached) -> None:
    existing = attached.existing
    upload(attached, existing.vault, "inputs/secret.jpg", jpeg_bytes(64, 48, (5, 5, 5)), {"prompt": "Make it blue"})
    job = until(lambda: attached.ended(existing.vault, "inputs/secret.jpg"), timeout=60, what="the vault's job")
    assert job.state is JobState.COMPLETED, job.error_message
    assert (
        attached.s3().head_object(Bucket=existing.vault, Key=job.output_keys[0])["SSEKMSKeyId"].endswith(existing.given_key.rsplit("/")[-1])
    )

    paid = attached.posts()
    upload(attached, existing.locked, "inputs/locked.jpg", jpeg_bytes(64, 48, (6, 6, 6)), {"prompt": "Make it blue"})
    failed = until(lambda: attached.ended(existing.locked, "inputs/locked.jpg"), timeout=60, what="the locked bucket's job")
    assert (failed.state, failed.error_code) == (JobState.FAILED, "input_unreadable")
    assert existing.other_key in (failed.error_message or "") and "AttachedKmsKeyArns" in (failed.error_message or "")
    assert attached.posts() == paid


def test_8_the_functions_reach_only_the_input_and_output_prefixes_of_an_attached_bucket(attached: Attached) -> None:
    photos = attached.existing.photos
    attached.s3().put_object(Bucket=photos, Key="private/payroll.jpg", Body=b"not yours")
    submit = attached.stack.functions["SubmitFunction"]
    env = submit.spec.credentials()
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=env["AWS_SESSION_TOKEN"],
    )
    client.head_object(Bucket=photos, Key="inputs/archive/2019.jpg")  # its input prefix: allowed
    for call in (
        lambda: client.get_object(Bucket=photos, Key="private/payroll.jpg"),
        lambda: client.put_object(Bucket=photos, Key="inputs/planted.jpg", Body=b"x"),
        lambda: client.put_object(Bucket=photos, Key="private/planted.jpg", Body=b"x"),
    ):
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] in ("AccessDenied", "403")


def test_9_the_buckets_own_consumers_still_hear_from_it(attached: Attached) -> None:
    existing = attached.existing
    config = attached.s3().get_bucket_notification_configuration(Bucket=existing.photos)
    assert [c["Id"] for c in config["QueueConfigurations"]] == ["another-team"] and "EventBridgeConfiguration" in config
    sqs = attached.stack.client("sqs")
    keys: set[str] = set()
    for _ in range(5):
        for message in sqs.receive_message(QueueUrl=existing.other_queue, MaxNumberOfMessages=10).get("Messages", []):
            keys.update(unquote_plus(r["s3"]["object"]["key"]) for r in json.loads(message["Body"]).get("Records", []))
    assert "inputs/dup/hat.jpg" in keys
