"""Where the CLI works: one rule, one place, never fields of two deployments.

Options (``--stack``, ``--env-file``, ``--bucket``) win over ``KONTEXT_S3_*``
variables, which win over the local stack's ``out/stack.env``; a bucket or
table named beside a stack or an env file must be that one's own. The rule is
:func:`cli.choose_target` (pure: tested case by case below); the CLI is then run
as the operator runs it, against the moto server, whose CloudFormation describes
the stacks ``--stack`` names.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kontext_s3.model_schema import MAX_QUOTE_CHARS
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import aws_environment
from tests.helpers import Aws
from tests.integration.test_cli import expired_endpoint, image

__all__ = ["expired_endpoint", "image"]

DEFAULT = str(cli.DEFAULT_ENV_FILE)
LOCAL = {
    "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
    "AWS_ACCESS_KEY_ID": "local-admin",
    "AWS_SECRET_ACCESS_KEY": "local-secret",
    "AWS_REGION": "us-east-1",
    "KONTEXT_S3_BUCKET": "local-bucket",
    "KONTEXT_S3_TABLE": "local-table",
    "KONTEXT_S3_QUEUE_URL": "http://127.0.0.1:5000/local-queue",
    "KONTEXT_S3_DLQ_URL": "http://127.0.0.1:5000/local-dlq",
    "KONTEXT_S3_TAG_WAIT_SECONDS": "300",
}
#: What CloudFormation says of stack B, by the names the CLI uses.
STACK_B = {
    "KONTEXT_S3_BUCKET": "b-bucket",
    "KONTEXT_S3_TABLE": "b-table",
    "KONTEXT_S3_QUEUE_URL": "https://sqs/b-queue",
    "KONTEXT_S3_DLQ_URL": "https://sqs/b-dlq",
    "KONTEXT_S3_INPUT_PREFIX": "inputs/",
    "KONTEXT_S3_OUTPUT_PREFIX": "outputs/",
    "KONTEXT_S3_TAG_WAIT_SECONDS": "42",
}


class Files:
    """Env files by path, and which of them the rule read."""

    def __init__(self, files: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.files = dict(files or {})
        self.read: list[str] = []

    def __call__(self, path: Path) -> Mapping[str, str] | None:
        self.read.append(str(path))
        return self.files.get(str(path))


def choose(files: Files | None = None, environ: Mapping[str, str] | None = None, **options: Any) -> cli.TargetSource | cli.TargetError:
    given = {"stack": None, "bucket": None, "table": None, "env_file": None, "endpoint_url": None, "region": None, **options}
    return cli.choose_target(given, environ or {}, files or Files())


def chosen(result: cli.TargetSource | cli.TargetError) -> cli.TargetSource:
    assert isinstance(result, cli.TargetSource), result
    return result


def refused(result: cli.TargetSource | cli.TargetError) -> str:
    assert isinstance(result, cli.TargetError), result
    return result.message


# -- the rule, case by case --------------------------------------------------------------------


def test_stack_wins_over_the_local_env_file_which_is_not_even_read() -> None:
    files = Files({DEFAULT: LOCAL})
    source = chosen(choose(files, stack="B"))
    assert source.stack == "B" and source.label == "stack 'B' (--stack)"
    assert files.read == [] and not source.local
    assert chosen(source.settle(STACK_B)).values == STACK_B


def test_stack_beside_the_local_stacks_exported_names_is_refused_naming_both() -> None:
    # `set -a; . out/stack.env` exported them; --stack B must not answer from the local bucket.
    message = refused(chosen(choose(environ=LOCAL, stack="B")).settle(STACK_B))
    assert message == (
        "error: --stack 'B' and KONTEXT_S3_BUCKET='local-bucket' point at different places (stack 'B' has bucket 'b-bucket'); "
        "unset KONTEXT_S3_BUCKET or drop --stack"
    )


def test_stack_beside_an_exported_table_alone_is_refused() -> None:
    message = refused(chosen(choose(environ={"KONTEXT_S3_TABLE": "local-table"}, stack="B")).settle(STACK_B))
    assert "--stack 'B' and KONTEXT_S3_TABLE='local-table' point at different places" in message


def test_stack_with_only_bucket_and_table_exported_never_takes_its_queues_from_b() -> None:
    exported = {"KONTEXT_S3_BUCKET": "local-bucket", "KONTEXT_S3_TABLE": "local-table"}
    assert "point at different places" in refused(chosen(choose(environ=exported, stack="B")).settle(STACK_B))


def test_names_that_are_the_stacks_own_are_no_conflict_and_everything_comes_from_the_stack() -> None:
    exported = {"KONTEXT_S3_BUCKET": "b-bucket", "KONTEXT_S3_QUEUE_URL": "http://elsewhere/queue"}
    source = chosen(chosen(choose(environ=exported, stack="B", table="b-table")).settle(STACK_B))
    assert source.values == STACK_B  # the queue is B's, not the environment's


def test_stack_and_a_bucket_option_of_another_place_are_refused() -> None:
    message = refused(chosen(choose(stack="B", bucket="x")).settle(STACK_B))
    assert message.startswith("error: --stack 'B' and --bucket 'x' point at different places")
    assert message.endswith("; drop --bucket or drop --stack")


def test_a_stack_in_the_environment_beside_another_bucket_there_is_refused() -> None:
    environ = {"KONTEXT_S3_STACK": "B", "KONTEXT_S3_BUCKET": "local-bucket"}
    message = refused(chosen(choose(environ=environ)).settle(STACK_B))
    assert "KONTEXT_S3_STACK='B' and KONTEXT_S3_BUCKET='local-bucket'" in message
    assert message.endswith("unset KONTEXT_S3_BUCKET or unset KONTEXT_S3_STACK")


def test_two_whole_places_at_one_level_are_refused_before_anything_is_read() -> None:
    files = Files({"other.env": LOCAL})
    message = refused(choose(files, stack="B", env_file=Path("other.env")))
    assert message == "error: --stack 'B' and --env-file 'other.env' point at different places; drop --stack or drop --env-file"
    assert files.read == []


def test_bucket_option_wins_over_the_environment_and_takes_none_of_its_place() -> None:
    environ = {**LOCAL, "KONTEXT_S3_INPUT_PREFIX": "in/"}
    source = chosen(choose(Files({DEFAULT: LOCAL}), environ=environ, bucket="x"))
    assert source.label == "--bucket"
    # No table, no queues from the environment's place: only the settings that have no option.
    assert source.values == {"KONTEXT_S3_BUCKET": "x", "KONTEXT_S3_INPUT_PREFIX": "in/", "KONTEXT_S3_TAG_WAIT_SECONDS": "300"}
    both = chosen(choose(environ=environ, bucket="x", table="t"))
    assert both.values["KONTEXT_S3_TABLE"] == "t"


def test_the_environments_names_are_one_place_and_a_table_option_overrides_its_table() -> None:
    source = chosen(choose(Files({DEFAULT: {"KONTEXT_S3_BUCKET": "file-bucket"}}), environ=LOCAL))
    assert source.label == "KONTEXT_S3_BUCKET" and source.values["KONTEXT_S3_QUEUE_URL"] == LOCAL["KONTEXT_S3_QUEUE_URL"]
    assert source.endpoint_url == LOCAL["AWS_ENDPOINT_URL"] and source.local
    assert chosen(choose(environ=LOCAL, table="t")).values["KONTEXT_S3_TABLE"] == "t"


def test_the_local_env_file_comes_last_and_brings_its_own_endpoint_and_keys() -> None:
    # An endpoint and keys exported for something else are not mixed with the file's stack.
    environ = {"AWS_ENDPOINT_URL": "http://elsewhere:1", "AWS_ACCESS_KEY_ID": "other", "AWS_SECRET_ACCESS_KEY": "other"}
    source = chosen(choose(Files({DEFAULT: LOCAL}), environ=environ))
    assert source.label == "local stack from out/stack.env" and source.local
    assert source.endpoint_url == LOCAL["AWS_ENDPOINT_URL"]
    assert source.credentials is not None and source.credentials.access_key == "local-admin"
    assert source.values["KONTEXT_S3_TAG_WAIT_SECONDS"] == "300"
    assert chosen(choose(Files({DEFAULT: LOCAL}), endpoint_url="http://explicit:2")).endpoint_url == "http://explicit:2"


def test_an_exported_table_that_is_not_the_local_stacks_is_refused() -> None:
    message = refused(choose(Files({DEFAULT: LOCAL}), environ={"KONTEXT_S3_TABLE": "t"}))
    assert message == (
        "error: out/stack.env and KONTEXT_S3_TABLE='t' point at different places (out/stack.env has table 'local-table'); "
        "unset KONTEXT_S3_TABLE"
    )
    assert chosen(choose(Files({DEFAULT: LOCAL}), environ={"KONTEXT_S3_TABLE": "local-table"})).label.startswith("local stack")


def test_env_file_option_and_variable() -> None:
    files = Files({"mine.env": LOCAL, DEFAULT: {"KONTEXT_S3_BUCKET": "default-bucket"}})
    assert chosen(choose(files, env_file=Path("mine.env"))).label == "local stack from mine.env (--env-file)"
    assert chosen(choose(files, environ={"KONTEXT_S3_ENV_FILE": "mine.env"})).values["KONTEXT_S3_BUCKET"] == "local-bucket"
    # --stack wins over KONTEXT_S3_ENV_FILE (a lower level): the file is not read.
    files.read.clear()
    assert chosen(choose(files, environ={"KONTEXT_S3_ENV_FILE": "mine.env"}, stack="B")).stack == "B"
    assert files.read == []
    message = refused(choose(files, environ={"KONTEXT_S3_BUCKET": "x"}, env_file=Path("mine.env")))
    assert message.startswith("error: --env-file 'mine.env' and KONTEXT_S3_BUCKET='x' point at different places")


def test_a_missing_env_file_or_no_place_at_all_is_one_line() -> None:
    assert refused(choose(env_file=Path("gone.env"))) == (
        "error: no env file gone.env; start the local stack with make stack, or drop --env-file"
    )
    assert refused(choose(environ={"KONTEXT_S3_ENV_FILE": "gone.env"})).endswith("or unset KONTEXT_S3_ENV_FILE")
    assert refused(choose(environ={"KONTEXT_S3_TABLE": "t"})).startswith("error: no bucket:")


def test_long_values_in_a_conflict_are_shortened() -> None:
    message = refused(choose(stack="s" * 5000, env_file=Path("f" * 5000)))
    assert len(message) < 2 * MAX_QUOTE_CHARS + 200 and "more characters" in message
    message = refused(chosen(choose(environ={"KONTEXT_S3_BUCKET": "b" * 5000}, stack="B")).settle(STACK_B))
    assert len(message) < 3 * MAX_QUOTE_CHARS + 200


# -- the CLI as the operator runs it -------------------------------------------------------------


def kontext_s3(env: Mapping[str, str], cwd: Path, *argv: str) -> tuple[int, str, str]:
    # check=False: a refusal's exit code is what these tests look at.
    done = subprocess.run(
        [sys.executable, "-m", "kontext_s3_tools.cli", *argv],
        check=False,
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=cwd,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _outside_env() -> dict[str, str]:
    """This process's environment without anything that names a place or how to reach AWS."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("KONTEXT_S3_", "AWS_")) and name not in ("HOME", "PYTHONWARNINGS")
    }


