"""``kontext-s3 attach`` and ``backfill --bucket``: existing buckets reach the stack through EventBridge.

``attach`` turns on S3's EventBridge delivery by putting back the bucket's whole
notification configuration with ``EventBridgeConfiguration`` added (the call
replaces everything: every other destination must survive). These run the CLI
in-process against the project's moto server (``kontext_s3_tools.moto_server``,
the ``aws`` fixture's), as S3 answers: a bucket with EventBridge on returns
``EventBridgeConfiguration: {}`` from GetBucketNotificationConfiguration.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.client import BaseClient

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import JobStore
from kontext_s3.s3_events import parse_notification, stack_marks
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import aws_environment
from tests.helpers import Aws, jpeg_bytes, s3_error_endpoint
from tests.integration.test_cli import expired_endpoint, one_line_error, run

__all__ = ["expired_endpoint"]


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def reach(aws: Aws, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Aws:
    """The moto server as AWS, and nothing that names a stack (no KONTEXT_S3_*, no out/stack.env)."""
    for name in [name for name in os.environ if name.startswith("KONTEXT_S3_")]:
        monkeypatch.delenv(name)
    for name, value in aws_environment(aws.endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return aws


def export_stack(aws: Aws, monkeypatch: pytest.MonkeyPatch, attached: str | None) -> None:
    """The stack named by KONTEXT_S3_* variables, as after ``set -a; . out/stack.env``; ``attached`` its AttachedBuckets."""
    resources = aws.resources
    for name, value in {
        "KONTEXT_S3_BUCKET": resources.bucket,
        "KONTEXT_S3_TABLE": resources.table,
        "KONTEXT_S3_QUEUE_URL": resources.queue_url,
        "KONTEXT_S3_DLQ_URL": resources.dlq_url,
    }.items():
        monkeypatch.setenv(name, value)
    if attached is not None:
        monkeypatch.setenv("KONTEXT_S3_ATTACHED_BUCKETS", attached)


def new_bucket(aws: Aws, *, versioned: bool = True) -> str:
    name = f"catalogue-{uuid.uuid4().hex[:12]}"
    aws.s3.create_bucket(Bucket=name)
    if versioned:
        aws.s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def notifications(aws: Aws, bucket: str) -> dict[str, Any]:
    """The bucket's notification configuration as S3 returns it, without the response's metadata and empty lists."""
    config = aws.s3.get_bucket_notification_configuration(Bucket=bucket)
    config.pop("ResponseMetadata", None)
    return {name: value for name, value in config.items() if value or name == "EventBridgeConfiguration"}


@pytest.fixture
def catalogue(reach: Aws) -> tuple[str, str, dict[str, Any]]:
    """A bucket other consumers already use: a filtered queue destination and a topic destination.

    Its name, the queue's URL, and its notification configuration before anything is attached.
    """
    aws = reach
    bucket = new_bucket(aws)
    queue_url = aws.sqs.create_queue(QueueName=f"{bucket}-thumbnails")["QueueUrl"]
    queue_arn = aws.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    topic_arn = aws.client("sns").create_topic(Name=f"{bucket}-deletions")["TopicArn"]
    aws.s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "Id": "thumbnails",
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "raw/"}, {"Name": "suffix", "Value": ".jpg"}]}},
                }
            ],
            "TopicConfigurations": [{"Id": "deletions", "TopicArn": topic_arn, "Events": ["s3:ObjectRemoved:*"]}],
        },
    )
    before = notifications(aws, bucket)
    assert set(before) == {"QueueConfigurations", "TopicConfigurations"}, before
    return bucket, queue_url, before


@pytest.fixture
def s3_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the AWS operations this process calls from now on."""
    calls: list[str] = []
    original = BaseClient._make_api_call  # type: ignore[attr-defined]  # botocore's one way in for every operation

    def recorded(self: BaseClient, operation_name: str, api_params: dict[str, Any]) -> Any:
        calls.append(operation_name)
        return original(self, operation_name, api_params)

    monkeypatch.setattr(BaseClient, "_make_api_call", recorded)
    return calls


