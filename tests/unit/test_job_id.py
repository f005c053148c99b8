from __future__ import annotations

import pytest

from kontext_s3.job_id import derive_job_id


def test_the_same_upload_always_gets_the_same_job_id() -> None:
    assert derive_job_id("b", "inputs/a.jpg", "v1") == derive_job_id("b", "inputs/a.jpg", "v1")
    assert len(derive_job_id("b", "inputs/a.jpg", "v1")) == 32


@pytest.mark.parametrize(
    "other",
    [("b2", "inputs/a.jpg", "v1"), ("b", "inputs/b.jpg", "v1"), ("b", "inputs/a.jpg", "v2"), ("b", "inputs/A.jpg", "v1")],
)
def test_a_different_bucket_key_or_version_is_a_different_job(other: tuple[str, str, str]) -> None:
    assert derive_job_id("b", "inputs/a.jpg", "v1") != derive_job_id(*other)


def test_unversioned_uploads_are_named_by_etag_and_sequencer() -> None:
    first = derive_job_id("b", "inputs/a.jpg", None, "etag1", "0055AED6DCD90281E5")
    assert first == derive_job_id("b", "inputs/a.jpg", "null", "etag1", "0055AED6DCD90281E5")
    assert first != derive_job_id("b", "inputs/a.jpg", None, "etag1", "0055AED6DCD90281E6")
    with pytest.raises(ValueError, match="versionId"):
        derive_job_id("b", "inputs/a.jpg", None, None, None)


def test_keys_that_only_differ_in_where_a_separator_falls_do_not_collide() -> None:
    assert derive_job_id("b", "inputs/a\nversion", "x") != derive_job_id("b", "inputs/a", "version\nx")