@pytest.fixture
def base_env(aws: Aws, tmp_path: Path) -> dict[str, str]:
    """moto as AWS (its CloudFormation too), and no ~/.aws of the user running the tests."""
    home = tmp_path / "home"
    home.mkdir()
    return {**_outside_env(), **aws_environment(aws.endpoint), "HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def exported_a(aws: Aws, base_env: dict[str, str]) -> dict[str, str]:
    """As after `set -a; . out/stack.env` of stack A (the aws fixture's resources)."""
    return {
        **base_env,
        "KONTEXT_S3_BUCKET": aws.resources.bucket,
        "KONTEXT_S3_TABLE": aws.resources.table,
        "KONTEXT_S3_QUEUE_URL": aws.resources.queue_url,
        "KONTEXT_S3_DLQ_URL": aws.resources.dlq_url,
    }


def create_stack(aws: Aws, outputs: Mapping[str, str], tag_wait: str = "300") -> str:
    """A CloudFormation stack in moto whose outputs name these resources; its name."""
    name = f"kontext-{uuid.uuid4().hex[:10]}"
    template = {
        "Parameters": {"TagWaitSeconds": {"Type": "Number", "Default": "300"}},
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {key: {"Value": value} for key, value in outputs.items()},
    }
    aws.client("cloudformation").create_stack(
        StackName=name, TemplateBody=json.dumps(template), Parameters=[{"ParameterKey": "TagWaitSeconds", "ParameterValue": tag_wait}]
    )
    return name


@pytest.fixture
def stack_b(aws: Aws) -> tuple[str, str]:
    """A second deployment, B: its own versioned bucket and queues. Its name and bucket."""
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    aws.s3.create_bucket(Bucket=bucket)
    aws.s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    sqs = aws.sqs
    queue = sqs.create_queue(QueueName=f"{bucket}-uploads")["QueueUrl"]
    dlq = sqs.create_queue(QueueName=f"{bucket}-dlq")["QueueUrl"]
    outputs = {"InputBucketName": bucket, "JobsTableName": f"{bucket}-jobs", "UploadsQueueUrl": queue, "DeadLetterQueueUrl": dlq}
    return create_stack(aws, outputs), bucket


def keys(aws: Aws, bucket: str) -> list[str]:
    return [item["Key"] for item in aws.s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_stack_that_does_not_exist_is_not_answered_from_the_exported_local_stack(
    aws: Aws, exported_a: dict[str, str], image: Path, tmp_path: Path
) -> None:
    code, _, err = kontext_s3(exported_a, tmp_path, "--stack", "does-not-exist", "upload", str(image), "--prompt", "x")
    assert code != 0 and "no CloudFormation stack named 'does-not-exist'" in one_line(err)
    code, _, err = kontext_s3(exported_a, tmp_path, "--stack", "does-not-exist", "dlq", "list")
    assert code != 0 and "no CloudFormation stack named 'does-not-exist'" in one_line(err)
    assert keys(aws, aws.resources.bucket) == []


def test_stack_b_while_a_is_exported_is_refused_in_one_line_and_uploads_nowhere(
    aws: Aws, exported_a: dict[str, str], stack_b: tuple[str, str], image: Path, tmp_path: Path
) -> None:
    name, bucket_b = stack_b
    code, out, err = kontext_s3(exported_a, tmp_path, "--stack", name, "upload", str(image), "--prompt", "x")
    assert code == cli.EXIT_USAGE and out == ""
    assert one_line(err) == (
        f"error: --stack '{name}' and KONTEXT_S3_BUCKET='{aws.resources.bucket}' point at different places "
        f"(stack '{name}' has bucket '{bucket_b}'); unset KONTEXT_S3_BUCKET or drop --stack"
    )
    assert keys(aws, aws.resources.bucket) == keys(aws, bucket_b) == []


def test_stack_b_with_only_a_bucket_and_table_exported_is_refused_not_half_b(
    aws: Aws, base_env: dict[str, str], stack_b: tuple[str, str], tmp_path: Path
) -> None:
    env = {**base_env, "KONTEXT_S3_BUCKET": aws.resources.bucket, "KONTEXT_S3_TABLE": aws.resources.table}
    code, _, err = kontext_s3(env, tmp_path, "--stack", stack_b[0], "dlq", "list")
    assert code == cli.EXIT_USAGE and "point at different places" in one_line(err)


def test_stack_b_alone_uploads_into_b_and_says_so_first(
    aws: Aws, base_env: dict[str, str], stack_b: tuple[str, str], image: Path, tmp_path: Path
) -> None:
    name, bucket_b = stack_b
    (tmp_path / "out").mkdir()  # a running local stack's file is not used when --stack names a place
    (tmp_path / "out" / "stack.env").write_text(f"KONTEXT_S3_BUCKET={aws.resources.bucket}\nKONTEXT_S3_STACK_PID={os.getpid()}\n")
    code, out, err = kontext_s3(base_env, tmp_path, "--stack", name, "upload", str(image), "--prompt", "x")
    assert code == 0, err
    assert out.splitlines()[0] == f"target: stack '{name}' (--stack); bucket {bucket_b}; endpoint {aws.endpoint}"
    assert keys(aws, bucket_b) == ["inputs/photo.jpg"] and keys(aws, aws.resources.bucket) == []
    # The stack's own bucket named beside it is the same place: no conflict. Another is refused.
    code, _, err = kontext_s3(base_env, tmp_path, "--stack", name, "--bucket", bucket_b, "upload", str(image), "--prompt", "x")
    assert code == 0, err
    code, _, err = kontext_s3(base_env, tmp_path, "--stack", name, "upload", str(image), "--prompt", "x", "--bucket", "x-other")
    assert code == cli.EXIT_USAGE and f"--stack '{name}' and --bucket 'x-other' point at different places" in one_line(err)


def test_upload_names_the_local_stacks_file_or_the_variable_it_uses(
    aws: Aws, base_env: dict[str, str], exported_a: dict[str, str], image: Path, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    values = {**aws_environment(aws.endpoint), "KONTEXT_S3_BUCKET": aws.resources.bucket, "KONTEXT_S3_STACK_PID": str(os.getpid())}
    (tmp_path / "out" / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    local_only = {name: value for name, value in base_env.items() if not name.startswith("AWS_")}
    code, out, err = kontext_s3(local_only, tmp_path, "upload", str(image), "--prompt", "x")
    assert code == 0, err
    assert out.splitlines()[0] == f"target: local stack from out/stack.env; bucket {aws.resources.bucket}; endpoint {aws.endpoint}"
    code, out, err = kontext_s3(exported_a, tmp_path, "upload", str(image), "--prompt", "x")
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"target: KONTEXT_S3_BUCKET; bucket {aws.resources.bucket}")


# -- a local user is pointed at the local stack, never at `aws sso login` ------------------------


def test_a_local_endpoint_without_credentials_asks_about_the_local_stack(
    aws: Aws, base_env: dict[str, str], image: Path, tmp_path: Path
) -> None:
    env = {
        name: value for name, value in base_env.items() if name not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    }
    env.update(
        {
            "KONTEXT_S3_BUCKET": aws.resources.bucket,
            "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        }
    )
    code, _, err = kontext_s3(env, tmp_path, "upload", str(image), "--prompt", "x")
    line = one_line(err)
    assert code == cli.EXIT_FAILED and "is the local stack running? make stack" in line and "sso" not in line


def test_a_bucket_option_beside_a_running_local_stack_is_not_told_to_sign_in(
    aws: Aws, base_env: dict[str, str], image: Path, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    values = {**aws_environment(aws.endpoint), "KONTEXT_S3_BUCKET": aws.resources.bucket, "KONTEXT_S3_STACK_PID": str(os.getpid())}
    (tmp_path / "out" / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    env = {name: value for name, value in base_env.items() if not name.startswith("AWS_")}
    env.update({"AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
    env.update({"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
    code, _, err = kontext_s3(env, tmp_path, "--bucket", "someone-elses", "upload", str(image), "--prompt", "x")
    line = one_line(err)
    assert code == cli.EXIT_FAILED and "sso" not in line
    assert "--bucket aims this command at AWS, not at the local stack of out/stack.env" in line


def test_expired_credentials_at_a_local_endpoint_point_at_the_local_stack(
    exported_a: dict[str, str], expired_endpoint: str, image: Path, tmp_path: Path
) -> None:
    code, _, err = kontext_s3(exported_a, tmp_path, "upload", str(image), "--prompt", "x", "--endpoint-url", expired_endpoint)
    line = one_line(err)
    assert code == cli.EXIT_FAILED and "credentials have expired" in line
    assert "is the local stack running? make stack" in line and "sso" not in line


def test_long_values_echoed_by_the_target_rule_are_shortened(base_env: dict[str, str], image: Path, tmp_path: Path) -> None:
    code, _, err = kontext_s3(base_env, tmp_path, "--env-file", "dir/" * 700 + "stack.env", "upload", str(image), "--prompt", "x")
    line = one_line(err)
    assert code == cli.EXIT_USAGE and line.startswith("error: no env file") and len(line) < MAX_QUOTE_CHARS + 200
    code, _, err = kontext_s3(base_env, tmp_path, "--env-file", "e" * 3000, "upload", str(image), "--prompt", "x")
    line = one_line(err)
    assert code == cli.EXIT_USAGE and line.startswith("error: cannot read") and len(line) < MAX_QUOTE_CHARS + 200
    stale = tmp_path / "stale.env"
    stale.write_text("KONTEXT_S3_BUCKET=b\nKONTEXT_S3_STACK_PID=" + "9" * 5000 + "\n")
    code, _, err = kontext_s3(base_env, tmp_path, "--env-file", str(stale), "upload", str(image), "--prompt", "x")
    line = one_line(err)
    assert code == cli.EXIT_USAGE and "cannot read" in line and len(line) < 3 * MAX_QUOTE_CHARS + 200