def object_created(aws: Aws, queue_url: str, timeout: float = 10.0) -> list[str]:
    """The keys of the ObjectCreated records S3 sent to ``queue_url`` (its s3:TestEvent skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys = []
        for message in aws.sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            keys += [change.key for change in parse_notification(message["Body"]) if change.created]
        if keys:
            return keys
    return []


# -- attach ---------------------------------------------------------------------------------------


def test_attach_turns_eventbridge_on_and_keeps_every_other_destination(
    reach: Aws, catalogue: tuple[str, str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    bucket, thumbnails, before = catalogue
    code, out, err = run(capsys, "attach", bucket)
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"s3://{bucket}: EventBridge delivery on (was off; 2 other notification targets kept)"]
    after = notifications(reach, bucket)
    assert after == {**before, "EventBridgeConfiguration": {}}
    # The queue destination still works as it did, filter and all.
    reach.s3.put_object(Bucket=bucket, Key="raw/shoe.jpg", Body=jpeg_bytes())
    assert object_created(reach, thumbnails) == ["raw/shoe.jpg"]


def test_attaching_again_reads_and_changes_nothing(
    reach: Aws, catalogue: tuple[str, str, dict[str, Any]], s3_calls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    bucket, _, before = catalogue
    assert run(capsys, "attach", bucket)[0] == 0
    assert s3_calls == ["GetBucketNotificationConfiguration", "PutBucketNotificationConfiguration"]
    s3_calls.clear()
    code, out, err = run(capsys, "attach", f"s3://{bucket}/")
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"s3://{bucket}: EventBridge delivery already on (2 other notification targets)"]
    assert s3_calls == ["GetBucketNotificationConfiguration"]
    assert notifications(reach, bucket) == {**before, "EventBridgeConfiguration": {}}


def test_a_bucket_with_no_notifications_at_all_is_attached(reach: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = new_bucket(reach, versioned=False)
    code, out, _ = run(capsys, "attach", bucket)
    assert code == 0 and out.splitlines() == [f"s3://{bucket}: EventBridge delivery on (was off; 0 other notification targets kept)"]
    assert notifications(reach, bucket) == {"EventBridgeConfiguration": {}}


def test_check_changes_nothing_and_exits_1_while_a_bucket_is_off(
    reach: Aws, catalogue: tuple[str, str, dict[str, Any]], s3_calls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    bucket, _, before = catalogue
    other = new_bucket(reach)
    code, out, err = run(capsys, "attach", "--check", bucket, other)
    assert (code, err) == (cli.EXIT_FAILED, "")
    assert out.splitlines() == [
        f"s3://{bucket}: EventBridge delivery off (2 other notification targets); turn it on with: kontext-s3 attach {bucket}",
        f"s3://{other}: EventBridge delivery off (0 other notification targets); turn it on with: kontext-s3 attach {other}",
    ]
    assert "PutBucketNotificationConfiguration" not in s3_calls
    assert notifications(reach, bucket) == before
    # One on, one off: still 1. Both on: 0.
    assert run(capsys, "attach", bucket)[0] == 0
    code, out, _ = run(capsys, "attach", "--check", bucket, other)
    assert code == cli.EXIT_FAILED and out.splitlines()[0] == f"s3://{bucket}: EventBridge delivery on (2 other notification targets)"
    assert run(capsys, "attach", other)[0] == 0
    code, out, err = run(capsys, "attach", "--check", bucket, other)
    assert (code, err) == (0, "") and len(out.splitlines()) == 2


def test_a_bucket_that_does_not_exist_is_one_line_and_exit_2(reach: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"no-such-{uuid.uuid4().hex[:12]}"
    code, out, err = run(capsys, "attach", missing)
    line = one_line_error(code, err)
    assert code == cli.EXIT_USAGE and out == ""
    assert line.startswith(f"error: s3://{missing}: no such bucket at {reach.endpoint}; check its name")
    code, _, err = run(capsys, "attach", "--check", missing)
    assert code == cli.EXIT_USAGE and f"s3://{missing}: no such bucket" in one_line_error(code, err)


def test_the_other_buckets_are_attached_beside_one_that_is_refused(reach: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    good = new_bucket(reach)
    code, out, err = run(capsys, "attach", "no-such-bucket-at-all-here", good, "s3://a/inputs/", "Not_A_Bucket!")
    assert code == cli.EXIT_USAGE and "Traceback" not in err
    assert out.splitlines() == [f"s3://{good}: EventBridge delivery on (was off; 0 other notification targets kept)"]
    errors = err.splitlines()
    assert len(errors) == 3
    assert errors[0].startswith("error: s3://no-such-bucket-at-all-here: no such bucket")
    assert errors[1].startswith("error: 's3://a/inputs/' is not a bucket name: give the name alone")
    assert errors[2] == "error: 'Not_A_Bucket!' is not a valid S3 bucket name; check it"
    assert notifications(reach, good) == {"EventBridgeConfiguration": {}}


@pytest.fixture
def denied_endpoint() -> Iterator[str]:
    with s3_error_endpoint(403, "AccessDenied", "Access Denied") as url:
        yield url


def test_access_refused_is_one_line_naming_the_permission(reach: Aws, denied_endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "attach", "their-bucket", "--endpoint-url", denied_endpoint)
    assert code == cli.EXIT_USAGE
    assert one_line_error(code, err) == (
        "error: s3://their-bucket: access refused (GetBucketNotificationConfiguration); this needs s3:GetBucketNotification "
        "and s3:PutBucketNotification on the bucket: use the bucket owner's credentials (aws sts get-caller-identity shows "
        "whose these are)"
    )


def test_expired_credentials_are_one_line_for_every_bucket(reach: Aws, expired_endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "attach", "a-bucket", "b-bucket", "--endpoint-url", expired_endpoint)
    assert code == cli.EXIT_FAILED
    assert "these credentials have expired" in one_line_error(code, err)


def test_the_stacks_own_bucket_is_not_attached(reach: Aws, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    export_stack(reach, monkeypatch, attached="")
    before = notifications(reach, reach.resources.bucket)
    code, _, err = run(capsys, "attach", reach.resources.bucket)
    line = one_line_error(code, err)
    assert code == cli.EXIT_USAGE
    assert line.startswith(f"error: s3://{reach.resources.bucket} is the bucket the stack (KONTEXT_S3_BUCKET) created")
    assert notifications(reach, reach.resources.bucket) == before


# -- the reminder: a bucket the stack does not list in its AttachedBuckets -------------------------------------------


def test_a_bucket_missing_from_the_stacks_attached_buckets_gets_a_reminder(
    reach: Aws, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    listed, unlisted = new_bucket(reach), new_bucket(reach)
    export_stack(reach, monkeypatch, attached=listed)
    code, out, err = run(capsys, "attach", listed, unlisted)
    assert (code, err) == (0, "")
    assert out.splitlines()[2:] == [
        f"reminder: the stack (KONTEXT_S3_BUCKET) does not list {unlisted} in its AttachedBuckets ({listed}): until it does, "
        f"uploads there start nothing; deploy it with --parameter-overrides AttachedBuckets={listed},{unlisted} "
        "(the whole list: it replaces the old one)"
    ]
    # Listed: no reminder. Not known (variables that do not say): none either.
    monkeypatch.setenv("KONTEXT_S3_ATTACHED_BUCKETS", f"{listed}, {unlisted}")
    assert len(run(capsys, "attach", listed, unlisted)[1].splitlines()) == 2
    monkeypatch.delenv("KONTEXT_S3_ATTACHED_BUCKETS")
    assert len(run(capsys, "attach", listed, unlisted)[1].splitlines()) == 2


def create_stack(aws: Aws, attached: str | None) -> str:
    """A CloudFormation stack in moto with the outputs the CLI reads and, unless None, an AttachedBuckets parameter.

    The parameter is declared a String here: moto describes a CommaDelimitedList's value as Python's list repr
    ("['a', 'b']"), where CloudFormation gives "a,b", which a String gives in moto too.
    """
    name = f"kontext-{uuid.uuid4().hex[:10]}"
    resources = aws.resources
    outputs = {
        "InputBucketName": resources.bucket,
        "JobsTableName": resources.table,
        "UploadsQueueUrl": resources.queue_url,
        "DeadLetterQueueUrl": resources.dlq_url,
    }
    template: dict[str, Any] = {
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {key: {"Value": value} for key, value in outputs.items()},
    }
    parameters = []
    if attached is not None:
        template["Parameters"] = {"AttachedBuckets": {"Type": "String", "Default": ""}}
        parameters = [{"ParameterKey": "AttachedBuckets", "ParameterValue": attached}]
    aws.client("cloudformation").create_stack(StackName=name, TemplateBody=json.dumps(template), Parameters=parameters)
    return name


def test_a_stack_named_by_stack_is_read_for_its_attached_buckets(reach: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = new_bucket(reach)
    stack = create_stack(reach, attached="")
    code, out, _ = run(capsys, "--stack", stack, "attach", bucket)
    assert code == 0
    assert out.splitlines()[1].startswith(f"reminder: stack '{stack}' does not list {bucket} in its AttachedBuckets (none)")
    assert out.splitlines()[1].endswith(f"--parameter-overrides AttachedBuckets={bucket} (the whole list: it replaces the old one)")
    code, out, _ = run(capsys, "--stack", create_stack(reach, attached=bucket), "attach", bucket)
    assert code == 0 and len(out.splitlines()) == 1
    # A stack deployed from a template before AttachedBuckets.
    code, out, _ = run(capsys, "--stack", (old := create_stack(reach, attached=None)), "attach", "--check", bucket)
    assert code == 0
    assert out.splitlines()[1].startswith(f"reminder: stack '{old}' has no AttachedBuckets parameter")


def test_attach_talks_to_the_local_stack_of_an_env_file_with_its_own_keys(
    reach: Aws, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = new_bucket(reach)
    env_file = tmp_path / "stack.env"
    env_file.write_text(
        "".join(f"{name}={value}\n" for name, value in aws_environment(reach.endpoint).items())
        + f"KONTEXT_S3_BUCKET={reach.resources.bucket}\nKONTEXT_S3_ATTACHED_BUCKETS=\nKONTEXT_S3_STACK_PID={os.getpid()}\n"
    )
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    code, out, err = run(capsys, "--env-file", str(env_file), "attach", bucket)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"s3://{bucket}: EventBridge delivery on (was off; 0 other notification targets kept)"
    assert out.splitlines()[1].startswith(f"reminder: the stack (local stack from {env_file} (--env-file)) does not list {bucket}")


# -- backfill --bucket ------------------------------------------------------------------------------------------------


def uploads_queued(aws: Aws) -> list[tuple[str, str, str | None]]:
    """(bucket, key, version) of each message a backfill put on the uploads queue (S3's own events skipped)."""
    found = []
    for _ in range(3):
        messages = aws.receive(wait=1)
        for message in messages:
            if stack_marks(message["Body"]).get("backfill") is True:
                found += [(change.bucket, change.key, change.version_id) for change in parse_notification(message["Body"])]
            aws.sqs.delete_message(QueueUrl=aws.resources.queue_url, ReceiptHandle=message["ReceiptHandle"])
        if found and not messages:
            break
    return sorted(found, key=lambda item: item[1])


#: Keys as people name files: spaces, a plus and a percent sign survive the notification's URL encoding.
KEYS = ["inputs/catalogue/red shoe.jpg", "inputs/catalogue/shoe+bag 100%.jpg", "inputs/catalogue/plain.jpg"]


def test_backfill_of_an_attached_bucket_queues_its_objects_under_its_name(
    reach: Aws, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = new_bucket(reach)
    export_stack(reach, monkeypatch, attached=f"someone-else,{bucket}")
    versions = {key: reach.s3.put_object(Bucket=bucket, Key=key, Body=jpeg_bytes())["VersionId"] for key in KEYS}
    reach.s3.put_object(Bucket=bucket, Key="elsewhere/not-an-input.jpg", Body=jpeg_bytes())
    reach.s3.put_object(Bucket=reach.resources.bucket, Key="inputs/catalogue/the-stacks-own.jpg", Body=jpeg_bytes())
    code, out, err = run(capsys, "backfill", "catalogue/", "--bucket", bucket, "--prompt", "Remove the background")
    assert code == 0, err
    assert out.splitlines()[0] == f"backfill of s3://{bucket}/inputs/catalogue/: listed 3, queued 3, already had a job 0"
    assert uploads_queued(reach) == sorted((bucket, key, versions[key]) for key in KEYS)


def test_backfill_of_an_unversioned_attached_bucket_skips_an_upload_that_has_a_job(
    reach: Aws, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No versions: the upload is named by its eTag, as the submit function names it."""
    bucket = new_bucket(reach, versioned=False)
    export_stack(reach, monkeypatch, attached=bucket)
    etags = {key: reach.s3.put_object(Bucket=bucket, Key=key, Body=jpeg_bytes(32 + i))["ETag"] for i, key in enumerate(KEYS)}
    done = KEYS[0]
    job_id = derive_job_id(bucket, done, None, etags[done])
    created = JobStore(reach.table()).create(
        job_id=job_id,
        bucket=bucket,
        key=done,
        version_id=None,
        etag=etags[done].strip('"'),
        sequencer=None,
        event_time=None,
        output_prefix=f"outputs/{job_id}/",
        holder="h",
        hold_ms=60_000,
    )
    assert created is not None
    # Given with --bucket as the top-level option too: backfill lists that bucket, in the stack the variables name.
    code, out, err = run(capsys, "--bucket", bucket, "backfill")
    assert code == 0, err
    assert out.splitlines()[0] == f"backfill of s3://{bucket}/inputs/: listed 3, queued 2, already had a job 1"
    assert [(b, k) for b, k, _ in uploads_queued(reach)] == sorted((bucket, key) for key in KEYS[1:])


def test_backfill_of_a_bucket_the_stack_is_not_attached_to_is_refused(
    reach: Aws, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = new_bucket(reach)
    reach.s3.put_object(Bucket=bucket, Key="inputs/a.jpg", Body=jpeg_bytes())
    export_stack(reach, monkeypatch, attached="someone-else")
    code, out, err = run(capsys, "backfill", "--bucket", bucket)
    assert code == cli.EXIT_USAGE and out == ""
    assert one_line_error(code, err) == (
        f"error: --bucket '{bucket}' is neither the bucket the stack (KONTEXT_S3_BUCKET) created nor one of its AttachedBuckets "
        f"(someone-else); deploy the stack with --parameter-overrides AttachedBuckets=someone-else,{bucket}, then run "
        f"kontext-s3 attach {bucket}"
    )
    assert uploads_queued(reach) == []


def test_backfill_of_a_bucket_needs_the_stack_it_is_attached_to(reach: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "backfill", "--bucket", "my-catalogue")
    assert code == cli.EXIT_USAGE
    assert one_line_error(code, err) == (
        "error: backfill --bucket 'my-catalogue' needs the stack the bucket is attached to: pass --stack, set KONTEXT_S3_STACK, "
        "or start the local stack with make stack"
    )


def test_backfill_with_the_stacks_attached_buckets_unknown_goes_on_with_a_note(
    reach: Aws, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = new_bucket(reach)
    reach.s3.put_object(Bucket=bucket, Key="inputs/a.jpg", Body=jpeg_bytes())
    export_stack(reach, monkeypatch, attached=None)
    code, out, err = run(capsys, "backfill", "--bucket", bucket, "--prompt", "x")
    assert code == 0
    assert err.splitlines()[0].startswith("note: the AttachedBuckets of the stack (KONTEXT_S3_BUCKET) are not known here")
    assert out.splitlines()[0] == f"backfill of s3://{bucket}/inputs/: listed 1, queued 1, already had a job 0"
    assert [b for b, _, _ in uploads_queued(reach)] == [bucket]


def test_backfill_of_the_stacks_own_bucket_by_name_is_as_before(
    reach: Aws, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    export_stack(reach, monkeypatch, attached="")
    reach.s3.put_object(Bucket=reach.resources.bucket, Key="inputs/own.jpg", Body=jpeg_bytes())
    code, out, err = run(capsys, "backfill", "--bucket", reach.resources.bucket, "--prompt", "x")
    assert code == 0 and "note:" not in err, err  # only the progress lines: the stack's own bucket needs no AttachedBuckets
    assert out.splitlines()[0] == f"backfill of s3://{reach.resources.bucket}/inputs/: listed 1, queued 1, already had a job 0"
