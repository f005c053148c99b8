"""``kontext-s3``: upload an image with its edit, follow a job, manage folder recipes, print tags for other tools.

Where it works is one deployment, chosen by one rule (:func:`choose_target`):
options (``--stack``, ``--env-file``, ``--bucket``/``--table``) over the
environment (``KONTEXT_S3_STACK``, ``KONTEXT_S3_ENV_FILE``, ``KONTEXT_S3_BUCKET``
with ``KONTEXT_S3_TABLE`` and the rest) over the env file ``make stack`` writes
(``out/stack.env``). Every field comes from the one chosen: a bucket or table
named beside a stack or an env file that is not its own is an error, never a
command spanning two deployments. ``AWS_ENDPOINT_URL`` (or ``--endpoint-url``)
points it at the local stack instead of AWS.

Two commands bend the rule for the buckets a stack is attached to (its
``AttachedBuckets``, buckets it did not create): ``backfill --bucket NAME``
lists NAME, which must be the stack's own bucket or one it is attached to, in
the deployment found from everything else; ``attach BUCKET...`` turns on their
EventBridge delivery and needs no deployment at all (one named is read only
for its ``AttachedBuckets``).

Every mistake ends in one line that says what is wrong and what to do next,
and a non-zero exit; never a traceback. Everything printed goes through
:func:`say`: keys, prompts, error texts and records are anyone's text, and none
of their control characters reaches the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
    ParamValidationError,
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
from kontext_s3.model_schema import (
    MATCH_INPUT,
    MAX_QUOTE_CHARS,
    OPTIONAL_TAG_FIELDS,
    KontextMaxInput,
    describe_validation_error,
    quote,
)
from kontext_s3.output_store import OutputLayout, has_dot_segments
from kontext_s3.recipes import RECIPE_FILE, InvalidRecipe, Recipe, is_recipe, parse_recipe, read_recipe, recipe_keys
from kontext_s3.tag_codec import TagEncodingError, decode_tags, encode_tags, tagging_header
from kontext_s3.text import printable, shorten
from kontext_s3_tools.backfill import BackfillError, backfill
from kontext_s3_tools.dead_letters import failure_reasons, list_dead_letters, redrive
from kontext_s3_tools.gallery import GalleryError, write_gallery

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
DEFAULT_ENV_FILE = Path("out") / "stack.env"

#: Room for argparse's own words around the argument it quotes (its longest, a list of choices, is ~150 characters).
_ARGPARSE_WORDS = 200

_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId", "UnrecognizedClientException"}
_BAD_KEY = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidSignatureException"}


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def say(*columns: object, err: bool = False) -> None:
    """Print one line, its columns joined by tabs: the only way this CLI prints.

    Each column is shown with its control characters escaped (``\\x1b``, ``\\n``), so an escape sequence in a key,
    a prompt or an error record is seen, never obeyed; the tabs between columns and the line's end are the CLI's own.
    """
    print("\t".join(printable(str(column)) for column in columns), file=sys.stderr if err else sys.stdout)


def _cut(value: object) -> str:
    """A value a one-line message echoes as it is (a path, a prefix), shortened: the line stays one line to read."""
    return shorten(str(value), MAX_QUOTE_CHARS)


def _session(credentials: Credentials | None, region: str | None) -> boto3.session.Session:
    """A session with these credentials, or boto3's usual chain when None."""
    if credentials is None:
        return boto3.session.Session(region_name=region)
    return boto3.session.Session(
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.token,
        region_name=region,
    )


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
    #: Where it came from, as the upload line names it (see :func:`choose_target`).
    label: str = "the given bucket"
    #: The local stack's env file it came from, if any.
    env_file: Path | None = None
    #: The stack's TagWaitSeconds, when it is known here (a stack's parameter, the env file, the environment).
    tag_wait_seconds: int | None = None
    #: The existing buckets the stack is attached to (its AttachedBuckets); None when that is not known here.
    attached_buckets: tuple[str, ...] | None = None
    #: The CloudFormation stack it came from (--stack, KONTEXT_S3_STACK), if any.
    stack: str | None = None

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.input_prefix, self.output_prefix)

    @property
    def local(self) -> bool:
        """The local stack (its env file, or an endpoint other than AWS's): never a place to sign in to AWS for."""
        return self.env_file is not None or self.endpoint_url is not None

    def client(self, service: str) -> Any:
        return _session(self.credentials, self.region).client(service, endpoint_url=self.endpoint_url)  # type: ignore[call-overload]

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
            f"error: {_cut(path)} is a folder; upload one image, or put a recipe on a prefix (kontext-s3 recipe put) and copy "
            "the folder with aws s3 sync",
            EXIT_USAGE,
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"error: no such file: {_cut(path)}", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"error: cannot read {_cut(path)}: {exc.strerror}", EXIT_USAGE) from None
    header = read_header(data)
    content_type = header.content_type if header and header.content_type in TAKEN | CONVERTED else None
    if content_type is None:
        raise CliError(f"error: {_cut(path)} is not a {SUPPORTED} image (judged by its content, not its name)", EXIT_USAGE)
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
    key = input_key(target, name, key)
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


#: The AWS CLI commands whose ``--tagging`` ``kontext-s3 tags`` prints for: each takes another form.
TAG_FORMS = ("put-object", "put-object-tagging")


def tags_text(tags: Mapping[str, str], form: str = "put-object") -> str:
    """The tags as ``aws s3api <form> --tagging`` takes them.

    ``put-object`` takes a query string (``prompt=...&seed=7``); ``put-object-tagging`` takes a TagSet
    (``{"TagSet": [{"Key": ..., "Value": ...}]}``) and refuses the query string ("Missing required parameter in
    Tagging: TagSet").
    """
    if form == "put-object-tagging":
        return json.dumps({"TagSet": [{"Key": key, "Value": value} for key, value in tags.items()]}, separators=(",", ":"))
    return tagging_header(tags)


def input_key(target: Target, name: str, key: str | None = None) -> str:
    """The key an upload of the file ``name`` goes to: ``key``, else the file's name under the input prefix."""
    key = key or f"{target.input_prefix}{name}"
    if not key.startswith(target.input_prefix):
        raise CliError(f"error: the key {quote(key)} must start with the input prefix {quote(target.input_prefix)}", EXIT_USAGE)
    return key


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
    progress: Callable[[str], None] = say,
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
        raise CliError(
            f"error: cannot save into {_cut(directory)}: {_cut(exc.strerror or exc)}; choose another --download folder"
        ) from None
    written.append(manifest)
    return written


def recipe_key(target: Target, prefix: str) -> str:
    """The recipe's key for a prefix given with or without the input prefix (``catalogue/`` or ``inputs/catalogue/``)."""
    prefix = prefix.strip("/")
    if has_dot_segments(prefix + "/x"):
        raise CliError(f"error: the prefix {quote(prefix)} has '.' or '..' segments; give a plain folder such as catalogue/", EXIT_USAGE)
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


