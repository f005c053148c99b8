from __future__ import annotations

import pytest

from kontext_s3.job_id import derive_job_id, edit_mark


def test_the_same_upload_always_gets_the_same_job_id() -> None:
    assert derive_job_id("b", "inputs/a.jpg", "v1") == derive_job_id("b", "inputs/a.jpg", "v1")
    assert len(derive_job_id("b", "inputs/a.jpg", "v1")) == 32


@pytest.mark.parametrize(
    "other",
    [("b2", "inputs/a.jpg", "v1"), ("b", "inputs/b.jpg", "v1"), ("b", "inputs/a.jpg", "v2"), ("b", "inputs/A.jpg", "v1")],
)
def test_a_different_bucket_key_or_version_is_a_different_job(other: tuple[str, str, str]) -> None:
    assert derive_job_id("b", "inputs/a.jpg", "v1") != derive_job_id(*other)


def test_unversioned_uploads_are_named_by_their_bytes_so_a_same_bytes_rewrite_or_a_tag_event_is_the_same_upload() -> None:
    first = derive_job_id("b", "inputs/a.jpg", None, "etag1")
    assert first == derive_job_id("b", "inputs/a.jpg", "null", '"etag1"')  # S3 quotes eTags in some answers
    assert first != derive_job_id("b", "inputs/a.jpg", None, "etag2")  # other bytes: another upload
    assert first != derive_job_id("b", "inputs/a.jpg", "etag1")  # never mistaken for a version named alike
    with pytest.raises(ValueError, match="versionId"):
        derive_job_id("b", "inputs/a.jpg", None, None)


def test_keys_that_only_differ_in_where_a_separator_falls_do_not_collide() -> None:
    assert derive_job_id("b", "inputs/a\nversion", "x") != derive_job_id("b", "inputs/a", "version\nx")


def test_an_edit_names_its_own_job_of_the_same_upload_and_the_same_edit_the_same_job() -> None:
    blue, red = {"prompt": "blue", "seed": 7}, {"prompt": "red", "seed": 7}
    upload = derive_job_id("b", "inputs/a.jpg", "v1")
    assert derive_job_id("b", "inputs/a.jpg", "v1", edit=blue) not in (upload, derive_job_id("b", "inputs/a.jpg", "v1", edit=red))
    assert derive_job_id("b", "inputs/a.jpg", "v1", edit=blue) == derive_job_id(
        "b", "inputs/a.jpg", "v1", edit={"seed": "7", "prompt": "blue"}
    )
    assert derive_job_id("b", "inputs/a.jpg", "v2", edit=blue) != derive_job_id("b", "inputs/a.jpg", "v1", edit=blue)


def test_an_edits_fingerprint_ignores_order_and_value_types_but_not_values() -> None:
    assert edit_mark({"prompt": "x", "num_images": 2}) == edit_mark({"num_images": "2", "prompt": "x"})
    assert edit_mark({"prompt": "x", "num_images": 2}) != edit_mark({"prompt": "x", "num_images": 3})
    assert edit_mark({"prompt": "x"}) != edit_mark({"prompt": "x", "seed": 1})
