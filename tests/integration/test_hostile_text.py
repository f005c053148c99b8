"""Anyone's text reaches the operator's terminal only escaped, and one-line errors stay short.

Keys, prompts, recipes and error records are written by whoever can upload; the
CLI runs as a real process here (against the moto server) and every byte it
prints is checked: an escape sequence in a key may set the window title (OSC 0),
write the clipboard (OSC 52) or clear the screen; it must show as ``\\x1b``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote_plus

import pytest

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import JobStore
from kontext_s3.model_schema import MAX_PROMPT_CHARS, MAX_QUOTE_CHARS
from kontext_s3.output_store import OutputLayout
from kontext_s3.recipes import MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import aws_environment
from tests.helpers import Aws, jpeg_bytes

#: OSC 0 (window title), OSC 52 (clipboard write), CSI 2J (clear screen), an 8-bit CSI, a bidi override.
HOSTILE = "\x1b]0;pwned\x07\x1b]52;c;cHduZWQ=\x07\x1b[2J\x9b31m\u202e"
KEY = f"inputs/{HOSTILE}/photo.jpg"
ERROR = f"the model said {HOSTILE} and stopped"

#: C0 controls but newline and tab, DEL, C1 controls, bidi overrides: what a terminal would obey rather than show.
_OBEYED = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def env(aws: Aws, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)  # no out/stack.env from elsewhere
    return {
        **{name: value for name, value in os.environ.items() if name != "KONTEXT_S3_ENV_FILE"},
        **aws_environment(aws.endpoint),
        "KONTEXT_S3_BUCKET": aws.resources.bucket,
        "KONTEXT_S3_TABLE": aws.resources.table,
        "KONTEXT_S3_DLQ_URL": aws.resources.dlq_url,
        "PYTHONIOENCODING": "utf-8",
    }


def kontext_s3(env: dict[str, str], *argv: str) -> tuple[int, str]:
    """The CLI as the operator runs it; its exit code and everything it printed (stdout then stderr)."""
    # check=False: a refusal's non-zero exit is what several tests look at.
    done = subprocess.run([sys.executable, "-m", "kontext_s3_tools.cli", *argv], check=False, capture_output=True, env=env, timeout=120)
    printed = done.stdout + done.stderr
    # Bytes first: C0 controls and DEL are single bytes in UTF-8. C1 controls and bidi overrides are characters whose
    # UTF-8 bytes include 0x80-0x9f (as every non-ASCII character's continuation bytes may), so they are checked decoded.
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", printed), printed
    text = printed.decode("utf-8")
    assert not _OBEYED.search(text), text
    return done.returncode, text


def assert_shown_escaped(text: str) -> None:
    for visible in (r"\x1b]0;pwned\x07", r"\x1b]52;c;cHduZWQ=\x07", r"\x1b[2J", r"\x9b31m", r"\u202e"):
        assert visible in text, (visible, text)


@pytest.fixture
def failed_upload(aws: Aws) -> str:
    """An upload under a hostile key whose job failed with a hostile error message; its version id."""
    bucket = aws.resources.bucket
    version = str(aws.s3.put_object(Bucket=bucket, Key=KEY, Body=jpeg_bytes())["VersionId"])
    jobs = JobStore(aws.table())
    job_id = derive_job_id(bucket, KEY, version)
    prefix = OutputLayout(aws.resources.input_prefix, aws.resources.output_prefix).job_prefix(KEY, job_id)
    created = jobs.create(
        job_id=job_id,
        bucket=bucket,
        key=KEY,
        version_id=version,
        etag=None,
        sequencer=None,
        event_time=None,
        output_prefix=prefix,
        holder="h",
        hold_ms=60_000,
    )
    assert created is not None
    assert jobs.fail(job_id, "h", code="fal_error", message=ERROR, error_key=prefix + "error.json")
    return version


def test_status_shows_a_hostile_key_and_error_escaped(env: dict[str, str], failed_upload: str) -> None:
    code, text = kontext_s3(env, "status", KEY)
    assert code == 0, text
    assert_shown_escaped(text)
    assert "the model said" in text


def test_dlq_list_shows_a_hostile_key_and_its_reason_escaped(aws: Aws, env: dict[str, str], failed_upload: str) -> None:
    bucket = aws.resources.bucket
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": "2026-11-24T10:15:30.123Z",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": quote_plus(KEY), "versionId": failed_upload, "size": 1}},
    }
    aws.sqs.send_message(QueueUrl=aws.resources.dlq_url, MessageBody=json.dumps({"Records": [record]}))
    aws.sqs.send_message(QueueUrl=aws.resources.dlq_url, MessageBody=f"garbage {HOSTILE}")
    code, text = kontext_s3(env, "dlq", "list")
    assert code == 0, text
    assert_shown_escaped(text)
    assert "fal_error: the model said" in text and "2 message(s) in the dead-letter queue" in text


def test_recipe_show_prints_a_hostile_prompt_escaped(aws: Aws, env: dict[str, str]) -> None:
    body = json.dumps({"prompt": f"Make it {HOSTILE} blue"}, ensure_ascii=False).encode()
    aws.s3.put_object(Bucket=aws.resources.bucket, Key="inputs/shop/_kontext.json", Body=body)
    code, text = kontext_s3(env, "recipe", "show", "shop/")
    assert code == 0, text
    assert r"\x9b31m" in text and r"\u202e" in text and "blue" in text


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"prompt": "x", "seed": ' + b"[" * 5000 + b"]" * 5000 + b"}", f"more than {MAX_RECIPE_DEPTH} levels deep"),
        (json.dumps({"prompt": "x" * (100 * 1024)}).encode(), f"over {MAX_RECIPE_BYTES} bytes"),
    ],
    ids=["nested-5000-deep", "100-KB"],
)
def test_recipe_show_refuses_a_recipe_the_submit_function_refuses_in_one_line(
    aws: Aws, env: dict[str, str], body: bytes, says: str
) -> None:
    aws.s3.put_object(Bucket=aws.resources.bucket, Key=f"inputs/{HOSTILE}/_kontext.json", Body=body)
    code, text = kontext_s3(env, "recipe", "show", f"{HOSTILE}/")
    assert code != 0 and "Traceback" not in text
    [line] = text.splitlines()
    assert line.startswith("error: the recipe") and says in line and len(line) < 1000
    assert_shown_escaped(line)


def test_a_hostile_argument_argparse_refuses_is_shown_escaped_and_short(env: dict[str, str]) -> None:
    code, text = kontext_s3(env, "status", "x", f"extra {HOSTILE}" + "y" * 5000)
    assert code == cli.EXIT_USAGE
    [line] = text.splitlines()
    assert "unrecognized arguments" in line and len(line) < 1000
    assert_shown_escaped(line)


def test_a_prompt_too_long_is_not_echoed_whole(env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes())
    code, text = kontext_s3(env, "upload", str(image), "--prompt", HOSTILE + "x" * MAX_PROMPT_CHARS)
    assert code == cli.EXIT_USAGE and "Traceback" not in text
    [line] = text.splitlines()
    assert line.startswith("error: prompt:") and f"at most {MAX_PROMPT_CHARS} characters" in line
    assert len(line) < MAX_QUOTE_CHARS + 200 and "more characters" in line
    assert r"\x1b]0;pwned" in line