def nearest_recipe(target: Target, key: str) -> Recipe | None:
    """The recipe an upload at ``key`` gets now: the nearest one at or above its folder, read and checked as the
    submit function reads and checks it (so one it would refuse is refused here, in one line)."""
    s3 = target.client("s3")
    for candidate in recipe_keys(key, target.input_prefix):
        try:
            return read_recipe(s3, target.bucket, candidate)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                continue
            raise
        except InvalidRecipe as exc:
            raise CliError(f"error: {exc}; uploads under it fail until it is fixed (kontext-s3 recipe put)") from None
    return None


def show_recipe(target: Target, prefix: str) -> tuple[str, dict[str, Any], str | None]:
    """The recipe that uploads under ``prefix`` get now (:func:`nearest_recipe`)."""
    folder = recipe_key(target, prefix).removesuffix(RECIPE_FILE)
    recipe = nearest_recipe(target, folder + "x")
    if recipe is None:
        raise CliError(f"error: no recipe applies under {_cut(folder)}; write one with kontext-s3 recipe put")
    return recipe.key, recipe.fields, recipe.version_id


# -- command line -------------------------------------------------------------------------


def _version() -> str:
    try:
        return version("kontext-s3")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming the fix, not a usage block; and no abbreviated options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # An abbreviation is taken as the one option it starts: `--tag prompt=x` (tags this CLI has no option for)
        # would be --tags-later, an upload with no edit. Every option is given whole.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse quotes the arguments it refuses: anyone's text, of any length.
        message = printable(shorten(message, MAX_QUOTE_CHARS + _ARGPARSE_WORDS))
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # In the subcommands the defaults are suppressed, so an option given before the subcommand is not overwritten.
    default: Any = argparse.SUPPRESS if suppress else None
    # One place is used: options, else KONTEXT_S3_* variables, else out/stack.env (choose_target); never fields of two.
    group = parser.add_argument_group("where the stack is (one place: options, else KONTEXT_S3_* variables, else out/stack.env)")
    group.add_argument("--stack", default=default, help="the deployed CloudFormation stack: every name comes from its outputs")
    group.add_argument("--bucket", default=default, help="the input bucket (default: KONTEXT_S3_BUCKET)")
    group.add_argument("--table", default=default, help="the jobs table (default: KONTEXT_S3_TABLE)")
    group.add_argument("--endpoint-url", default=default, help="an AWS endpoint other than AWS's own (the local stack)")
    group.add_argument("--region", default=default)
    group.add_argument(
        "--env-file",
        default=default,
        type=Path,
        help=f"the local stack's names and keys, written by make stack (default: {DEFAULT_ENV_FILE})",
    )


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

    def command(name: str, summary: str, example: str, under: Any = commands, details: str = "") -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = under.add_parser(
            name,
            help=summary,
            description=f"{summary}\n\n{details}" if details else summary,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common_options(sub, suppress=True)
        return sub

    upload = command(
        "upload",
        f"upload an image with its edit in the object's tags ({SUPPORTED})",
        "kontext-s3 upload kitchen.jpg --prompt 'Put a donut next to the flour.' --wait --download results/",
        details="It first prints the stack (or env file, or variable) and bucket it uses. With no --prompt, the nearest\n"
        "recipe above the key gives the edit (its key is printed); with no recipe either, the upload is refused\n"
        "unless --tags-later says you will tag it within the stack's TagWaitSeconds.",
    )
    upload.add_argument("image", type=Path)
    _edit_options(upload, prompt_required=False)
    upload.add_argument("--key", help="object key (default: <input prefix><file name>)")
    upload.add_argument("--wait", action="store_true", help="follow the job until its outputs or error record")
    upload.add_argument("--download", type=Path, metavar="DIR", help="with --wait: save the images and manifest in DIR/<job id>/")
    upload.add_argument("--timeout", type=float, default=300.0, help="seconds --wait follows the job (default 300)")
    upload.add_argument(
        "--tags-later",
        action="store_true",
        help="upload with no prompt, to tag it within the stack's TagWaitSeconds (without --prompt or a recipe above the key, "
        "upload refuses otherwise)",
    )

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
        "kontext-s3 backfill catalogue/ --prompt 'Remove the background'\n"
        "  kontext-s3 --stack kontext-s3 backfill --bucket my-catalogue catalogue/",
        details="--bucket NAME lists a bucket the stack is attached to (its AttachedBuckets) instead of its own; the stack\n"
        "(its jobs table and uploads queue) is found as usual: --stack, KONTEXT_S3_* variables, out/stack.env.",
    )
    backfill.add_argument("prefix", nargs="?", default="", help="inside the input prefix, such as catalogue/ (default: all of it)")
    _edit_options(backfill, prompt_required=False)

    attach = command(
        "attach",
        "turn on S3's EventBridge delivery of existing buckets, so their uploads reach a stack deployed with AttachedBuckets",
        "kontext-s3 --stack kontext-s3 attach my-catalogue",
        details="Each bucket's notification configuration is read, EventBridge is added, and the whole of it is put back:\n"
        "its queue, topic and Lambda destinations stay as they were. A bucket already on is left alone. It talks to S3\n"
        "with your credentials; a stack named as usual (--stack, KONTEXT_S3_*, out/stack.env) is read only to remind you\n"
        "of a bucket missing from its AttachedBuckets. backfill --bucket NAME then starts jobs for what is in it already.\n"
        "Exit codes: 0 done, 1 (--check) a bucket is off, 2 a bucket that is not there or not yours to configure.",
    )
    attach.add_argument("buckets", nargs="+", metavar="BUCKET", help="bucket names, such as my-catalogue")
    attach.add_argument("--check", action="store_true", help="change nothing: say whether each one's delivery is on (exit 1 if one is off)")

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
        "print the edit as S3 tags: for aws s3api put-object --tagging (default), or put-object-tagging --tagging",
        "aws s3api put-object --bucket B --key inputs/a.jpg --body a.jpg --tagging \"$(kontext-s3 tags --prompt 'Make it snow')\"\n"
        "  aws s3api put-object-tagging --bucket B --key inputs/a.jpg "
        "--tagging \"$(kontext-s3 tags --for put-object-tagging --prompt 'Now in red')\"",
    )
    _edit_options(tags, prompt_required=True)
    tags.add_argument(
        "--for",
        dest="tags_for",
        choices=TAG_FORMS,
        default="put-object",
        help="the command the tags are for: put-object takes a query string (default), put-object-tagging a JSON TagSet",
    )
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
    # A pid is a short run of ASCII digits; anything else is a damaged file (int() of 5,000 digits would raise, and
    # os.kill of a huge number overflow), reported by the caller as one to rewrite.
    if pid and not (pid.isascii() and pid.isdigit() and len(pid) <= 10):
        raise ValueError(f"KONTEXT_S3_STACK_PID is not a process id: {quote(pid)}")
    if pid and not _alive(int(pid)):
        raise CliError(f"error: the local stack that wrote {_cut(path)} (pid {pid}) has stopped; start it again with: make stack")
    return values


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# -- where the CLI works: one rule ----------------------------------------------------------------

