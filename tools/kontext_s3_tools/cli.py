"""``kontext-s3``: upload an image with its edit, follow a job, manage folder recipes, print tags for other tools.

Where things are comes from, in order: flags; ``KONTEXT_S3_BUCKET`` /
``KONTEXT_S3_TABLE`` / ``KONTEXT_S3_INPUT_PREFIX`` / ``KONTEXT_S3_OUTPUT_PREFIX``;
the outputs of the CloudFormation stack named by ``--stack`` /
``KONTEXT_S3_STACK``; then the env file that ``make stack`` writes
(``out/stack.env``, or ``--env-file`` / ``KONTEXT_S3_ENV_FILE``).
``AWS_ENDPOINT_URL`` (or ``--endpoint-url``) points it at the local stack
instead of AWS.

Every mistake ends in one line that says what is wrong and what to do next,
and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

import boto3
from botocore.credentials import Credentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
)
from pydantic import ValidationError

from kontext_s3.admission import Wait
from kontext_s3.delivery_failures import DeliveryFailures
from kontext_s3.dynamo import Table
from kontext_s3.image_header import read_header
from kontext_s3.input_prep import CONVERTED, SUPPORTED, TAKEN
from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobState, JobStore, iso
from kontext_s3.model_schema import MATCH_INPUT, OPTIONAL_TAG_FIELDS, KontextMaxInput, describe_validation_error
from kontext_s3.output_store import OutputLayout, has_dot_segments
from kontext_s3.recipes import RECIPE_FILE, InvalidRecipe, parse_recipe, recipe_keys
from kontext_s3.tag_codec import TagEncodingError, encode_tags, tagging_header
from kontext_s3.text import printable
from kontext_s3_tools.backfill import BackfillError, backfill
from kontext_s3_tools.dead_letters import failure_reasons, list_dead_letters, redrive
from kontext_s3_tools.gallery import GalleryError, write_gallery

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
DEFAULT_ENV_FILE = Path("out") / "stack.env"

_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId", "UnrecognizedClientException"}
_BAD_KEY = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidSignatureException"}


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
    #: The uploads queue and its dead-letter queue (backfill and dlq need them).
    queue_url: str | None = None
    dlq_url: str | None = None

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


def validate_fields(fields: dict[str, Any], *, prompt_required: bool = True) -> dict[str, Any]:
    """The same check the submit function makes, before anything is uploaded."""
    try:
        # aspect_ratio "match" is resolved by the submit function from the image's size.
        checked = {k: v for k, v in fields.items() if not (k == "aspect_ratio" and str(v).lower() == MATCH_INPUT)}
        KontextMaxInput.model_validate({"prompt": "-", **checked, "image_url": "s3://placeholder"})
    except ValidationError as exc:
        problems = describe_validation_error(exc, fields)
        raise CliError("error: " + "; ".join(p.sentence() for p in problems), EXIT_USAGE) from exc
    if prompt_required and not str(fields.get("prompt", "")).strip():
        raise CliError("error: --prompt must not be empty", EXIT_USAGE)
    return fields


def read_image(path: Path) -> tuple[bytes, str]:
    """The file's bytes and its type, sniffed from its first bytes whatever its name says."""
    if path.is_dir():
        raise CliError(
            f"error: {path} is a folder; upload one image, or put a recipe on a prefix (kontext-s3 recipe put) and copy "
            "the folder with aws s3 sync",
            EXIT_USAGE,
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"error: no such file: {path}", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"error: cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    header = read_header(data)
    content_type = header.content_type if header and header.content_type in TAKEN | CONVERTED else None
    if content_type is None:
        raise CliError(f"error: {path} is not a {SUPPORTED} image (judged by its content, not its name)", EXIT_USAGE)
    return data, content_type


def upload_image(target: Target, image: Path, fields: dict[str, Any], key: str | None = None) -> Uploaded:
    """Put the file ``image`` under the input prefix with its edit in the same request's tags."""
    data, content_type = read_image(image)
    return upload_bytes(target, data, image.name, fields, key=key, content_type=content_type)


def upload_bytes(
    target: Target, data: bytes, name: str, fields: dict[str, Any], key: str | None = None, content_type: str | None = None
) -> Uploaded:
    """Put ``data`` under the input prefix with its edit in the same request's tags (never a later tagging call).

    With no fields at all the upload is untagged, and its folder's recipe gives the edit.
    """
    if fields:
        validate_fields(fields, prompt_required=False)
    try:
        tags = encode_tags(fields) if fields else {}
    except TagEncodingError as exc:
        raise CliError(f"error: {exc}", EXIT_USAGE) from exc
    key = key or f"{target.input_prefix}{name}"
    if not key.startswith(target.input_prefix):
        raise CliError(f"error: the key must start with the input prefix {target.input_prefix!r}", EXIT_USAGE)
    content_type = content_type or ((header := read_header(data)) and header.content_type) or "application/octet-stream"
    extra = {"Tagging": tagging_header(tags)} if tags else {}
    answer = target.client("s3").put_object(Bucket=target.bucket, Key=key, Body=data, ContentType=content_type, **extra)
    version_id = answer.get("VersionId")
    etag = str(answer.get("ETag", "")).strip('"')
    if not version_id or version_id == "null":
        raise CliError(
            f"error: s3://{target.bucket} is not versioned, so this upload cannot be followed from here; "
            "look under the output prefix for its results"
        )
    # The upload's first job has the upload's own id; a later edit of its tags is a job of its own.
    job_id = derive_job_id(target.bucket, key, version_id, etag)
    return Uploaded(key=key, version_id=version_id, job_id=job_id, output_prefix=target.layout.job_prefix(key, job_id))


def latest_job(jobs: JobStore, upload_id: str) -> Job | None:
    """The upload's newest job (each change of its edit tags is a job of its own)."""
    found = jobs.jobs_of_upload(upload_id)
    return found[-1] if found else None


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


def describe(job: Job | None, jobs: JobStore | None) -> str:
    """Where the job stands, in the words people follow it by."""
    if job is None:
        return "uploaded; waiting for the upload event"
    if job.state is JobState.WAITING:
        if job.wait_reason == "budget":
            return Wait("budget", job.wait_until_ms).sentence()
        return Wait("slot").sentence(jobs.waiting_ahead(job) if jobs else None)
    if job.state is JobState.SUBMITTED:
        if job.queue_position:
            return f"at fal, queue position {job.queue_position} (when sent)"
        return "running at fal"
    if job.state in (JobState.SUBMITTING, JobState.SENDING):
        return "sending to fal"
    if job.state is JobState.UNCERTAIN:
        return "sent; waiting for fal to confirm it has the request"
    return job.state.value.lower()


class WaitTimedOut(CliError):
    """No result in the time given: the job may go on (where the stack does)."""


def wait_for_result(
    target: Target,
    uploaded: Uploaded,
    *,
    timeout: float = 300.0,
    interval: float = 0.5,
    progress: Callable[[str], None] = print,
    stop_on_failure: bool = False,
) -> Result:
    """Poll until the outputs or an error record appear, reporting each state the job passes through.

    A failed delivery of the upload's event is reported as soon as the submit function records it (one line:
    what failed, on which delivery of how many, what to do); ``stop_on_failure`` ends the wait there.
    """
    started = time.monotonic()
    jobs = target.jobs()
    failures = DeliveryFailures(jobs.table) if jobs else None
    last = ""
    shown_failure = 0
    while time.monotonic() - started < timeout:
        job: Job | None = jobs.get(uploaded.job_id) if jobs else None
        line = describe(job, jobs)
        retries = max(0, job.attempts - 1) if job else 0
        if retries:
            line += f", {retries} retr{'y' if retries == 1 else 'ies'}"
        if line != last:
            progress(f"[{time.monotonic() - started:6.1f}s] {line}")
            last = line
        if failures is not None and not (job is not None and job.state.ended):
            failure = failures.latest(uploaded.job_id)
            if failure is not None and failure.at_ms > shown_failure:
                shown_failure = failure.at_ms
                if stop_on_failure:
                    raise CliError(f"error: {printable(failure.sentence())}")
                progress(f"[{time.monotonic() - started:6.1f}s] {printable(failure.sentence())}")
        # With the table, S3 is read once the job has ended; without it, S3 is all there is.
        if jobs is None or (job is not None and job.state.ended):
            result = read_result(target, uploaded.job_id, uploaded.output_prefix)
            if result is not None:
                return result
        time.sleep(interval)
    raise WaitTimedOut(f"error: no result after {timeout:.0f} s")


def download(target: Target, result: Result, directory: Path) -> list[Path]:
    assert result.manifest is not None
    s3 = target.client("s3")
    folder = directory / result.job_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for image in result.manifest["images"]:
            path = folder / image["key"].rsplit("/", 1)[-1]
            s3.download_file(target.bucket, image["key"], str(path))
            written.append(path)
        manifest = folder / "manifest.json"
        manifest.write_text(json.dumps(result.manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise CliError(f"error: cannot save into {directory}: {exc.strerror or exc}; choose another --download folder") from None
    written.append(manifest)
    return written


def recipe_key(target: Target, prefix: str) -> str:
    """The recipe's key for a prefix given with or without the input prefix (``catalogue/`` or ``inputs/catalogue/``)."""
    prefix = prefix.strip("/")
    if has_dot_segments(prefix + "/x"):
        raise CliError(f"error: the prefix {prefix!r} has '.' or '..' segments; give a plain folder such as catalogue/", EXIT_USAGE)
    if prefix and not (prefix + "/").startswith(target.input_prefix):
        prefix = target.input_prefix + prefix
    folder = (prefix + "/") if prefix else target.input_prefix
    if not folder.startswith(target.input_prefix):
        folder = target.input_prefix
    return folder + RECIPE_FILE


def put_recipe(target: Target, prefix: str, fields: dict[str, Any]) -> tuple[str, str | None]:
    key = recipe_key(target, prefix)
    body = json.dumps(fields, indent=2, ensure_ascii=False).encode() + b"\n"
    try:
        parse_recipe(key, None, body)
    except InvalidRecipe as exc:
        raise CliError("error: " + "; ".join(p.sentence() for p in exc.problems), EXIT_USAGE) from exc
    answer = target.client("s3").put_object(Bucket=target.bucket, Key=key, Body=body, ContentType="application/json")
    return key, answer.get("VersionId")


def show_recipe(target: Target, prefix: str) -> tuple[str, dict[str, Any], str | None]:
    """The recipe that uploads under ``prefix`` get now: the nearest one at or above it."""
    s3 = target.client("s3")
    for key in recipe_keys(recipe_key(target, prefix).removesuffix(RECIPE_FILE) + "x", target.input_prefix):
        try:
            answer = s3.get_object(Bucket=target.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                continue
            raise
        return key, json.loads(answer["Body"].read()), answer.get("VersionId")
    raise CliError(
        f"error: no recipe applies under {recipe_key(target, prefix).removesuffix(RECIPE_FILE)}; write one with kontext-s3 recipe put"
    )


# -- command line -------------------------------------------------------------------------


def _version() -> str:
    try:
        return version("kontext-s3")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming the fix, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # In the subcommands the defaults are suppressed, so an option given before the subcommand is not overwritten.
    default: Any = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("where the stack is")
    group.add_argument("--stack", default=default, help="CloudFormation stack to read the bucket and table from")
    group.add_argument("--bucket", default=default, help="the input bucket (default: KONTEXT_S3_BUCKET)")
    group.add_argument("--table", default=default, help="the jobs table (default: KONTEXT_S3_TABLE)")
    group.add_argument("--endpoint-url", default=default, help="an AWS endpoint other than AWS's own (the local stack)")
    group.add_argument("--region", default=default)
    group.add_argument("--env-file", default=default, type=Path, help=f"endpoints written by make stack (default: {DEFAULT_ENV_FILE})")


def _edit_options(parser: argparse.ArgumentParser, *, prompt_required: bool) -> None:
    group = parser.add_argument_group("the edit (the model's input fields)")
    group.add_argument("--prompt", required=prompt_required, help="the edit, in any language and with any punctuation")
    group.add_argument("--seed", type=int, help="same seed and prompt give the same image")
    group.add_argument("--guidance-scale", dest="guidance_scale", type=float, help="1 to 20 (model default 3.5)")
    group.add_argument("--num-images", dest="num_images", type=int, help="1 to 4 (model default 1); each image is billed")
    group.add_argument("--output-format", dest="output_format", choices=["jpeg", "png"])
    group.add_argument("--safety-tolerance", dest="safety_tolerance", choices=[str(n) for n in range(1, 7)], help="1 strict to 6 lax")
    group.add_argument(
        "--aspect-ratio",
        dest="aspect_ratio",
        choices=["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21", MATCH_INPUT],
        help="or 'match': the allowed ratio nearest the input image's",
    )
    group.add_argument("--enhance-prompt", dest="enhance_prompt", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--sync-mode", dest="sync_mode", action=argparse.BooleanOptionalAction, default=None)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kontext-s3",
        description="Edit images with FLUX.1 Kontext [max] by uploading them to S3.",
        epilog="examples:\n  kontext-s3 upload photo.jpg --prompt 'Make it snow' --wait\n  kontext-s3 status inputs/photo.jpg",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kontext-s3 {_version()}")
    _common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, summary: str, example: str, under: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = under.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common_options(sub, suppress=True)
        return sub

    upload = command(
        "upload",
        f"upload an image with its edit in the object's tags ({SUPPORTED})",
        "kontext-s3 upload kitchen.jpg --prompt 'Put a donut next to the flour.' --wait --download results/",
    )
    upload.add_argument("image", type=Path)
    _edit_options(upload, prompt_required=False)
    upload.add_argument("--key", help="object key (default: <input prefix><file name>)")
    upload.add_argument("--wait", action="store_true", help="follow the job until its outputs or error record")
    upload.add_argument("--download", type=Path, metavar="DIR", help="with --wait: save the images and manifest in DIR/<job id>/")
    upload.add_argument("--timeout", type=float, default=300.0, help="seconds --wait follows the job (default 300)")

    status = command("status", "a job's state and history, by input key or job id", "kontext-s3 status inputs/kitchen.jpg")
    status.add_argument("key_or_job")
    status.add_argument("--version-id", help="which version of the key (default: the latest)")

    recipe = command(
        "recipe",
        f"the edit for every upload under a prefix ({RECIPE_FILE}), for tools that cannot tag",
        "kontext-s3 recipe put catalogue/ --prompt 'Remove the background' --output-format png",
    )
    actions = recipe.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    put = command(
        "put",
        "write the recipe of a prefix; later uploads below it use it (their own tags override it field by field)",
        "kontext-s3 recipe put catalogue/ --prompt 'Remove the background' --output-format png",
        actions,
    )
    put.add_argument("prefix", help="a prefix inside the input prefix, such as catalogue/ (or inputs/catalogue/)")
    _edit_options(put, prompt_required=True)
    show = command(
        "show",
        "print the recipe that uploads under a prefix get now (the nearest at or above it)",
        "kontext-s3 recipe show catalogue/shoes/",
        actions,
    )
    show.add_argument("prefix")

    gallery = command(
        "gallery",
        "write a before/after HTML page of the jobs under a prefix (opens from disk, no server)",
        "kontext-s3 gallery catalogue/ --out gallery/ && xdg-open gallery/index.html",
    )
    gallery.add_argument("prefix", nargs="?", default="", help="under the output prefix (default: every job)")
    gallery.add_argument("--out", type=Path, default=Path("gallery"), help="folder for index.html and its images")
    gallery.add_argument(
        "--images",
        choices=["copy", "presign"],
        default="copy",
        help="copy the images beside the page (default), or link them by presigned URLs valid one hour",
    )

    backfill = command(
        "backfill",
        "start jobs for the images already under a prefix (each object once: a second run starts nothing)",
        "kontext-s3 backfill catalogue/ --prompt 'Remove the background'",
    )
    backfill.add_argument("prefix", nargs="?", default="", help="inside the input prefix, such as catalogue/ (default: all of it)")
    _edit_options(backfill, prompt_required=False)

    dlq = command("dlq", "the uploads that ended in the dead-letter queue", "kontext-s3 dlq list")
    dlq_actions = dlq.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    command(
        "list", "each dead message: its key, how often it was received, and the error record's reason", "kontext-s3 dlq list", dlq_actions
    )
    redrive = command(
        "redrive",
        "move dead messages back to the uploads queue (an upload whose job already ended is not paid again)",
        "kontext-s3 dlq redrive --key inputs/catalogue/shoe.jpg",
        dlq_actions,
    )
    which = redrive.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="the input key whose messages move back")
    which.add_argument("--all", dest="everything", action="store_true", help="every message in the dead-letter queue")

    tags = command(
        "tags",
        "print the tagging string for aws s3api put-object --tagging",
        "aws s3api put-object --bucket B --key inputs/a.jpg --body a.jpg --tagging \"$(kontext-s3 tags --prompt 'Make it snow')\"",
    )
    _edit_options(tags, prompt_required=True)
    return parser


def _fields_from(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": args.prompt} if getattr(args, "prompt", None) is not None else {}
    for name in OPTIONAL_TAG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    return fields


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines (shell-quoted) from ``make stack``; refuses a file whose stack has stopped."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        values[name.strip()] = (shlex.split(value) or [""])[0]
    pid = values.get("KONTEXT_S3_STACK_PID")
    if pid and pid.isdigit() and not _alive(int(pid)):
        raise CliError(f"error: the local stack that wrote {path} (pid {pid}) has stopped; start it again with: make stack")
    return values


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _settings(args: argparse.Namespace) -> dict[str, str]:
    """The environment, over the env file's values (flags are applied by the caller)."""
    explicit = getattr(args, "env_file", None) or os.environ.get("KONTEXT_S3_ENV_FILE")
    named_elsewhere = any(getattr(args, name, None) for name in ("stack", "bucket")) or any(
        os.environ.get(name) for name in ("KONTEXT_S3_STACK", "KONTEXT_S3_BUCKET")
    )
    if not explicit and named_elsewhere:
        return dict(os.environ)  # the local stack's file comes last: a named stack or bucket is never sent to it
    path = Path(explicit) if explicit else DEFAULT_ENV_FILE
    from_file: dict[str, str] = {}
    if path.is_file():
        try:
            from_file = read_env_file(path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CliError(f"error: cannot read {path} ({exc}); run make stack again to rewrite it", EXIT_USAGE) from None
    elif explicit:
        raise CliError(f"error: no env file {path}; start the local stack with make stack, or drop --env-file", EXIT_USAGE)
    return {**from_file, **os.environ}


def _target(args: argparse.Namespace) -> Target:
    env = _settings(args)
    endpoint = getattr(args, "endpoint_url", None) or env.get("AWS_ENDPOINT_URL")
    region = getattr(args, "region", None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    bucket = getattr(args, "bucket", None) or env.get("KONTEXT_S3_BUCKET")
    table = getattr(args, "table", None) or env.get("KONTEXT_S3_TABLE")
    input_prefix = env.get("KONTEXT_S3_INPUT_PREFIX", "inputs/")
    output_prefix = env.get("KONTEXT_S3_OUTPUT_PREFIX", "outputs/")
    credentials = None
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        credentials = Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN"))
    queue_url, dlq_url = env.get("KONTEXT_S3_QUEUE_URL"), env.get("KONTEXT_S3_DLQ_URL")
    stack = getattr(args, "stack", None) or env.get("KONTEXT_S3_STACK")
    if stack and not (bucket and table and queue_url and dlq_url):
        try:
            described = boto3.client("cloudformation", endpoint_url=endpoint, region_name=region).describe_stacks(StackName=stack)
        except ClientError as exc:
            if "does not exist" in str(exc):
                raise CliError(f"error: no CloudFormation stack named {stack!r} in this region; check --stack and --region") from None
            raise
        outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Stacks"][0].get("Outputs", [])}
        bucket = bucket or outputs.get("InputBucketName")
        table = table or outputs.get("JobsTableName")
        input_prefix = outputs.get("InputPrefix", input_prefix)
        output_prefix = outputs.get("OutputPrefix", output_prefix)
        queue_url = queue_url or outputs.get("UploadsQueueUrl")
        dlq_url = dlq_url or outputs.get("DeadLetterQueueUrl")
    if not bucket:
        raise CliError(
            "error: no bucket: pass --stack (the deployed stack's name) or --bucket, set KONTEXT_S3_BUCKET, "
            "or start the local stack with make stack",
            EXIT_USAGE,
        )
    return Target(
        bucket=bucket,
        table=table,
        input_prefix=input_prefix,
        output_prefix=output_prefix,
        endpoint_url=endpoint,
        region=region,
        credentials=credentials,
        queue_url=queue_url,
        dlq_url=dlq_url,
    )


def _aws_sentence(exc: Exception, bucket: str | None) -> str:
    """One line for what AWS (or the way to it) refused, with what to do."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "error: no AWS credentials found; sign in (aws sso login, or aws configure) and try again"
    if isinstance(exc, NoRegionError):
        return "error: no AWS region; pass --region or set AWS_REGION"
    if isinstance(exc, EndpointConnectionError):
        return (
            f"error: cannot reach {exc.kwargs.get('endpoint_url', 'AWS')}; if that is the local stack, it has stopped "
            "or restarted: run make stack again (the CLI reads out/stack.env)"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _EXPIRED:
            return "error: your AWS credentials have expired; refresh them (aws sso login, or new keys) and try again"
        if code in _BAD_KEY:
            return "error: AWS does not recognise these credentials; check the profile or keys in use (aws sts get-caller-identity)"
        if code in ("NoSuchBucket",):
            return f"error: there is no bucket {bucket!r}; check --bucket / KONTEXT_S3_BUCKET, or use --stack"
        if code in ("AccessDenied", "AccessDeniedException", "403"):
            return f"error: AWS refused access ({exc.operation_name}); use the credentials of someone allowed on {bucket!r}"
        if code == "ResourceNotFoundException":
            return "error: the jobs table does not exist; check --table / KONTEXT_S3_TABLE, or use --stack"
        return f"error: AWS refused {exc.operation_name}: {code}: {exc.response.get('Error', {}).get('Message', '')}".rstrip(": ")
    return f"error: could not talk to AWS: {exc}"


@contextmanager
def _line_progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """One status line, rewritten in place on a terminal; one line per change otherwise."""
    tty = enabled and sys.stderr.isatty()
    width = [0]

    def show(line: str) -> None:
        if tty:
            sys.stderr.write("\r" + line.ljust(width[0]))
            width[0] = max(width[0], len(line))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    try:
        yield show
    finally:
        if tty and width[0]:
            sys.stderr.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    target: Target | None = None
    try:
        if args.command == "tags":
            print(tagging_header(encode_tags(validate_fields(_fields_from(args)))))
            return 0
        if args.command == "backfill" and _fields_from(args):
            validate_fields(_fields_from(args), prompt_required=False)
        if args.command == "upload":
            # The file is checked before anything about AWS, so a typo costs no round trip.
            read_image(args.image)
            if args.download and not args.wait:
                raise CliError("error: --download needs --wait", EXIT_USAGE)
            if _fields_from(args):
                validate_fields(_fields_from(args), prompt_required=False)
        target = _target(args)
        if args.command == "upload":
            return _upload(target, args)
        if args.command == "recipe":
            return _recipe(target, args)
        if args.command == "backfill":
            return _backfill(target, args)
        if args.command == "dlq":
            return _dlq(target, args)
        if args.command == "gallery":
            try:
                index = write_gallery(target, args.out, prefix=args.prefix, images=args.images)
            except GalleryError as exc:
                raise CliError(str(exc)) from None
            print(f"gallery written: {index.resolve()}")
            return 0
        return _status(target, args)
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except TagEncodingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ClientError, BotoCoreError) as exc:
        print(_aws_sentence(exc, target.bucket if target else None), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ninterrupted; anything already uploaded is still processed (kontext-s3 status KEY follows it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, KeyError, OSError) as exc:
        # What is left: a malformed record or recipe in the bucket, an endpoint URL that is not one, a file system error.
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _upload(target: Target, args: argparse.Namespace) -> int:
    fields = _fields_from(args)
    uploaded = upload_image(target, args.image, fields, key=args.key)
    print(f"uploaded s3://{target.bucket}/{uploaded.key} (version {uploaded.version_id})")
    if not fields:
        print("no edit fields given: the folder's recipe gives the edit (kontext-s3 recipe show)")
    print(f"job {uploaded.job_id}; results will appear under s3://{target.bucket}/{uploaded.output_prefix}")
    if not args.wait:
        return 0
    with _line_progress(True) as show:
        try:
            result = wait_for_result(target, uploaded, timeout=args.timeout, progress=show)
        except WaitTimedOut as exc:
            raise WaitTimedOut(f"{exc}; the job goes on; follow it with: kontext-s3 status {uploaded.job_id}") from None
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


def _queue(url: str | None, which: str, variable: str) -> str:
    if not url:
        raise CliError(f"error: the {which} is not known: pass --stack, set {variable}, or use make stack", EXIT_USAGE)
    return url


def _backfill(target: Target, args: argparse.Namespace) -> int:
    queue_url = _queue(target.queue_url, "uploads queue", "KONTEXT_S3_QUEUE_URL")
    prefix = args.prefix if args.prefix.startswith(target.input_prefix) else target.input_prefix + args.prefix.lstrip("/")
    fields = {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in _fields_from(args).items()}
    with _line_progress(True) as show:
        try:
            report = backfill(
                s3=target.client("s3"),
                sqs=target.client("sqs"),
                queue_url=queue_url,
                bucket=target.bucket,
                prefix=prefix,
                fields=fields,
                jobs=target.jobs(),
                progress=lambda r: show(f"s3://{target.bucket}/{prefix}: {r.line()}"),
            )
        except BackfillError as exc:
            raise CliError(f"error: {exc}") from None
    print(f"backfill of s3://{target.bucket}/{prefix}: {report.line()}")
    if report.queued:
        print("the submit function takes them in turn (admission and the daily budget apply); follow one with kontext-s3 status KEY")
    return 0


def _dlq(target: Target, args: argparse.Namespace) -> int:
    dlq_url = _queue(target.dlq_url, "dead-letter queue", "KONTEXT_S3_DLQ_URL")
    sqs = target.client("sqs")
    if args.action == "list":
        letters = list_dead_letters(sqs, dlq_url, failure_reasons(target.client("s3"), target.layout, target.jobs()))
        for letter in letters:
            what = ", ".join(letter.keys) or letter.note or "?"
            when = letter.sent_at.strftime("%Y-%m-%d %H:%M:%S UTC") if letter.sent_at else "?"
            # SQS counts every receive, this listing's too.
            print(f"{what}\treceived {letter.receive_count}x (this listing included)\tsent {when}\t{letter.reason or 'no error record'}")
        print(f"{len(letters)} message(s) in the dead-letter queue")
        return 0
    queue_url = _queue(target.queue_url, "uploads queue", "KONTEXT_S3_QUEUE_URL")
    moved = redrive(sqs, dlq_url, queue_url, key=args.key, everything=args.everything)
    for letter in moved:
        print(f"moved back: {', '.join(letter.keys) or letter.note}")
    print(f"{len(moved)} message(s) moved back to the uploads queue")
    return 0 if moved or args.everything else EXIT_FAILED


def _recipe(target: Target, args: argparse.Namespace) -> int:
    if args.action == "put":
        key, version_id = put_recipe(target, args.prefix, _fields_from(args))
        print(f"wrote s3://{target.bucket}/{key}" + (f" (version {version_id})" if version_id else ""))
        print("uploads below it from now on use it; their own tags override it field by field")
        return 0
    key, fields, version_id = show_recipe(target, args.prefix)
    print(f"# s3://{target.bucket}/{key}" + (f" (version {version_id})" if version_id else ""))
    print(json.dumps(fields, indent=2, ensure_ascii=False))
    return 0


def _status(target: Target, args: argparse.Namespace) -> int:
    jobs = target.jobs()
    if jobs is None:
        raise CliError("error: status needs the jobs table: pass --table, set KONTEXT_S3_TABLE, or use --stack", EXIT_USAGE)
    value = args.key_or_job
    if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        job_id = value
    else:
        version_id = args.version_id
        if not version_id:
            try:
                version_id = target.client("s3").head_object(Bucket=target.bucket, Key=value).get("VersionId")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise CliError(f"error: no object s3://{target.bucket}/{value}; give the input key or the job id") from None
                raise
        if not version_id or version_id == "null":
            raise CliError(f"error: s3://{target.bucket}/{value} has no version id (an unversioned bucket?); give the job id instead")
        job_id = derive_job_id(target.bucket, value, version_id)
    job = latest_job(jobs, job_id)  # a job id names its own job; an upload's id, all of its jobs
    failure = DeliveryFailures(jobs.table).latest(job_id) if job is None or not job.state.ended else None
    if job is None:
        if failure is not None:
            raise CliError(f"error: no job {job_id} yet: {printable(failure.sentence())}")
        raise CliError(f"error: no job {job_id} (not uploaded under the input prefix, not processed yet, or expired)")
    print(f"job      {job.job_id}")
    print(f"input    s3://{job.bucket}/{job.key} (version {job.version_id})")
    print(f"state    {job.state.value}: {describe(job, jobs)}")
    if job.request_id:
        print(f"fal      {job.request_id}")
    for label, at_ms in (
        ("arrived", job.arrived_at_ms),
        ("admitted", job.admitted_at_ms),
        ("sent", job.submitted_at_ms),
        ("ended", job.ended_at_ms),
    ):
        if at_ms:
            print(f"{label:<8} {iso(at_ms)}")
    if job.recipe:
        print(f"recipe   s3://{job.bucket}/{job.recipe['key']} (version {job.recipe.get('version_id')})")
    print(f"outputs  s3://{job.bucket}/{job.output_prefix}")
    if job.error_message:
        print(f"error    {job.error_code or ''} {job.error_message}".rstrip())
    if failure is not None and failure.at_ms >= (job.arrived_at_ms or 0):
        print(f"failing  {printable(failure.sentence())}")
    for key in job.output_keys:
        print(f"image    s3://{job.bucket}/{key}")
    print("history")
    for entry in job.history:
        print(f"  {entry.at}  {entry.state.value:<10}  {entry.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
