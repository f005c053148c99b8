"""The CLI guides: every mistake is one line naming the fix and a non-zero exit, never a traceback.

The CLI runs against the moto server (and, for expired credentials, a local
endpoint that answers as S3 does when a session token has expired).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kontext_s3.tag_codec import decode_tags
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import aws_environment
from tests.helpers import Aws, jpeg_bytes, s3_error_endpoint


@pytest.fixture
def env(aws: Aws, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    values = {
        **aws_environment(aws.endpoint),
        "KONTEXT_S3_BUCKET": aws.resources.bucket,
        "KONTEXT_S3_TABLE": aws.resources.table,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KONTEXT_S3_ENV_FILE", raising=False)
    monkeypatch.chdir(tmp_path)  # no out/stack.env from elsewhere
    return values


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes())
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own exits (--help, --version, usage mistakes)
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# -- mistakes ------------------------------------------------------------------------------------


def test_a_missing_file_is_one_line(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "upload", "nope.jpg", "--prompt", "x")
    assert "no such file: nope.jpg" in one_line_error(code, err)


def test_a_folder_is_one_line_that_points_to_recipes(env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "upload", str(tmp_path), "--prompt", "x")
    line = one_line_error(code, err)
    assert "is a folder" in line and "recipe put" in line


def test_a_text_file_named_png_is_refused_before_upload(
    aws: Aws, env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("just some text, not an image\n")
    code, _, err = run(capsys, "upload", str(fake), "--prompt", "x")
    assert "not a JPEG, PNG, WebP, GIF, HEIC/HEIF or AVIF image" in one_line_error(code, err)
    assert aws.s3.list_objects_v2(Bucket=aws.resources.bucket).get("KeyCount", 0) == 0


def test_an_invalid_field_is_one_line_naming_the_range(env: dict[str, str], image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "upload", str(image), "--prompt", "x", "--guidance-scale", "50")
    line = one_line_error(code, err)
    assert code == cli.EXIT_USAGE and "guidance_scale" in line and "20" in line


def test_a_value_of_the_wrong_type_is_one_line(env: dict[str, str], image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "upload", str(image), "--prompt", "x", "--seed", "tomorrow")
    line = one_line_error(code, err)
    assert "--seed" in line and "--help" in line


def test_a_stack_that_does_not_exist_is_one_line(
    env: dict[str, str], image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KONTEXT_S3_BUCKET")
    monkeypatch.delenv("KONTEXT_S3_TABLE")
    code, _, err = run(capsys, "upload", str(image), "--prompt", "x", "--stack", "no-such-stack")
    assert "no CloudFormation stack named 'no-such-stack'" in one_line_error(code, err)


def test_no_bucket_at_all_is_one_line(
    env: dict[str, str], image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KONTEXT_S3_BUCKET")
    code, _, err = run(capsys, "upload", str(image), "--prompt", "x")
    assert "make stack" in one_line_error(code, err)


def test_a_wrong_bucket_is_one_line(env: dict[str, str], image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "upload", str(image), "--prompt", "x", "--bucket", "no-such-bucket-here")
    assert "there is no bucket 'no-such-bucket-here'" in one_line_error(code, err)


@pytest.fixture
def expired_endpoint() -> Iterator[str]:
    with s3_error_endpoint(400, "ExpiredToken", "The provided token has expired.") as url:
        yield url


def test_expired_credentials_are_one_line(
    env: dict[str, str], image: Path, expired_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "upload", str(image), "--prompt", "x", "--endpoint-url", expired_endpoint)
    assert "credentials have expired" in one_line_error(code, err)


def test_a_stopped_local_stack_is_named_with_the_fix(
    env: dict[str, str], image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stack.env").write_text(f"KONTEXT_S3_BUCKET=b\nKONTEXT_S3_STACK_PID={dead.pid}\n")
    bucket = env["KONTEXT_S3_BUCKET"]
    monkeypatch.delenv("KONTEXT_S3_BUCKET")
    code, _, err = run(capsys, "upload", str(image), "--prompt", "x")
    line = one_line_error(code, err)
    assert "has stopped" in line and "make stack" in line
    # A bucket named on the command line is never sent to the local stack's file, stale or not.
    code, _, err = run(capsys, "upload", str(image), "--prompt", "x", "--bucket", bucket)
    assert code == 0, err


def test_download_into_a_place_that_cannot_be_written_is_one_line(aws: Aws, env: dict[str, str], tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    target = cli._target(cli._parser().parse_args(["status", "x"]))
    result = cli.Result(job_id="j" * 32, output_prefix="outputs/x/", manifest={"images": []}, error=None)
    with pytest.raises(cli.CliError, match="cannot save into"):
        cli.download(target, result, blocker)


#: ``python -m kontext_s3_tools.cli`` with SIGINT as a shell leaves it: Python's handler installed and not blocked.
AS_FROM_A_SHELL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "sys.argv[0] = 'kontext-s3'; runpy.run_module('kontext_s3_tools.cli', run_name='__main__', alter_sys=True)"
)


def test_ctrl_c_while_waiting_is_one_line(env: dict[str, str], image: Path) -> None:
    # No functions run here, so the job never ends: the CLI waits until interrupted.
    # Started as from a user's shell: Ctrl-C neither ignored nor blocked, whatever earlier tests left in this
    # process (the whole suite on python3.13 twice left the CLI deaf to SIGINT here; alone it never was).
    parent = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    process = subprocess.Popen(
        [sys.executable, "-c", AS_FROM_A_SHELL, "upload", str(image), "--prompt", "x", "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "job " not in process.stdout.readline():
        pass
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the CLI ignored Ctrl-C; this process's SIGINT handler and blocked signals: {parent}") from None
    assert process.returncode == cli.EXIT_INTERRUPTED
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted; anything already uploaded is still processed")


# -- what works ----------------------------------------------------------------------------------


def test_options_work_before_or_after_the_subcommand_and_booleans_have_both_forms(
    aws: Aws, env: dict[str, str], image: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KONTEXT_S3_BUCKET")
    bucket = aws.resources.bucket
    before = run(capsys, "--bucket", bucket, "upload", str(image), "--key", "inputs/a.jpg", "--prompt", "x", "--enhance-prompt")
    after = run(capsys, "upload", str(image), "--key", "inputs/b.jpg", "--prompt", "x", "--no-enhance-prompt", "--bucket", bucket)
    assert before[0] == after[0] == 0, (before, after)

    def tags(key: str) -> dict[str, str]:
        tag_set = aws.s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
        return decode_tags({t["Key"]: t["Value"] for t in tag_set})

    assert tags("inputs/a.jpg")["enhance_prompt"] == "true"
    assert tags("inputs/b.jpg")["enhance_prompt"] == "false"
    assert aws.s3.head_object(Bucket=bucket, Key="inputs/a.jpg")["ContentType"] == "image/jpeg"


def test_version_and_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("kontext-s3 0.")
    for command in (["upload"], ["status"], ["tags"], ["recipe", "put"], ["recipe", "show"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "example:" in out and "kontext-s3" in out, command


def test_the_env_file_of_a_running_stack_is_read(
    aws: Aws, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("AWS_ENDPOINT_URL", "KONTEXT_S3_BUCKET", "KONTEXT_S3_TABLE", "KONTEXT_S3_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    values = {**aws_environment(aws.endpoint), "KONTEXT_S3_BUCKET": aws.resources.bucket, "KONTEXT_S3_STACK_PID": str(os.getpid())}
    (tmp_path / "out" / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    code, out, err = run(capsys, "upload", str(image), "--prompt", "x")
    assert code == 0, err
    assert f"uploaded s3://{aws.resources.bucket}/inputs/photo.jpg" in out


def test_recipe_put_and_show(aws: Aws, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "recipe", "put", "catalogue/", "--prompt", "Remove the background", "--output-format", "png")
    assert code == 0, err
    body = json.loads(aws.s3.get_object(Bucket=aws.resources.bucket, Key="inputs/catalogue/_kontext.json")["Body"].read())
    assert body == {"prompt": "Remove the background", "output_format": "png"}
    code, out, _ = run(capsys, "recipe", "show", "catalogue/shoes/")
    assert code == 0 and "inputs/catalogue/_kontext.json" in out and "Remove the background" in out
    code, _, err = run(capsys, "recipe", "show", "elsewhere/")
    assert "no recipe applies under inputs/elsewhere/" in one_line_error(code, err)
    code, _, err = run(capsys, "recipe", "put", "catalogue/", "--prompt", "x", "--num-images", "9")
    assert "num_images" in one_line_error(code, err)