_BUCKET = "KONTEXT_S3_BUCKET"
_TABLE = "KONTEXT_S3_TABLE"
_TAG_WAIT = "KONTEXT_S3_TAG_WAIT_SECONDS"
#: The existing buckets the stack is attached to (its ``AttachedBuckets``), comma-separated. Present but empty: none.
_ATTACHED = "KONTEXT_S3_ATTACHED_BUCKETS"
#: Everything one deployment tells the CLI, by the names the environment and the env file use.
_PLACE = (
    _BUCKET,
    _TABLE,
    "KONTEXT_S3_QUEUE_URL",
    "KONTEXT_S3_DLQ_URL",
    "KONTEXT_S3_INPUT_PREFIX",
    "KONTEXT_S3_OUTPUT_PREFIX",
    _TAG_WAIT,
    _ATTACHED,
)
#: Settings that have no option: a bucket named by ``--bucket`` takes them from the environment (or their defaults).
_NO_OPTION = ("KONTEXT_S3_INPUT_PREFIX", "KONTEXT_S3_OUTPUT_PREFIX", _TAG_WAIT)
#: A deployed stack's outputs and parameters, by the same names.
_STACK_OUTPUTS = {
    "InputBucketName": _BUCKET,
    "JobsTableName": _TABLE,
    "UploadsQueueUrl": "KONTEXT_S3_QUEUE_URL",
    "DeadLetterQueueUrl": "KONTEXT_S3_DLQ_URL",
    "InputPrefix": "KONTEXT_S3_INPUT_PREFIX",
    "OutputPrefix": "KONTEXT_S3_OUTPUT_PREFIX",
}
_STACK_PARAMETERS = {"TagWaitSeconds": _TAG_WAIT}
#: What :func:`choose_target` answers when nothing names a place at all (``attach`` needs none).
_NO_PLACE = (
    "error: no bucket: pass --stack (the deployed stack's name) or --bucket, set KONTEXT_S3_BUCKET, "
    "or start the local stack with make stack"
)
#: What a local user is told instead of signing in to AWS.
_LOCAL_HINT = "is the local stack running? make stack"


def _place_values(given: Mapping[str, str]) -> dict[str, str]:
    """The deployment's values among ``given``; an empty value is no value, but for the attached buckets (none)."""
    return {name: given[name] for name in _PLACE if given.get(name) or (name == _ATTACHED and name in given)}


