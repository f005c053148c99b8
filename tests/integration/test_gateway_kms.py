"""The AWS gateway judges KMS as S3 asks it: a role reading an SSE-KMS object needs kms:Decrypt on its key, one
writing into a bucket encrypted under a customer managed key needs kms:GenerateDataKey on it.

Buckets attached to the stack (created outside it) are often encrypted so; the stack's own bucket uses SSE-S3.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from botocore.config import Config
from botocore.credentials import Credentials

from kontext_s3_tools.aws_gateway import AwsGateway, Identity
from kontext_s3_tools.local_stack import TEST_CREDENTIALS, MotoServer, aws_session

ROLE = "arn:aws:sts::123456789012:assumed-role/kx-submit-role/kx-submit"


@dataclass
class Setup:
    moto: str
    gateway: AwsGateway
    key_arn: str
    kms_bucket: str
    sse_s3_bucket: str

    def admin(self, service: str = "s3") -> Any:
        return aws_session().client(service, endpoint_url=self.moto)  # type: ignore[call-overload]

    def role(self, *kms_actions: str, extra: list[dict[str, Any]] | None = None) -> Any:
        """An S3 client of a role allowed every object call on both buckets, and ``kms_actions`` on the key."""
        statements: list[dict[str, Any]] = [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{b}{suffix}" for b in (self.kms_bucket, self.sse_s3_bucket) for suffix in ("", "/*")],
            },
            *(extra or []),
        ]
        if kms_actions:
            statements.append({"Effect": "Allow", "Action": list(kms_actions), "Resource": self.key_arn})
        access_key = f"ASIA{uuid.uuid4().hex[:12].upper()}"
        self.gateway.add_identity(access_key, Identity("SubmitFunction", ROLE, statements, time.time() + 3600))
        session = aws_session(Credentials(access_key, "secret", "token"))
        return session.client("s3", endpoint_url=self.gateway.url, config=Config(signature_version="s3v4"))

    def kms_judgements(self) -> list[tuple[str, str, bool]]:
        return [(j.action, j.resource, j.allowed) for j in self.gateway.recorded_judgements() if j.action.startswith("kms:")]


@pytest.fixture
def setup(moto_server: MotoServer) -> Iterator[Setup]:
    session = aws_session()
    s3: Any = session.client("s3", endpoint_url=moto_server.url)
    kms: Any = session.client("kms", endpoint_url=moto_server.url)
    key = kms.create_key(Description="an attached bucket's key")["KeyMetadata"]
    kms_bucket, sse_s3_bucket = f"kms-{uuid.uuid4().hex[:10]}", f"sse-s3-{uuid.uuid4().hex[:10]}"
    for bucket, default in (
        (kms_bucket, {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key["KeyId"]}),
        (sse_s3_bucket, {"SSEAlgorithm": "AES256"}),
    ):
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_encryption(
            Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": default}]}
        )
    gateway = AwsGateway(moto_server.url, admin=TEST_CREDENTIALS).start()
    yield Setup(moto_server.url, gateway, key["Arn"], kms_bucket, sse_s3_bucket)
    gateway.stop()


def _refused(call: Any, code: str = "AccessDenied") -> str:
    with pytest.raises(Exception) as refused:  # noqa: PT011 - botocore's ClientError, of whichever client
        call()
    error = refused.value.response["Error"]  # type: ignore[attr-defined]
    assert error["Code"] == code, error
    return str(error.get("Message", ""))


def test_a_role_without_the_key_can_neither_read_nor_write_the_buckets_objects_and_is_told_which_key(setup: Setup) -> None:
    bucket, key_arn = setup.kms_bucket, setup.key_arn
    setup.admin().put_object(Bucket=bucket, Key="inputs/a b+c.jpg", Body=b"secret")
    assert setup.admin().head_object(Bucket=bucket, Key="inputs/a b+c.jpg")["ServerSideEncryption"] == "aws:kms"
    s3 = setup.role()

    message = _refused(lambda: s3.get_object(Bucket=bucket, Key="inputs/a b+c.jpg"))
    assert message == (
        f"User: {ROLE} is not authorized to perform: kms:Decrypt on resource: {key_arn} "
        "because no identity-based policy allows the kms:Decrypt action"
    )
    _refused(lambda: s3.head_object(Bucket=bucket, Key="inputs/a b+c.jpg"), code="403")  # a HEAD: a bare 403
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "inputs/a b+c.jpg"}, ExpiresIn=60)
    presigned = httpx.get(url)
    assert presigned.status_code == 403 and b"secret" not in presigned.content
    assert "<Code>AccessDenied</Code>" in presigned.text and f"kms:Decrypt on resource: {key_arn}" in presigned.text

    message = _refused(lambda: s3.put_object(Bucket=bucket, Key="outputs/new.png", Body=b"y"))
    assert message == (
        f"User: {ROLE} is not authorized to perform: kms:GenerateDataKey on resource: {key_arn} "
        "because no identity-based policy allows the kms:GenerateDataKey action"
    )
    _refused(lambda: s3.create_multipart_upload(Bucket=bucket, Key="outputs/big.png"))
    # A copy out of the bucket reads the source (Decrypt); one into it writes under its key (GenerateDataKey).
    message = _refused(
        lambda: s3.copy_object(Bucket=setup.sse_s3_bucket, Key="out.jpg", CopySource={"Bucket": bucket, "Key": "inputs/a b+c.jpg"})
    )
    assert f"kms:Decrypt on resource: {key_arn}" in message
    setup.admin().put_object(Bucket=setup.sse_s3_bucket, Key="plain.jpg", Body=b"plain")
    message = _refused(lambda: s3.copy_object(Bucket=bucket, Key="in.jpg", CopySource={"Bucket": setup.sse_s3_bucket, "Key": "plain.jpg"}))
    assert f"kms:GenerateDataKey on resource: {key_arn}" in message

    listed = setup.admin().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in listed] == ["inputs/a b+c.jpg"]  # nothing refused was written
    assert not setup.admin().list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert setup.kms_judgements() == [
        ("kms:Decrypt", key_arn, False),
        ("kms:Decrypt", key_arn, False),
        ("kms:Decrypt", key_arn, False),
        ("kms:GenerateDataKey", key_arn, False),
        ("kms:GenerateDataKey", key_arn, False),
        ("kms:Decrypt", key_arn, False),
        ("kms:GenerateDataKey", key_arn, False),
    ]


def test_a_role_allowed_the_key_reads_and_writes_them(setup: Setup) -> None:
    bucket = setup.kms_bucket
    setup.admin().put_object(Bucket=bucket, Key="inputs/a.jpg", Body=b"secret")
    s3 = setup.role("kms:Decrypt", "kms:GenerateDataKey")

    assert s3.get_object(Bucket=bucket, Key="inputs/a.jpg")["Body"].read() == b"secret"
    assert s3.head_object(Bucket=bucket, Key="inputs/a.jpg")["SSEKMSKeyId"].endswith(setup.key_arn.rsplit("/", 1)[-1])
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "inputs/a.jpg"}, ExpiresIn=60)
    assert httpx.get(url).content == b"secret"
    s3.put_object(Bucket=bucket, Key="outputs/new.png", Body=b"y")
    s3.copy_object(Bucket=bucket, Key="outputs/copy.jpg", CopySource={"Bucket": bucket, "Key": "inputs/a.jpg"})
    upload = s3.create_multipart_upload(Bucket=bucket, Key="outputs/big.png")["UploadId"]
    part = s3.upload_part(Bucket=bucket, Key="outputs/big.png", UploadId=upload, PartNumber=1, Body=b"big")
    parts = {"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]}
    s3.complete_multipart_upload(Bucket=bucket, Key="outputs/big.png", UploadId=upload, MultipartUpload=parts)
    assert setup.admin().get_object(Bucket=bucket, Key="outputs/big.png")["Body"].read() == b"big"

    judged = setup.kms_judgements()
    assert {resource for _, resource, _ in judged} == {setup.key_arn}
    assert all(allowed for _, _, allowed in judged)
    assert [action for action, _, _ in judged] == [
        "kms:Decrypt",  # GET
        "kms:Decrypt",  # HEAD
        "kms:Decrypt",  # presigned GET
        "kms:GenerateDataKey",  # PUT
        "kms:GenerateDataKey",  # the copy's destination
        "kms:Decrypt",  # ... and its source
        "kms:GenerateDataKey",  # CreateMultipartUpload
        "kms:Decrypt",  # UploadPart
    ]


def test_objects_under_sse_s3_ask_nothing_of_kms_but_one_stored_under_the_key_does(setup: Setup) -> None:
    bucket = setup.sse_s3_bucket
    s3 = setup.role()
    s3.put_object(Bucket=bucket, Key="inputs/plain.jpg", Body=b"plain")
    assert s3.get_object(Bucket=bucket, Key="inputs/plain.jpg")["Body"].read() == b"plain"
    s3.head_object(Bucket=bucket, Key="inputs/plain.jpg")
    s3.copy_object(Bucket=bucket, Key="inputs/copy.jpg", CopySource={"Bucket": bucket, "Key": "inputs/plain.jpg"})
    # The AWS managed key (aws:kms, no key named, no customer key by default): its key policy lets S3's callers use it.
    s3.put_object(Bucket=bucket, Key="inputs/managed.jpg", Body=b"m", ServerSideEncryption="aws:kms")
    assert s3.get_object(Bucket=bucket, Key="inputs/managed.jpg")["Body"].read() == b"m"
    assert setup.kms_judgements() == []

    # An object written under the customer key in an SSE-S3 bucket is judged on that key, as the request names it.
    alias = f"alias/attached-{uuid.uuid4().hex[:8]}"
    setup.admin("kms").create_alias(AliasName=alias, TargetKeyId=setup.key_arn)
    _refused(lambda: s3.put_object(Bucket=bucket, Key="inputs/k.jpg", Body=b"k", ServerSideEncryption="aws:kms", SSEKMSKeyId=alias))
    setup.admin().put_object(Bucket=bucket, Key="inputs/k.jpg", Body=b"k", ServerSideEncryption="aws:kms", SSEKMSKeyId=alias)
    _refused(lambda: s3.get_object(Bucket=bucket, Key="inputs/k.jpg"))
    assert setup.kms_judgements() == [("kms:GenerateDataKey", setup.key_arn, False), ("kms:Decrypt", setup.key_arn, False)]


def test_a_bucket_default_changed_through_the_gateway_is_judged_at_once(setup: Setup) -> None:
    bucket = setup.sse_s3_bucket
    s3 = setup.role()
    s3.put_object(Bucket=bucket, Key="outputs/before.png", Body=b"x")  # the gateway has read the default: SSE-S3
    admin: Any = aws_session().client("s3", endpoint_url=setup.gateway.url)
    kms_default = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": setup.key_arn}
    admin.put_bucket_encryption(
        Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": kms_default}]}
    )
    _refused(lambda: s3.put_object(Bucket=bucket, Key="outputs/after.png", Body=b"x"))
    assert setup.kms_judgements() == [("kms:GenerateDataKey", setup.key_arn, False)]


def test_a_sigv2_presigned_get_of_an_sse_kms_object_is_refused_as_s3_refuses_it(setup: Setup) -> None:
    setup.admin().put_object(Bucket=setup.kms_bucket, Key="inputs/a.jpg", Body=b"secret")
    signer = aws_session().client("s3", endpoint_url=setup.gateway.url, config=Config(signature_version="s3"))
    url = signer.generate_presigned_url("get_object", Params={"Bucket": setup.kms_bucket, "Key": "inputs/a.jpg"}, ExpiresIn=60)
    answer = httpx.get(url)
    assert answer.status_code == 400 and "<Code>InvalidArgument</Code>" in answer.text
    assert "require AWS Signature Version 4" in answer.text
