"""The AWS gateway in front of moto: S3's refusal of expired presigned URLs, and per-resource judgement of other calls."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from botocore.config import Config
from botocore.credentials import Credentials

from kontext_s3_tools.aws_gateway import AwsGateway, Identity
from kontext_s3_tools.local_stack import TEST_CREDENTIALS, aws_session
from tests.helpers import Aws


@pytest.fixture
def gateway(aws: Aws) -> Iterator[AwsGateway]:
    running = AwsGateway(aws.endpoint, admin=TEST_CREDENTIALS).start()
    yield running
    running.stop()


def test_a_presigned_url_works_until_its_expiry_and_is_then_refused_as_s3_refuses_it(aws: Aws, gateway: AwsGateway) -> None:
    aws.s3.put_object(Bucket=aws.resources.bucket, Key="outputs/p.txt", Body=b"hello")
    s3 = aws_session().client("s3", endpoint_url=gateway.url, config=Config(signature_version="s3v4"))  # as the submit function signs
    url = s3.generate_presigned_url("get_object", Params={"Bucket": aws.resources.bucket, "Key": "outputs/p.txt"}, ExpiresIn=2)
    assert httpx.get(url).content == b"hello"
    time.sleep(2.5)
    expired = httpx.get(url)
    assert expired.status_code == 403
    assert "<Code>AccessDenied</Code>" in expired.text and "Request has expired" in expired.text
    assert "<X-Amz-Expires>2</X-Amz-Expires>" in expired.text


def test_a_presigned_url_dies_with_the_session_that_signed_it(aws: Aws, gateway: AwsGateway) -> None:
    aws.s3.put_object(Bucket=aws.resources.bucket, Key="inputs/p.jpg", Body=b"x")
    statements = [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]
    gateway.add_identity("ASIAENDEDSESSION", Identity("SubmitFunction", "arn:aws:sts::1:assumed-role/r/s", statements, time.time() - 1))
    signer = aws_session(Credentials("ASIAENDEDSESSION", "secret", "token")).client("s3", endpoint_url=gateway.url)
    url = signer.generate_presigned_url("get_object", Params={"Bucket": aws.resources.bucket, "Key": "inputs/p.jpg"}, ExpiresIn=3600)
    answer = httpx.get(url)
    assert answer.status_code == 400 and "ExpiredToken" in answer.text


def test_a_judged_call_outside_the_roles_policy_is_refused_naming_the_action_and_resource(aws: Aws, gateway: AwsGateway) -> None:
    table_arn = f"arn:aws:dynamodb:us-east-1:123456789012:table/{aws.resources.table}"
    statements = [{"Effect": "Allow", "Action": ["dynamodb:GetItem"], "Resource": table_arn}]
    gateway.add_identity("ASIAREADONLY", Identity("WebhookFunction", "arn:aws:sts::1:assumed-role/r/s", statements, time.time() + 3600))
    ddb = aws_session(Credentials("ASIAREADONLY", "secret", "token")).client("dynamodb", endpoint_url=gateway.url)
    assert "Item" not in ddb.get_item(TableName=aws.resources.table, Key={"job_id": {"S": "nothing"}})
    with pytest.raises(ddb.exceptions.ClientError) as refused:
        ddb.put_item(TableName=aws.resources.table, Item={"job_id": {"S": "x"}})
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    assert f"not authorized to perform: dynamodb:PutItem on resource: {table_arn}" in str(refused.value)
    assert [(j.action, j.allowed) for j in gateway.recorded_judgements()] == [("dynamodb:GetItem", True), ("dynamodb:PutItem", False)]


@pytest.mark.parametrize(
    ("list_bucket", "status"),
    [
        (None, 403),
        ({"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::{bucket}"}, 404),
        # The 404 decision carries no prefix, so a prefix-conditioned ListBucket does not give it.
        (
            {
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": "arn:aws:s3:::{bucket}",
                "Condition": {"StringLike": {"s3:prefix": "inputs/*"}},
            },
            403,
        ),
    ],
)
def test_a_missing_key_is_404_only_to_a_caller_allowed_to_list_the_bucket(
    aws: Aws, gateway: AwsGateway, list_bucket: dict[str, object] | None, status: int
) -> None:
    bucket = aws.resources.bucket
    statements: list[dict[str, object]] = [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}]
    if list_bucket:
        statements.append({**list_bucket, "Resource": str(list_bucket["Resource"]).format(bucket=bucket)})
    gateway.add_identity("ASIALISTER", Identity("SubmitFunction", "arn:aws:sts::1:assumed-role/r/s", statements, time.time() + 3600))
    s3 = aws_session(Credentials("ASIALISTER", "secret", "token")).client("s3", endpoint_url=gateway.url)
    aws.s3.put_object(Bucket=bucket, Key="inputs/there.jpg", Body=b"x")
    assert s3.head_object(Bucket=bucket, Key="inputs/there.jpg")["ContentLength"] == 1
    for call in (s3.head_object, s3.get_object):
        with pytest.raises(s3.exceptions.ClientError) as missing:
            call(Bucket=bucket, Key="inputs/_kontext.json")
        assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == status


def test_s3_and_sqs_calls_are_judged_by_iams_own_action_names_whatever_moto_would_call_them(aws: Aws, gateway: AwsGateway) -> None:
    bucket = aws.resources.bucket
    queue_arn = f"arn:aws:sqs:us-east-1:123456789012:{aws.resources.queue_url.rsplit('/', 1)[-1]}"
    statements: list[dict[str, object]] = [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:GetObjectVersion"], "Resource": f"arn:aws:s3:::{bucket}/inputs/*"},
        {"Effect": "Allow", "Action": "s3:GetObjectVersionTagging", "Resource": f"arn:aws:s3:::{bucket}/inputs/*"},
        {"Effect": "Allow", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/outputs/*"},
        {
            "Effect": "Allow",
            "Action": "s3:ListBucketVersions",
            "Resource": f"arn:aws:s3:::{bucket}",
            "Condition": {"StringLike": {"s3:prefix": "inputs/*"}},
        },
        {"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": queue_arn},
    ]
    gateway.add_identity("ASIASUBMIT", Identity("SubmitFunction", "arn:aws:sts::1:assumed-role/r/s", statements, time.time() + 3600))
    session = aws_session(Credentials("ASIASUBMIT", "secret", "token"))
    s3, sqs = session.client("s3", endpoint_url=gateway.url), session.client("sqs", endpoint_url=gateway.url)
    version = aws.s3.put_object(Bucket=bucket, Key="inputs/a.jpg", Body=b"x", Tagging="prompt=hi")["VersionId"]

    s3.head_object(Bucket=bucket, Key="inputs/a.jpg")  # moto 5.2.6 would ask IAM for s3:HeadObject, which IAM has not got
    s3.head_object(Bucket=bucket, Key="inputs/a.jpg", VersionId=version)
    s3.get_object(Bucket=bucket, Key="inputs/a.jpg")
    assert s3.get_object_tagging(Bucket=bucket, Key="inputs/a.jpg", VersionId=version)["TagSet"] == [{"Key": "prompt", "Value": "hi"}]
    s3.list_object_versions(Bucket=bucket, Prefix="inputs/a.jpg")
    s3.put_object(Bucket=bucket, Key="outputs/a/image-0.png", Body=b"y")
    sqs.send_message(QueueUrl=aws.resources.queue_url, MessageBody="{}")
    for refused_call in (
        lambda: s3.get_object_tagging(Bucket=bucket, Key="inputs/a.jpg"),  # the current version's tags: another action
        lambda: s3.put_object(Bucket=bucket, Key="inputs/b.jpg", Body=b"z"),
        lambda: s3.list_object_versions(Bucket=bucket, Prefix="outputs/"),
    ):
        with pytest.raises(s3.exceptions.ClientError) as refused:
            refused_call()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(sqs.exceptions.ClientError) as refused:
        sqs.get_queue_attributes(QueueUrl=aws.resources.queue_url, AttributeNames=["All"])
    assert "AccessDenied" in refused.value.response["Error"]["Code"]

    judged = [(j.action, j.allowed) for j in gateway.recorded_judgements()]
    assert judged == [
        ("s3:GetObject", True),
        ("s3:GetObjectVersion", True),
        ("s3:GetObject", True),
        ("s3:GetObjectVersionTagging", True),
        ("s3:ListBucketVersions", True),
        ("s3:PutObject", True),
        ("sqs:SendMessage", True),
        ("s3:GetObjectTagging", False),
        ("s3:PutObject", False),
        ("s3:ListBucketVersions", False),
        ("sqs:GetQueueAttributes", False),
    ]


def test_a_key_the_stack_never_issued_is_refused(aws: Aws, gateway: AwsGateway) -> None:
    gateway.refuse_unknown_keys = True
    stranger = aws_session(Credentials("AKIASTRANGER", "secret")).client("s3", endpoint_url=gateway.url)
    with pytest.raises(stranger.exceptions.ClientError) as refused:
        stranger.list_objects_v2(Bucket=aws.resources.bucket)
    assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    admin = aws_session(TEST_CREDENTIALS).client("s3", endpoint_url=gateway.url)
    assert admin.list_objects_v2(Bucket=aws.resources.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