def _bucket_names(text: str) -> tuple[str, ...]:
    """``AttachedBuckets`` as CloudFormation gives a CommaDelimitedList (``a,b``), or as an env file writes it."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _shown(where: str, value: str) -> str:
    """How a message names a value and where it was given: ``--stack 'B'`` or ``KONTEXT_S3_BUCKET='b'``."""
    return f"{where} {quote(value)}" if where.startswith("--") else f"{where}={quote(value)}"


def _undo(where: str) -> str:
    return f"drop {where}" if where.startswith("--") else f"unset {where}"


@dataclass(frozen=True)
class Named:
    """A bucket or table named outside a whole stack: by an option (``--bucket``) or the environment."""

    where: str  # "--bucket", "KONTEXT_S3_TABLE"
    name: str  # _BUCKET or _TABLE
    value: str

    def __str__(self) -> str:
        return _shown(self.where, self.value)


@dataclass(frozen=True)
class TargetError:
    """Why the CLI cannot tell where to work: the one line it prints (exit ``EXIT_USAGE``)."""

    message: str


@dataclass(frozen=True)
class TargetSource:
    """The one place the CLI works in, as :func:`choose_target` chose it; its fields all come from there."""

    #: How the upload line names it: ``stack 'B' (--stack)``, ``local stack from out/stack.env``, ``KONTEXT_S3_BUCKET``.
    label: str
    #: What names it, as a conflict names it: ``--stack 'B'``, ``KONTEXT_S3_ENV_FILE='f'``, ``out/stack.env``.
    given_by: str
    #: What the user changes to aim elsewhere (``--stack``, ``KONTEXT_S3_STACK``); None for the default env file.
    where: str | None
    #: KONTEXT_S3_* values; for a stack, filled in by :meth:`settle` once CloudFormation has described it.
    values: Mapping[str, str] = field(default_factory=dict)
    stack: str | None = None
    env_file: Path | None = None
    #: Buckets and tables named elsewhere (options, environment) that must be this place's own.
    claims: tuple[Named, ...] = ()
    endpoint_url: str | None = None
    region: str | None = None
    credentials: Credentials | None = None

    @property
    def local(self) -> bool:
        """The local stack (its env file, or an endpoint other than AWS's): never a place to sign in to AWS for."""
        return self.env_file is not None or self.endpoint_url is not None

    @property
    def bucket(self) -> str | None:
        return self.values.get(_BUCKET)

    def settle(self, described: Mapping[str, str]) -> TargetSource | TargetError:
        """This stack with the values CloudFormation gave, checked against the buckets and tables named elsewhere."""
        return _agreed(replace(self, values=dict(described)))


def _agreed(source: TargetSource) -> TargetSource | TargetError:
    """``source``, unless a bucket or table named elsewhere is not its own: then one command would span two places."""
    for claim in source.claims:
        own = source.values.get(claim.name)
        if own is None or own == claim.value:
            continue
        what = "bucket" if claim.name == _BUCKET else "table"
        owner = f"stack {quote(source.stack)}" if source.stack else _cut(source.env_file)
        fix = _undo(claim.where) + (f" or {_undo(source.where)}" if source.where else "")
        return TargetError(f"error: {source.given_by} and {claim} point at different places ({owner} has {what} {quote(own)}); {fix}")
    return source


def _credentials(values: Mapping[str, str]) -> Credentials | None:
    if values.get("AWS_ACCESS_KEY_ID") and values.get("AWS_SECRET_ACCESS_KEY"):
        return Credentials(values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"], values.get("AWS_SESSION_TOKEN"))
    return None


def choose_target(
    options: Mapping[str, Any],
    environ: Mapping[str, str],
    env_file: Callable[[Path], Mapping[str, str] | None],
) -> TargetSource | TargetError:
    """Where the CLI works: the one rule, and the only place it is decided.

    Options (``--stack``, ``--env-file``, ``--bucket``) come before the environment (``KONTEXT_S3_STACK``,
    ``KONTEXT_S3_ENV_FILE``, ``KONTEXT_S3_BUCKET``), which comes before the local stack's ``out/stack.env``; the
    first that names a place is where every field comes from (a stack or an env file names a whole deployment; a
    bucket names a place with the table and queues given beside it). Fields are never taken from two places: a
    bucket or table named anywhere (an option or the environment) beside a stack or an env file must be that one's
    own (:func:`_agreed`; a stack's once it is described), and two whole places at one level are an error.

    ``env_file`` reads an env file, None when there is none; it is called only for the file chosen, so a stale
    ``out/stack.env`` never gets in the way of ``--stack``.
    """

    def option(name: str) -> str | None:
        value = options.get(name)
        return str(value) if value else None

    option_names = tuple(
        Named(flag, name, value) for name, flag in ((_BUCKET, "--bucket"), (_TABLE, "--table")) if (value := option(flag[2:]))
    )
    env_names = tuple(Named(name, name, environ[name]) for name in (_BUCKET, _TABLE) if environ.get(name))
    claims = option_names + env_names
    # How to reach AWS is not which deployment: options, then what boto3 itself would read.
    endpoint = option("endpoint_url") or environ.get("AWS_ENDPOINT_URL") or None
    region = option("region") or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None
    credentials = _credentials(environ)

    def local_stack(path: Path, where: str | None) -> TargetSource | TargetError:
        values = env_file(path)
        if values is None:
            return TargetError(f"error: no env file {_cut(path)}; start the local stack with make stack, or {_undo(where or '--env-file')}")
        if not values.get(_BUCKET):
            return TargetError(f"error: {_cut(path)} names no bucket ({_BUCKET}); run make stack again to rewrite it")
        return _agreed(
            TargetSource(
                label=f"local stack from {_cut(path)}" + (f" ({where})" if where else ""),
                given_by=_shown(where, str(path)) if where else _cut(path),
                where=where,
                values=_place_values(values),
                env_file=path,
                claims=claims,
                # The file's endpoint and keys belong to its stack; only an explicit option overrides them.
                endpoint_url=option("endpoint_url") or values.get("AWS_ENDPOINT_URL") or None,
                region=option("region") or values.get("AWS_REGION") or values.get("AWS_DEFAULT_REGION") or None,
                credentials=_credentials(values),
            )
        )

    levels = (
        ("--stack", option("stack"), "--env-file", option("env_file"), option_names),
        ("KONTEXT_S3_STACK", environ.get("KONTEXT_S3_STACK"), "KONTEXT_S3_ENV_FILE", environ.get("KONTEXT_S3_ENV_FILE"), env_names),
    )
    for stack_where, stack, file_where, file, names in levels:
        if stack and file:
            return TargetError(
                f"error: {_shown(stack_where, stack)} and {_shown(file_where, file)} point at different places; "
                f"{_undo(stack_where)} or {_undo(file_where)}"
            )
        if stack:
            return TargetSource(
                label=f"stack {quote(stack)} ({stack_where})",
                given_by=_shown(stack_where, stack),
                where=stack_where,
                stack=stack,
                claims=claims,
                endpoint_url=endpoint,
                region=region,
                credentials=credentials,
            )
        if file:
            return local_stack(Path(file), file_where)
        bucket = next((named for named in names if named.name == _BUCKET), None)
        if bucket is not None:
            # --bucket: the environment's place is not this one; only settings with no option come from it.
            values = {name: environ[name] for name in _NO_OPTION if environ.get(name)} if names is option_names else _place_values(environ)
            values.update({named.name: named.value for named in option_names})  # --table over KONTEXT_S3_TABLE
            return TargetSource(
                label=bucket.where,
                given_by=str(bucket),
                where=bucket.where,
                values=values,
                endpoint_url=endpoint,
                region=region,
                credentials=credentials,
            )
    if env_file(DEFAULT_ENV_FILE) is not None:
        return local_stack(DEFAULT_ENV_FILE, None)
    return TargetError(_NO_PLACE)


def _env_file_values(path: Path) -> dict[str, str] | None:
    """The env file's values; None when there is none (whether that is a mistake is :func:`choose_target`'s call)."""
    try:
        if not path.is_file():
            return None
        return read_env_file(path)
    except OSError as exc:  # a name too long, a folder it cannot enter: the path is wrong, not the file
        raise CliError(f"error: cannot read {_cut(path)}: {exc.strerror}; check --env-file / KONTEXT_S3_ENV_FILE", EXIT_USAGE) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CliError(f"error: cannot read {_cut(path)} ({_cut(exc)}); run make stack again to rewrite it", EXIT_USAGE) from None


def _describe_stack(source: TargetSource) -> dict[str, str]:
    """The stack's outputs and parameters, by the names the environment and the env file use."""
    assert source.stack is not None
    client = _session(source.credentials, source.region).client("cloudformation", endpoint_url=source.endpoint_url)
    try:
        described = client.describe_stacks(StackName=source.stack)["Stacks"][0]
    except ClientError as exc:
        if "does not exist" in str(exc):
            at = f"at {_cut(source.endpoint_url)}" if source.endpoint_url else "in this region"
            raise CliError(
                f"error: no CloudFormation stack named {quote(source.stack)} {at}; check {source.where} and --region", EXIT_USAGE
            ) from None
        raise
    outputs = {o["OutputKey"]: o.get("OutputValue", "") for o in described.get("Outputs", [])}
    parameters = {p["ParameterKey"]: p.get("ParameterValue", "") for p in described.get("Parameters", [])}
    values = {name: outputs[key] for key, name in _STACK_OUTPUTS.items() if outputs.get(key)}
    values.update({name: parameters[key] for key, name in _STACK_PARAMETERS.items() if parameters.get(key)})
    if "AttachedBuckets" in parameters:  # empty too: a stack with the parameter, attached to no bucket
        values[_ATTACHED] = parameters["AttachedBuckets"]
    if _BUCKET not in values:
        raise CliError(f"error: the stack {quote(source.stack)} has no InputBucketName output; is it a kontext-s3 stack?", EXIT_USAGE)
    return values


def _seconds(text: str | None) -> int | None:
    return int(text) if text and text.isascii() and text.isdigit() and len(text) <= 6 else None


def _source(args: argparse.Namespace) -> TargetSource:
    chosen = choose_target(vars(args), os.environ, _env_file_values)
    if isinstance(chosen, TargetError):
        raise CliError(chosen.message, EXIT_USAGE)
    return chosen


def _resolve(source: TargetSource) -> Target:
    """The target ``source`` names; a stack is described first (and checked against what was named beside it)."""
    if source.stack is not None:
        settled = source.settle(_describe_stack(source))
        if isinstance(settled, TargetError):
            raise CliError(settled.message, EXIT_USAGE)
        source = settled
    values = source.values
    return Target(
        bucket=values[_BUCKET],
        table=values.get(_TABLE),
        input_prefix=values.get("KONTEXT_S3_INPUT_PREFIX", "inputs/"),
        output_prefix=values.get("KONTEXT_S3_OUTPUT_PREFIX", "outputs/"),
        endpoint_url=source.endpoint_url,
        region=source.region,
        credentials=source.credentials,
        queue_url=values.get("KONTEXT_S3_QUEUE_URL"),
        dlq_url=values.get("KONTEXT_S3_DLQ_URL"),
        label=source.label,
        env_file=source.env_file,
        tag_wait_seconds=_seconds(values.get(_TAG_WAIT)),
        attached_buckets=_bucket_names(values[_ATTACHED]) if _ATTACHED in values else None,
        stack=source.stack,
    )


def _target(args: argparse.Namespace) -> Target:
    return _resolve(_source(args))


def _aws_sentence(exc: Exception, where: Target | TargetSource | None) -> str:
    """One line for what AWS (or the way to it) refused, with what to do.

    A local user (the env file's stack, or any endpoint other than AWS's) is pointed at the local stack, never told
    to sign in to AWS.
    """
    local = where is not None and where.local
    endpoint = _cut(where.endpoint_url) if where and where.endpoint_url else "the local endpoint"
    bucket = where.bucket if where else None
    source = f" (from {where.label})" if where and where.label else ""
    restarted = f"{_LOCAL_HINT} (each start writes new names and keys to {DEFAULT_ENV_FILE})"
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        if local:
            return f"error: no credentials for {endpoint}; {restarted}"
        if where is not None and DEFAULT_ENV_FILE.is_file():
            # The local stack is up, but something named above it aims this command at AWS.
            return (
                f"error: no AWS credentials; {where.label} aims this command at AWS, not at the local stack of "
                f"{DEFAULT_ENV_FILE} (used only when no option or KONTEXT_S3_* variable names a place)"
            )
        return "error: no AWS credentials found; sign in (aws sso login, or aws configure) and try again"
    if isinstance(exc, NoRegionError):
        return f"error: no region for {endpoint}; {restarted}" if local else "error: no AWS region; pass --region or set AWS_REGION"
    if isinstance(exc, EndpointConnectionError):
        return (
            f"error: cannot reach {_cut(exc.kwargs.get('endpoint_url', 'AWS'))}; if that is the local stack, it has stopped "
            "or restarted: run make stack again (the CLI reads out/stack.env)"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _EXPIRED:
            if local:
                return f"error: {endpoint} says these credentials have expired; {restarted}"
            return "error: your AWS credentials have expired; refresh them (aws sso login, or new keys) and try again"
        if code in _BAD_KEY:
            if local:
                return f"error: {endpoint} does not know these credentials; {restarted}"
            return "error: AWS does not recognise these credentials; check the profile or keys in use (aws sts get-caller-identity)"
        if code in ("NoSuchBucket",):
            if local:
                return f"error: there is no bucket {quote(bucket)} at {endpoint}; {restarted}"
            return f"error: there is no bucket {quote(bucket)}{source}; check it, or use --stack"
        if code in ("AccessDenied", "AccessDeniedException", "403"):
            return f"error: access refused ({exc.operation_name}); use the credentials of someone allowed on {quote(bucket)}"
        if code == "ResourceNotFoundException":
            if local:
                return f"error: the jobs table does not exist at {endpoint}; {restarted}"
            return f"error: the jobs table does not exist{source}; check --table / KONTEXT_S3_TABLE, or use --stack"
        said = _cut(exc.response.get("Error", {}).get("Message", ""))
        return f"error: AWS refused {exc.operation_name}: {_cut(code)}: {said}".rstrip(": ")
    return f"error: could not talk to AWS: {_cut(exc)}"


@contextmanager
def _line_progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """One status line, rewritten in place on a terminal; one line per change otherwise."""
    tty = enabled and sys.stderr.isatty()
    width = [0]

    def show(line: str) -> None:
        line = printable(line)
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
    # What the AWS errors are explained against: the source once chosen, the target once resolved.
    where: Target | TargetSource | None = None
    try:
        if args.command == "tags":
            say(tags_text(encode_tags(validate_fields(_fields_from(args))), args.tags_for))
            return 0
        if args.command == "backfill" and _fields_from(args):
            validate_fields(_fields_from(args), prompt_required=False)
        if args.command == "attach":
            # Any stack named is read (for its AttachedBuckets); with none, S3 is reached as the options and boto3 say.
            place = _attach_place(args)
            if place is None:
                where = reach = _reach(args)
                return _attach(args, reach, None)
            where = found = _resolve(place)
            return _attach(args, found, found)
        if args.command == "backfill" and args.bucket:
            where = source = _backfill_source(args)
            where = target = _in_bucket(_resolve(source), args.bucket)
            return _backfill(target, args)
        if args.command == "upload":
            # The file is checked before anything about AWS, so a typo costs no round trip.
            read_image(args.image)
            if args.download and not args.wait:
                raise CliError("error: --download needs --wait", EXIT_USAGE)
            if args.tags_later and args.prompt is not None:
                raise CliError("error: --tags-later is for an upload without --prompt (its tags come later); drop one", EXIT_USAGE)
            if _fields_from(args):
                validate_fields(_fields_from(args), prompt_required=False)
        where = source = _source(args)
        where = target = _resolve(source)
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
            say(f"gallery written: {index.resolve()}")
            return 0
        return _status(target, args)
    except CliError as exc:
        say(str(exc), err=True)
        return exc.code
    except TagEncodingError as exc:
        say(f"error: {exc}", err=True)
        return EXIT_USAGE
    except (ClientError, BotoCoreError) as exc:
        say(_aws_sentence(exc, where), err=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        say(err=True)  # ends a status line rewritten in place
        say("interrupted; anything already uploaded is still processed (kontext-s3 status KEY follows it)", err=True)
        return EXIT_INTERRUPTED
    except (ValueError, KeyError, OSError) as exc:
        # What is left: a malformed record or recipe in the bucket, an endpoint URL that is not one, a file system error.
        say(f"error: {type(exc).__name__}: {_cut(exc)}", err=True)
        return EXIT_FAILED


def _upload(target: Target, args: argparse.Namespace) -> int:
    fields = _fields_from(args)
    key = input_key(target, args.image.name, args.key)
    # Before anything is uploaded (and paid for): which deployment this is.
    endpoint = f"; endpoint {target.endpoint_url}" if target.endpoint_url else ""
    say(f"target: {target.label}; bucket {target.bucket}{endpoint}")
    edit = edit_without_prompt(target, key, fields, tags_later=args.tags_later)
    uploaded = upload_image(target, args.image, fields, key=key)
    say(f"uploaded s3://{target.bucket}/{uploaded.key} (version {uploaded.version_id})")
    for line in edit:
        say(line)
    say(f"job {uploaded.job_id}; results will appear under s3://{target.bucket}/{uploaded.output_prefix}")
    if not args.wait:
        return 0
    with _line_progress(True) as show:
        try:
            result = wait_for_result(target, uploaded, timeout=args.timeout, progress=show)
        except WaitTimedOut as exc:
            raise WaitTimedOut(f"{exc}; the job goes on; follow it with: kontext-s3 status {uploaded.job_id}") from None
    if not result.succeeded:
        assert result.error is not None
        say(f"failed ({result.error['code']}): {result.error['message']}", err=True)
        for problem in result.error.get("problems", []):
            say(f"  {problem['field']}: {problem['message']}", err=True)
        say(f"error record: s3://{target.bucket}/{uploaded.output_prefix}error.json", err=True)
        return EXIT_FAILED
    assert result.manifest is not None
    for image in result.manifest["images"]:
        say(f"s3://{target.bucket}/{image['key']}")
    say(f"s3://{target.bucket}/{uploaded.output_prefix}manifest.json")
    if args.download:
        for path in download(target, result, args.download):
            say(f"saved {path}")
    return 0


def edit_without_prompt(target: Target, key: str, fields: dict[str, Any], *, tags_later: bool) -> list[str]:
    """Where the edit of an upload with no prompt comes from (lines to print once it is uploaded), or a refusal.

    Without a prompt the submit function takes the nearest recipe's; with none, it waits TagWaitSeconds for tags and
    then fails the upload. So an upload nothing will give an edit is refused unless ``tags_later`` says tags follow.
    """
    if str(fields.get("prompt", "")).strip():
        return []
    folder = key.rsplit("/", 1)[0] + "/"
    recipe = nearest_recipe(target, key)
    at = f"s3://{target.bucket}/{recipe.key}" if recipe else ""
    if recipe is not None and str(recipe.fields.get("prompt", "")).strip():
        if tags_later:
            raise CliError(
                f"error: --tags-later: the recipe {_cut(at)} gives uploads under {_cut(folder)} their edit at once, so tags "
                "added later would run a second (paid) job; give the edit now, or drop --tags-later",
                EXIT_USAGE,
            )
        version = f" (version {recipe.version_id})" if recipe.version_id else ""
        over = "; the fields given here override it field by field" if fields else ""
        return [f"no --prompt: the recipe {at}{version} gives the edit{over}"]
    if not tags_later:
        why = f"the recipe {_cut(at)} gives no prompt" if recipe else f"no recipe for {_cut(folder)}"
        raise CliError(
            f"error: no prompt and {why}: give --prompt, put a recipe (kontext-s3 recipe put {_cut(shlex.quote(folder))} "
            "--prompt ...), or --tags-later if you will tag it",
            EXIT_USAGE,
        )
    if target.tag_wait_seconds == 0:
        raise CliError(
            "error: --tags-later: this stack does not wait for tags (TagWaitSeconds=0), so the upload would fail at once; give --prompt",
            EXIT_USAGE,
        )
    lines = [f"no prompt yet: {_tag_wait(target)}; then, with no prompt, it fails with an invalid_tags error record"]
    if fields:
        lines.append("put-object-tagging replaces every tag: give these fields again with the prompt")
    lines.append(f"tag it: {_tagging_command(target, key)}")
    return lines


def _tag_wait(target: Target) -> str:
    """How long the stack waits for an upload's tags, as far as it is known here."""
    if target.tag_wait_seconds is None:
        return "the stack waits for its tags (TagWaitSeconds)"
    return f"the stack waits up to {target.tag_wait_seconds} s for its tags (TagWaitSeconds)"


def _tagging_command(target: Target, key: str) -> str:
    return (
        f"aws s3api put-object-tagging --bucket {shlex.quote(target.bucket)} --key {shlex.quote(key)} "
        "--tagging \"$(kontext-s3 tags --for put-object-tagging --prompt '...')\""
    )


def _queue(target: Target, url: str | None, which: str, variable: str) -> str:
    if not url:
        raise CliError(
            f"error: the {which} is not known from {target.label}: pass --stack, set {variable} beside {_BUCKET}, or use make stack",
            EXIT_USAGE,
        )
    return url


def _backfill(target: Target, args: argparse.Namespace) -> int:
    queue_url = _queue(target, target.queue_url, "uploads queue", "KONTEXT_S3_QUEUE_URL")
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
    say(f"backfill of s3://{target.bucket}/{prefix}: {report.line()}")
    if report.queued:
        say("the submit function takes them in turn (admission and the daily budget apply); follow one with kontext-s3 status KEY")
    return 0


def _dlq(target: Target, args: argparse.Namespace) -> int:
    dlq_url = _queue(target, target.dlq_url, "dead-letter queue", "KONTEXT_S3_DLQ_URL")
    sqs = target.client("sqs")
    if args.action == "list":
        letters = list_dead_letters(sqs, dlq_url, failure_reasons(target.client("s3"), target.layout, target.jobs()))
        for letter in letters:
            what = ", ".join(letter.keys) or letter.note or "?"
            when = letter.sent_at.strftime("%Y-%m-%d %H:%M:%S UTC") if letter.sent_at else "?"
            # SQS counts every receive, this listing's too.
            say(what, f"received {letter.receive_count}x (this listing included)", f"sent {when}", letter.reason or "no error record")
        say(f"{len(letters)} message(s) in the dead-letter queue")
        return 0
    queue_url = _queue(target, target.queue_url, "uploads queue", "KONTEXT_S3_QUEUE_URL")
    moved = redrive(sqs, dlq_url, queue_url, key=args.key, everything=args.everything)
    for letter in moved:
        say(f"moved back: {', '.join(letter.keys) or letter.note}")
    say(f"{len(moved)} message(s) moved back to the uploads queue")
    return 0 if moved or args.everything else EXIT_FAILED


def _in_bucket(target: Target, bucket: str) -> Target:
    """``target`` working in ``bucket``: the stack's own, or one of its AttachedBuckets (backfill --bucket)."""
    if bucket == target.bucket:
        return target
    attached = target.attached_buckets
    if attached is None:
        # An env file or variables that do not say (the stack's parameters always do): the submit function decides.
        say(
            f"note: the AttachedBuckets of {_the_stack(target)} are not known here; unless the stack lists {_cut(bucket)}, "
            "its submit function ignores what is queued",
            err=True,
        )
    elif bucket not in attached:
        raise CliError(
            f"error: --bucket {quote(bucket)} is neither the bucket {_the_stack(target)} created nor one of its AttachedBuckets "
            f"({_listed(attached)}); deploy the stack with --parameter-overrides "
            f"AttachedBuckets={_cut(','.join([*attached, bucket]))}, then run kontext-s3 attach {_cut(shlex.quote(bucket))}",
            EXIT_USAGE,
        )
    return replace(target, bucket=bucket)


def _the_stack(target: Target) -> str:
    """How a line names the deployment: ``stack 'kontext-s3'``, or ``the stack (local stack from out/stack.env)``."""
    return f"stack {quote(target.stack)}" if target.stack else f"the stack ({target.label})"


def _listed(buckets: tuple[str, ...]) -> str:
    """The stack's AttachedBuckets (bucket names, which S3 keeps short and plain), or "none"."""
    return ", ".join(buckets) if buckets else "none"


def _backfill_source(args: argparse.Namespace) -> TargetSource:
    """Where ``backfill --bucket NAME`` works: the deployment the rule finds from everything but ``--bucket``.

    ``--bucket`` names the bucket to list, which must be the deployment's own or one it is attached to
    (:func:`_in_bucket`); the table and the uploads queue are the deployment's.
    """
    chosen = choose_target({**vars(args), "bucket": None}, os.environ, _env_file_values)
    if isinstance(chosen, TargetError):
        if chosen.message == _NO_PLACE:
            raise CliError(
                f"error: backfill --bucket {quote(args.bucket)} needs the stack the bucket is attached to: pass --stack, "
                "set KONTEXT_S3_STACK, or start the local stack with make stack",
                EXIT_USAGE,
            )
        raise CliError(chosen.message, EXIT_USAGE)
    return chosen


#: A notification configuration's destinations other than EventBridge: each kept as it is by attach.
_NOTIFICATION_TARGETS = ("QueueConfigurations", "TopicConfigurations", "LambdaFunctionConfigurations")


@dataclass(frozen=True)
class Delivery:
    """A bucket's EventBridge delivery, as attach found it (and left it)."""

    bucket: str
    was_on: bool
    #: Queue, topic and Lambda destinations the configuration has besides EventBridge.
    others: int
    turned_on: bool = False


def eventbridge_delivery(s3: Any, bucket: str, *, turn_on: bool) -> Delivery:
    """Whether ``bucket`` sends its events to EventBridge; with ``turn_on``, it does afterwards.

    PutBucketNotificationConfiguration replaces the whole configuration, so the one read is put back whole, with
    ``EventBridgeConfiguration`` added: every queue, topic and Lambda destination stays as it was. The existing
    destinations are not validated again (``SkipDestinationValidation``): one that S3 would now refuse, or one
    this caller may not read, is kept, not a reason to refuse. On already: nothing is written.
    """
    config = dict(s3.get_bucket_notification_configuration(Bucket=bucket))
    config.pop("ResponseMetadata", None)
    others = sum(len(config.get(name) or ()) for name in _NOTIFICATION_TARGETS)
    was_on = "EventBridgeConfiguration" in config
    if was_on or not turn_on:
        return Delivery(bucket, was_on, others)
    s3.put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={**config, "EventBridgeConfiguration": {}}, SkipDestinationValidation=True
    )
    return Delivery(bucket, was_on, others, turned_on=True)


def _bucket_name(given: str) -> str:
    """A bucket as attach takes it: ``my-catalogue``, ``s3://my-catalogue`` or ``s3://my-catalogue/``."""
    name = given.strip().removeprefix("s3://").rstrip("/")
    if not name or "/" in name:
        raise CliError(
            f"error: {quote(given)} is not a bucket name: give the name alone, such as my-catalogue (uploads go under the "
            "stack's InputPrefix in it)",
            EXIT_USAGE,
        )
    return name


def _delivery_refused(exc: ClientError, bucket: str, reach: Target | TargetSource, *, check: bool) -> str | None:
    """One line for S3's refusal about this bucket; None when it is about the credentials (every bucket alike)."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code in _EXPIRED or code in _BAD_KEY:
        return None
    at = f"s3://{_cut(bucket)}"
    if code == "NoSuchBucket":
        where = f" at {_cut(reach.endpoint_url)}" if reach.endpoint_url else ""
        return f"error: {at}: no such bucket{where}; check its name (kontext-s3 attach takes bucket names, such as my-catalogue)"
    if code in ("AccessDenied", "AllAccessDisabled", "403"):
        needs = "s3:GetBucketNotification" if check else "s3:GetBucketNotification and s3:PutBucketNotification"
        return (
            f"error: {at}: access refused ({exc.operation_name}); this needs {needs} on the bucket: "
            "use the bucket owner's credentials (aws sts get-caller-identity shows whose these are)"
        )
    said = _cut(error.get("Message", ""))
    return f"error: {at}: S3 refused {exc.operation_name}: {_cut(code)}: {said}".rstrip(": ")


def _reach(args: argparse.Namespace) -> TargetSource:
    """How to reach S3 when no place is named: the options, else what boto3 itself reads (attach needs no stack)."""
    return TargetSource(
        label="",
        given_by="",
        where=None,
        endpoint_url=args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
        region=args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None,
        credentials=_credentials(os.environ),
    )


def _attach_place(args: argparse.Namespace) -> TargetSource | None:
    """The deployment, when something names one (to check its AttachedBuckets); None when nothing does."""
    chosen = choose_target(vars(args), os.environ, _env_file_values)
    if isinstance(chosen, TargetError):
        if chosen.message == _NO_PLACE:
            return None
        raise CliError(chosen.message, EXIT_USAGE)
    return chosen


def _attach(args: argparse.Namespace, reach: Target | TargetSource, target: Target | None) -> int:
    """``kontext-s3 attach BUCKET...``: one line a bucket; with ``--check``, nothing changes."""
    s3 = (
        reach.client("s3")
        if isinstance(reach, Target)
        else _session(reach.credentials, reach.region).client("s3", endpoint_url=reach.endpoint_url)
    )
    refused = off = False
    fine: list[str] = []  # the buckets that send to EventBridge now (or would, for --check)
    for given in dict.fromkeys(args.buckets):  # each once, in the order given
        try:
            bucket = _bucket_name(given)
            if target is not None and bucket == target.bucket:
                raise CliError(
                    f"error: s3://{_cut(bucket)} is the bucket {_the_stack(target)} created: its own notifications send its "
                    "uploads to the stack, and CloudFormation keeps them; attach only buckets the stack did not create",
                    EXIT_USAGE,
                )
            delivery = eventbridge_delivery(s3, bucket, turn_on=not args.check)
        except CliError as exc:
            say(str(exc), err=True)
            refused = True
            continue
        except ParamValidationError:
            say(f"error: {quote(given)} is not a valid S3 bucket name; check it", err=True)
            refused = True
            continue
        except ClientError as exc:
            line = _delivery_refused(exc, bucket, reach, check=args.check)
            if line is None:
                raise
            say(line, err=True)
            refused = True
            continue
        at = f"s3://{_cut(bucket)}"
        others = f"{delivery.others} other notification target{'' if delivery.others == 1 else 's'}"
        if delivery.turned_on:
            say(f"{at}: EventBridge delivery on (was off; {others} kept)")
        elif delivery.was_on:
            say(f"{at}: EventBridge delivery {'on' if args.check else 'already on'} ({others})")
        else:
            say(f"{at}: EventBridge delivery off ({others}); turn it on with: kontext-s3 attach {_cut(shlex.quote(bucket))}")
            off = True
        if delivery.was_on or delivery.turned_on:
            fine.append(bucket)
    for line in _attached_reminder(target, fine):
        say(line)
    return EXIT_USAGE if refused else EXIT_FAILED if off else 0


def _attached_reminder(target: Target | None, buckets: list[str]) -> list[str]:
    """What the stack itself still needs, as far as it is known here: the buckets in its AttachedBuckets."""
    if target is None or not buckets:
        return []
    attached = target.attached_buckets
    if attached is None:
        if target.stack is None:
            return []  # an env file or variables that do not say: nothing to remind of
        return [
            f"reminder: {_the_stack(target)} has no AttachedBuckets parameter: deploy this version of the template with "
            f"--parameter-overrides AttachedBuckets={','.join(buckets)}, or its functions never see these uploads"
        ]
    missing = [bucket for bucket in buckets if bucket not in attached]
    if not missing:
        return []
    return [
        f"reminder: {_the_stack(target)} does not list {', '.join(missing)} in its AttachedBuckets ({_listed(attached)}): "
        "until it does, uploads there start nothing; deploy it with --parameter-overrides "
        f"AttachedBuckets={','.join([*attached, *missing])} (the whole list: it replaces the old one)"
    ]


def _recipe(target: Target, args: argparse.Namespace) -> int:
    if args.action == "put":
        key, version_id = put_recipe(target, args.prefix, _fields_from(args))
        say(f"wrote s3://{target.bucket}/{key}" + (f" (version {version_id})" if version_id else ""))
        say("uploads below it from now on use it; their own tags override it field by field")
        return 0
    key, fields, version_id = show_recipe(target, args.prefix)
    say(f"# s3://{target.bucket}/{key}" + (f" (version {version_id})" if version_id else ""))
    for line in json.dumps(fields, indent=2, ensure_ascii=False).splitlines():  # JSON's own lines; strings hold no newline
        say(line)
    return 0


def _waiting_for_tags(target: Target, job_id: str, key: str, version_id: str) -> list[str] | None:
    """Status lines for an upload with no job because it waits for its tags (no prompt tag, no recipe); else None.

    The submit function makes no job while it waits: it holds the upload's event back TagWaitSeconds, then either
    starts the job (a prompt came) or fails it with an invalid_tags record.
    """
    if not key.startswith(target.input_prefix) or is_recipe(key):
        return None  # the submit function never takes it: nothing waits
    s3 = target.client("s3")
    try:
        head = s3.head_object(Bucket=target.bucket, Key=key, VersionId=version_id)
        tag_set = s3.get_object_tagging(Bucket=target.bucket, Key=key, VersionId=version_id)["TagSet"]
        fields = decode_tags({tag["Key"]: tag["Value"] for tag in tag_set})
    except (ClientError, TagEncodingError):
        return None  # not readable here (a permission, a damaged tag): the plain "no job" stands
    recipe = nearest_recipe(target, key)
    if str(fields.get("prompt", "")).strip() or (recipe is not None and str(recipe.fields.get("prompt", "")).strip()):
        return None  # it has its edit: waiting for the upload event, not for tags
    wait = target.tag_wait_seconds
    if wait == 0:
        state = "no prompt tag or recipe, and the stack does not wait for tags (TagWaitSeconds=0): it fails when processed"
    elif wait is None:
        state = "no prompt tag or recipe yet: waiting for its tags (TagWaitSeconds)"
    else:
        until_ms = int(head["LastModified"].timestamp() * 1000) + wait * 1000
        if until_ms > time.time() * 1000:
            state = f"no prompt tag or recipe yet: waiting up to {wait} s for tags (TagWaitSeconds), until {iso(until_ms)}"
        else:
            state = f"no prompt tag or recipe: its wait for tags ({wait} s, TagWaitSeconds) ended at {iso(until_ms)}"
    return [
        f"job      none yet (the upload's job will be {job_id})",
        f"input    s3://{target.bucket}/{key} (version {version_id})",
        f"state    {state}",
        "then     a prompt tag in time starts the job; without one the upload fails with an invalid_tags error record "
        "(nothing is sent to fal)",
        f"tag it   {_tagging_command(target, key)}",
    ]


def _status(target: Target, args: argparse.Namespace) -> int:
    jobs = target.jobs()
    if jobs is None:
        raise CliError("error: status needs the jobs table: pass --table, set KONTEXT_S3_TABLE, or use --stack", EXIT_USAGE)
    value = args.key_or_job
    upload: tuple[str, str] | None = None  # the key and version, when a key was given
    if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        job_id = value
    else:
        version_id = args.version_id
        if not version_id:
            try:
                version_id = target.client("s3").head_object(Bucket=target.bucket, Key=value).get("VersionId")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise CliError(f"error: no object s3://{_cut(target.bucket)}/{_cut(value)}; give the input key or the job id") from None
                raise
        if not version_id or version_id == "null":
            raise CliError(
                f"error: s3://{_cut(target.bucket)}/{_cut(value)} has no version id (an unversioned bucket?); give the job id instead"
            )
        job_id = derive_job_id(target.bucket, value, version_id)
        upload = (value, version_id)
    job = latest_job(jobs, job_id)  # a job id names its own job; an upload's id, all of its jobs
    failure = DeliveryFailures(jobs.table).latest(job_id) if job is None or not job.state.ended else None
    if job is None:
        if failure is not None:
            raise CliError(f"error: no job {job_id} yet: {failure.sentence()}")
        waiting = _waiting_for_tags(target, job_id, *upload) if upload else None
        if waiting:
            for line in waiting:
                say(line)
            return 0
        raise CliError(f"error: no job {job_id} (not uploaded under the input prefix, not processed yet, or expired)")
    say(f"job      {job.job_id}")
    say(f"input    s3://{job.bucket}/{job.key} (version {job.version_id})")
    say(f"state    {job.state.value}: {describe(job, jobs)}")
    if job.request_id:
        say(f"fal      {job.request_id}")
    for label, at_ms in (
        ("arrived", job.arrived_at_ms),
        ("admitted", job.admitted_at_ms),
        ("sent", job.submitted_at_ms),
        ("ended", job.ended_at_ms),
    ):
        if at_ms:
            say(f"{label:<8} {iso(at_ms)}")
    if job.recipe:
        say(f"recipe   s3://{job.bucket}/{job.recipe['key']} (version {job.recipe.get('version_id')})")
    say(f"outputs  s3://{job.bucket}/{job.output_prefix}")
    if job.error_message:
        say(f"error    {job.error_code or ''} {job.error_message}".rstrip())
    if failure is not None and failure.at_ms >= (job.arrived_at_ms or 0):
        say(f"failing  {failure.sentence()}")
    for key in job.output_keys:
        say(f"image    s3://{job.bucket}/{key}")
    say("history")
    for entry in job.history:
        say(f"  {entry.at}  {entry.state.value:<10}  {entry.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
