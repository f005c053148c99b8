"""A delivery that fails shows while the user waits: one line, within seconds, naming what failed and what to do."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kontext_s3_tools.local_stack import LocalStack
from tests.e2e.test_deployed_shape import edited_template
from tests.e2e.test_pipeline import image_file

pytestmark = pytest.mark.e2e

#: The submit function's read of the upload: without the tagging actions it cannot read the edit.
#: The submit role's reads of the stack's own uploads (its Sid names it: attached buckets have a statement alike).
SUBMIT_READS = (
    "Sid: ReadUploads\n              Effect: Allow\n              Action: [s3:GetObject, s3:GetObjectVersion, s3:GetObjectTagging"
)


def lines_as_they_come(process: subprocess.Popen[str]) -> Iterator[tuple[float, str]]:
    """Each line the CLI prints (stdout and stderr), with the moment it arrived."""
    arrived: queue.Queue[tuple[float, str] | None] = queue.Queue()

    def read(stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            arrived.put((time.time(), line.rstrip("\n")))
        arrived.put(None)

    threads = [threading.Thread(target=read, args=(s,), daemon=True) for s in (process.stdout, process.stderr)]
    for thread in threads:
        thread.start()
    ended = 0
    while ended < len(threads):
        item = arrived.get(timeout=120)
        if item is None:
            ended += 1
            continue
        yield item


def wait_in_the_cli(stack: LocalStack, image: Path, key: str) -> tuple[subprocess.Popen[str], list[tuple[float, str]]]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kontext_s3_tools.cli",
            "upload",
            str(image),
            "--key",
            key,
            "--prompt",
            "a red door",
            "--wait",
            "--timeout",
            "25",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **stack.cli_environment()},
    )
    return process, list(lines_as_they_come(process))


def first_failure_line(lines: list[tuple[float, str]]) -> tuple[float, str]:
    found = [(at, line) for at, line in lines if "failed on delivery" in line]
    assert found, "\n".join(line for _, line in lines)
    return found[0]


def test_a_permission_the_submit_role_lacks_is_named_within_seconds_of_the_first_failed_delivery(tmp_path: Path) -> None:
    template = edited_template(tmp_path, SUBMIT_READS + ", s3:GetObjectVersionTagging]", SUBMIT_READS + "]")
    with LocalStack(template=template, max_receive_count=3, recovery_interval_seconds=None, log_dir=tmp_path / "logs") as stack:
        process, lines = wait_in_the_cli(stack, image_file(tmp_path), "inputs/denied/door.jpg")
        refused = [j for j in stack.gateway.recorded_judgements() if not j.allowed]
        assert refused and {j.action for j in refused} == {"s3:GetObjectVersionTagging"}
        at, line = first_failure_line(lines)
        assert at - refused[0].at < 10
        assert "submit failed on delivery 1 of 3" in line
        assert "s3:GetObjectVersionTagging" in line and "role lacks this permission" in line
        assert not any("Traceback" in text for _, text in lines)
        assert process.wait(timeout=30) != 0


def test_a_fal_key_never_stored_is_named_with_the_command_that_stores_it(tmp_path: Path) -> None:
    with LocalStack(fal_key="", max_receive_count=2, recovery_interval_seconds=None, log_dir=tmp_path / "logs") as stack:
        process, lines = wait_in_the_cli(stack, image_file(tmp_path), "inputs/nokey/door.jpg")
        reads = [j for j in stack.gateway.recorded_judgements() if j.action == "secretsmanager:GetSecretValue"]
        at, line = first_failure_line(lines)
        assert reads and at - reads[0].at < 10
        assert "submit failed on delivery 1 of 2" in line
        assert "the fal key is not stored" in line and "aws secretsmanager put-secret-value --secret-id" in line
        assert not any("Traceback" in text for _, text in lines)
        # Once deliveries run out, the upload ends in an error record that names the key, not a generic retry.
        failed = [text for _, text in lines if text.startswith("failed (")]
        assert failed and failed[0].startswith("failed (fal_key_missing): ") and "the fal key is not stored" in failed[0]
        assert process.wait(timeout=30) != 0
        assert stack.emulator.submits() == []  # nothing was sent, so nothing was paid
