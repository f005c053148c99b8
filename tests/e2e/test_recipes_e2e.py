"""Tagless bulk uploads: a folder recipe and 50 files copied as ``aws s3 sync`` copies them (s3transfer), all edited once."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from s3transfer.manager import TransferConfig, TransferManager

from kontext_s3.job_id import derive_job_id
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack
from tests.helpers import jpeg_bytes

pytestmark = pytest.mark.e2e

COUNT = 50


def test_fifty_untagged_files_synced_under_a_recipe_are_all_edited_once(stack: LocalStack, tmp_path: Path) -> None:
    target = stack.target()
    recipe_key, recipe_version = cli.put_recipe(target, "e2e/sync/", {"prompt": "Remove the background", "output_format": "png"})
    time.sleep(1.1)  # S3's LastModified is to the second: the uploads come strictly after the recipe

    folder = tmp_path / "catalogue"
    folder.mkdir()
    for i in range(COUNT):
        (folder / f"item-{i:02}.jpg").write_bytes(jpeg_bytes(96, 64, (i * 5 % 256, 80, 160)))
    s3 = target.client("s3")
    # What the AWS CLI's `s3 sync` / `cp --recursive` runs: s3transfer's manager, 10 at once, no tags.
    with TransferManager(s3, TransferConfig(max_request_concurrency=10)) as manager:
        futures = [manager.upload(str(path), target.bucket, f"inputs/e2e/sync/{path.name}") for path in sorted(folder.iterdir())]
        for future in futures:
            future.result()

    uploads = []
    listing = s3.list_object_versions(Bucket=target.bucket, Prefix="inputs/e2e/sync/item-")
    for version in listing["Versions"]:
        job_id = derive_job_id(target.bucket, version["Key"], version["VersionId"], version["ETag"].strip('"'))
        uploads.append(cli.Uploaded(version["Key"], version["VersionId"], job_id, target.layout.job_prefix(version["Key"], job_id)))
    assert len(uploads) == COUNT

    results = [cli.wait_for_result(target, u, timeout=240, progress=lambda _: None) for u in uploads]
    failed = [r.error for r in results if not r.succeeded]
    assert failed == []
    for result in results:
        assert result.manifest is not None
        assert result.manifest["recipe"]["key"] == recipe_key and result.manifest["recipe"]["version_id"] == recipe_version
        assert result.manifest["input"]["prompt"] == "Remove the background"
        assert [image["content_type"] for image in result.manifest["images"]] == ["image/png"]
    assert stack.accepted_requests_per_job() == Counter({u.job_id: 1 for u in uploads})
