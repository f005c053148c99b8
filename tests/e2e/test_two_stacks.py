"""Two stacks of the template at once: each edits its own uploads, and neither sees the other's."""

from __future__ import annotations

from pathlib import Path

import pytest

from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack
from tests.e2e.test_pipeline import image_file

pytestmark = pytest.mark.e2e


def test_two_local_stacks_run_side_by_side_and_each_edits_only_its_own_uploads(tmp_path: Path) -> None:
    with (
        LocalStack(recovery_interval_seconds=None, log_dir=tmp_path / "dev") as dev,
        LocalStack(recovery_interval_seconds=None, log_dir=tmp_path / "prod") as prod,
    ):
        assert dev.resources.stack.name != prod.resources.stack.name
        uploads = {
            name: cli.upload_image(stack.target(), image_file(tmp_path), {"prompt": f"edited in {name}"}, key=f"inputs/side/{name}.jpg")
            for name, stack in (("dev", dev), ("prod", prod))
        }
        for name, stack in (("dev", dev), ("prod", prod)):
            result = cli.wait_for_result(stack.target(), uploads[name], timeout=60, progress=lambda _: None)
            assert result.succeeded, result.error
            assert [s["body"]["prompt"] for s in stack.emulator.submits()] == [f"edited in {name}"]
