"""``kontext-s3``: upload an image with its edit, follow a job, print tags for other tools.

Where things are comes from, in order: flags; ``KONTEXT_S3_BUCKET`` /
``KONTEXT_S3_TABLE`` / ``KONTEXT_S3_INPUT_PREFIX`` / ``KONTEXT_S3_OUTPUT_PREFIX``;
or the outputs of the CloudFormation stack named by ``--stack`` /
``KONTEXT_S3_STACK``. ``AWS_ENDPOINT_URL`` (or ``--endpoint-url``) points it at
the local stack instead of AWS.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from kontext_s3.dynamo import Table
from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobStore
from kontext_s3.model_schema import OPTIONAL_TAG_FIELDS, KontextMaxInput, describe_validation_error
from kontext_s3.output_store import OutputLayout
from kontext_s3.tag_codec import TagEncodingError, encode_tags, tagging_header

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Target:
    bucket: str
    table: str | None
    input_prefix: str = "inputs/"
    output_prefix: str = "outputs/"
    endpoint_url: str | None = None
    region: str | None = None
    #: Explicit credentials (the local stack's administrator); None: boto3's usual chain.
    credentials: Credentials | None = None

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.input_prefix, self.output_prefix)

    def _session(self) -> boto3.session.Session:
        if self.credentials is None:
            return boto3.session.Session(region_name=self.region)
        return boto3.session.Session(
            aws_access_key_id=self.credentials.access_key,
            aws_secret_access_key=self.credentials.secret_key,
            aws_session_token=self.credentials.token,
            region_name=self.region,
        )

    def client(self, service: str) -> Any:
        return self._session().client(service, endpoint_url=self.endpoint_url)  # type: ignore[call-overload]

    def jobs(self) -> JobStore | None:
        if not self.table:
            return None
        return JobStore(Table(self.client("dynamodb"), self.table))


@dataclass(frozen=True)
class Uploaded:
    key: str
    version_id: str | None
    job_id: str
    output_prefix: str


@dataclass(frozen=True)
class Result:
    job_id: str
    output_prefix: str
    manifest: dict[str, Any] | None
    error: dict[str, Any] | None

    @property
    def succeeded(self) -> bool:
        return self.manifest is not None


def validate_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The same check the submit function makes, before anything is uploaded."""
    try:
        KontextMaxInput.model_validate({**fields, "image_url": "s3://placeholder"})
    except ValidationError as exc:
        problems = describe_validation_error(exc, fields)
        raise CliError("\n".join(f"error: {p.sentence()}" for p in problems), EXIT_USAGE) from exc
    if not str(fields.get("prompt", "")).strip():
        raise CliError("error: --prompt must not be empty", EXIT_USAGE)
    return fields


def upload_image(target: Target, image: Path, fields: dict[str, Any], key: str | None = None) -> Uploaded:
    """Put the file ``image`` under the input prefix with its edit in the same request's tags."""
    return upload_bytes(target, image.read_bytes(), image.name, fields, key=key)


def upload_bytes(target: Target, data: bytes, name: str, fields: dict[str, Any], key: str | None = None) -> Uploaded:
    """Put ``data`` under the input prefix with its edit in the same request's tags (never a later tagging call)."""
    validate_fields(fields)
    try:
        tags = encode_tags(fields)
    except TagEncodingError as exc:
        raise CliError(f"error: {exc}", EXIT_USAGE) from exc
    key = key or f"{target.input_prefix}{name}"
    if not key.startswith(target.input_prefix):
        raise CliError(f"error: the key must start with the input prefix {target.input_prefix!r}", EXIT_USAGE)
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    answer = target.client("s3").put_object(
        Bucket=target.bucket, Key=key, Body=data, ContentType=content_type, Tagging=tagging_header(tags)
    )
    version = answer.get("VersionId")
    etag = str(answer.get("ETag", "")).strip('"')
    if not version or version == "null":
        raise CliError(
            f"warning: s3://{target.bucket} is not versioned; the job id depends on the event's sequencer, "
            "so this upload cannot be followed from here (see the output prefix instead)"
        )
    job_id = derive_job_id(target.bucket, key, version, etag)
    return Uploaded(key=key, version_id=version, job_id=job_id, output_prefix=target.layout.job_prefix(key, job_id))


def read_result(target: Target, job_id: str, output_prefix: str) -> Result | None:
    """The manifest or error record of a job, if either exists yet."""
    s3 = target.client("s3")
    found: dict[str, dict[str, Any]] = {}
    for name in ("manifest.json", "error.json"):
        try:
            found[name] = json.loads(s3.get_object(Bucket=target.bucket, Key=output_prefix + name)["Body"].read())
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise
    if not found:
        return None
    return Result(job_id=job_id, output_prefix=output_prefix, manifest=found.get("manifest.json"), error=found.get("error.json"))


def wait_for_result(
    target: Target,
    uploaded: Uploaded,
    *,
    timeout: float = 300.0,
    interval: float = 0.5,
    progress: Callable[[str], None] = print,
) -> Result:
    """Poll until the outputs or an error record appear, reporting each state the job passes through."""
    started = time.monotonic()
    jobs = target.jobs()
    last = ""
    while time.monotonic() - started < timeout:
        job: Job | None = jobs.get(uploaded.job_id) if jobs else None
        state = job.state.value if job else "waiting for the upload event"
        if state != last:
            note = f" (fal request {job.request_id})" if job and job.request_id else ""
            progress(f"[{time.monotonic() - started:6.1f}s] {state}{note}")
            last = state
        # With the table, S3 is read once the job has ended; without it, S3 is all there is.
        if jobs is None or (job is not None and job.state.ended):
            result = read_result(target, uploaded.job_id, uploaded.output_prefix)
            if result is not None:
                return result
        time.sleep(interval)
    raise CliError(f"no result after {timeout:.0f} s; follow it with: kontext-s3 status {uploaded.job_id}")


def download(target: Target, result: Result, directory: Path) -> list[Path]:
    assert result.manifest is not None
    s3 = target.client("s3")
    folder = directory / result.job_id
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for image in result.manifest["images"]:
        path = folder / image["key"].rsplit("/", 1)[-1]
        s3.download_file(target.bucket, image["key"], str(path))
        written.append(path)
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps(result.manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(manifest)
    return written


# -- command line -------------------------------------------------------------------------


def _fields_from(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": args.prompt}
    for name in OPTIONAL_TAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            fields[name] = value
    return fields


def _target(args: argparse.Namespace) -> Target:
    env = os.environ
    endpoint = args.endpoint_url or env.get("AWS_ENDPOINT_URL")
    bucket = args.bucket or env.get("KONTEXT_S3_BUCKET")
    table = args.table or env.get("KONTEXT_S3_TABLE")
    input_prefix = env.get("KONTEXT_S3_INPUT_PREFIX", "inputs/")
    output_prefix = env.get("KONTEXT_S3_OUTPUT_PREFIX", "outputs/")
    stack = args.stack or env.get("KONTEXT_S3_STACK")
    if stack and not (bucket and table):
        try:
            described = boto3.client("cloudformation", endpoint_url=endpoint, region_name=args.region).describe_stacks(StackName=stack)
        except (ClientError, BotoCoreError) as exc:
            raise CliError(f"error: cannot read the outputs of stack {stack!r}: {exc}") from exc
        outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Stacks"][0].get("Outputs", [])}
        bucket = bucket or outputs.get("InputBucketName")
        table = table or outputs.get("JobsTableName")
        input_prefix = outputs.get("InputPrefix", input_prefix)
        output_prefix = outputs.get("OutputPrefix", output_prefix)
    if not bucket:
        raise CliError("error: no bucket: pass --bucket, set KONTEXT_S3_BUCKET, or name the stack with --stack", EXIT_USAGE)
    return Target(
        bucket=bucket, table=table, input_prefix=input_prefix, output_prefix=output_prefix, endpoint_url=endpoint, region=args.region
    )


def _add_edit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the edit, in any language and with any punctuation")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float, help="1 to 20 (model default 3.5)")
    parser.add_argument("--num-images", dest="num_images", type=int, help="1 to 4 (model default 1)")
    parser.add_argument("--output-format", dest="output_format", help="jpeg or png")
    parser.add_argument("--safety-tolerance", dest="safety_tolerance", help="1 (strict) to 6 (permissive)")
    parser.add_argument("--aspect-ratio", dest="aspect_ratio", help="21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16 or 9:21")
    parser.add_argument("--enhance-prompt", dest="enhance_prompt", action="store_true", default=None)
    parser.add_argument("--sync-mode", dest="sync_mode", action="store_true", default=None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kontext-s3", description="Edit images with FLUX.1 Kontext [max] by uploading them to S3.")
    parser.add_argument("--stack", help="CloudFormation stack to read the bucket and table from")
    parser.add_argument("--bucket")
    parser.add_argument("--table")
    parser.add_argument("--endpoint-url", help="an S3/DynamoDB endpoint other than AWS (the local stack)")
    parser.add_argument("--region")
    commands = parser.add_subparsers(dest="command", required=True)

    upload = commands.add_parser("upload", help="upload an image with its edit in the object's tags")
    upload.add_argument("image", type=Path)
    _add_edit_options(upload)
    upload.add_argument("--key", help="object key (default: <input prefix><file name>)")
    upload.add_argument("--wait", action="store_true", help="wait for the outputs or an error record")
    upload.add_argument("--download", type=Path, metavar="DIR", help="with --wait: save the images and manifest in DIR/<job id>/")
    upload.add_argument("--timeout", type=float, default=300.0)

    status = commands.add_parser("status", help="a job's state and history, by input key or job id")
    status.add_argument("key_or_job")
    status.add_argument("--version-id", help="which version of the key (default: the latest)")

    tags = commands.add_parser("tags", help="print the tagging string for aws s3api put-object --tagging")
    _add_edit_options(tags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "tags":
            fields = validate_fields(_fields_from(args))
            print(tagging_header(encode_tags(fields)))
            return 0
        target = _target(args)
        if args.command == "upload":
            return _upload(target, args)
        return _status(target, args)
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except TagEncodingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ClientError, BotoCoreError) as exc:
        print(f"error: AWS said: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _upload(target: Target, args: argparse.Namespace) -> int:
    if not args.image.is_file():
        raise CliError(f"error: no such file: {args.image}", EXIT_USAGE)
    if args.download and not args.wait:
        raise CliError("error: --download needs --wait", EXIT_USAGE)
    uploaded = upload_image(target, args.image, _fields_from(args), key=args.key)
    print(f"uploaded s3://{target.bucket}/{uploaded.key} (version {uploaded.version_id})")
    print(f"job {uploaded.job_id}; results will appear under s3://{target.bucket}/{uploaded.output_prefix}")
    if not args.wait:
        return 0
    result = wait_for_result(target, uploaded, timeout=args.timeout, progress=lambda line: print(line, file=sys.stderr))
    if not result.succeeded:
        assert result.error is not None
        print(f"failed ({result.error['code']}): {result.error['message']}", file=sys.stderr)
        for problem in result.error.get("problems", []):
            print(f"  {problem['field']}: {problem['message']}", file=sys.stderr)
        print(f"error record: s3://{target.bucket}/{uploaded.output_prefix}error.json", file=sys.stderr)
        return EXIT_FAILED
    assert result.manifest is not None
    for image in result.manifest["images"]:
        print(f"s3://{target.bucket}/{image['key']}")
    print(f"s3://{target.bucket}/{uploaded.output_prefix}manifest.json")
    if args.download:
        for path in download(target, result, args.download):
            print(f"saved {path}")
    return 0


def _status(target: Target, args: argparse.Namespace) -> int:
    jobs = target.jobs()
    if jobs is None:
        raise CliError("error: status needs the jobs table: pass --table, set KONTEXT_S3_TABLE, or use --stack", EXIT_USAGE)
    value = args.key_or_job
    if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        job_id = value
    else:
        version = args.version_id
        if not version:
            try:
                version = target.client("s3").head_object(Bucket=target.bucket, Key=value).get("VersionId")
            except ClientError as exc:
                raise CliError(f"error: no object s3://{target.bucket}/{value}: {exc}") from exc
        job_id = derive_job_id(target.bucket, value, version)
    job = jobs.get(job_id)
    if job is None:
        raise CliError(f"error: no job {job_id} (not uploaded under the input prefix, not processed yet, or expired)")
    print(f"job      {job.job_id}")
    print(f"input    s3://{job.bucket}/{job.key} (version {job.version_id})")
    print(f"state    {job.state.value}")
    if job.request_id:
        print(f"fal      {job.request_id}")
    print(f"outputs  s3://{job.bucket}/{job.output_prefix}")
    if job.error_message:
        print(f"error    {job.error_code or ''} {job.error_message}".rstrip())
    for key in job.output_keys:
        print(f"image    s3://{job.bucket}/{key}")
    print("history")
    for entry in job.history:
        print(f"  {entry.at}  {entry.state.value:<10}  {entry.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
