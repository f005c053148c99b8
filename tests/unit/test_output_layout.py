from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kontext_s3.media_urls import MediaUrlRefused, check_media_url
from kontext_s3.output_store import OutputLayout, has_dot_segments, parse_data_uri
from kontext_s3.settings import DEFAULT_FAL_MEDIA_URLS

LAYOUT = OutputLayout("inputs/", "outputs/")


def test_outputs_mirror_the_input_path_then_the_job() -> None:
    prefix = LAYOUT.job_prefix("inputs/shop/shoe 1.jpg", "ab" * 16)
    assert prefix == f"outputs/shop/shoe 1.jpg/{'ab' * 16}/"
    assert LAYOUT.image_key(prefix, 0, "png") == prefix + "image-0.png"
    assert LAYOUT.manifest_key(prefix) == prefix + "manifest.json"
    assert LAYOUT.error_key(prefix) == prefix + "error.json"


@given(st.text(min_size=1, max_size=1100).filter(lambda k: "\x00" not in k))
def test_outputs_never_land_under_the_input_prefix_and_fit_s3s_key_limit(relative: str) -> None:
    prefix = LAYOUT.job_prefix("inputs/" + relative, "0" * 32)
    assert prefix.startswith("outputs/")
    assert not prefix.startswith("inputs/")
    assert len((prefix + "manifest.json").encode()) <= 1024


def test_a_very_long_key_keeps_its_results_by_job_id() -> None:
    assert LAYOUT.job_prefix("inputs/" + "é" * 600, "f" * 32) == f"outputs/_long-keys/{'f' * 32}/"


@pytest.mark.parametrize("key", ["inputs/../x.png", "inputs/a/./b.png", "inputs/a/..", "inputs/./x"])
def test_a_key_with_dot_segments_keeps_its_error_record_inside_the_output_prefix(key: str) -> None:
    assert LAYOUT.job_prefix(key, "e" * 32) == f"outputs/_unsupported-keys/{'e' * 32}/"
    assert has_dot_segments(key)


def test_dots_inside_names_are_not_segments() -> None:
    assert not has_dot_segments("inputs/a..b/.hidden/x...png")


@pytest.mark.parametrize(
    "url",
    [
        "https://v3.fal.media/files/tiger/out.jpg",
        "https://fal.media/files/a.png",
        "https://v3b.fal.media/files/b/c.webp",
        "https://storage.googleapis.com/falserverless/gallery/x.jpg",
    ],
)
def test_fals_media_hosts_are_allowed_by_default(url: str) -> None:
    assert str(check_media_url(url, DEFAULT_FAL_MEDIA_URLS.split(","))) == url  # the URL requested is the URL judged


@pytest.mark.parametrize(
    "url",
    [
        "http://v3.fal.media/files/a.jpg",  # not https
        "https://fal.media.evil.example/a.jpg",
        "https://evilfal.media/a.jpg",
        "https://fal.media@169.254.169.254/latest/meta-data/",
        "https://169.254.169.254/latest/meta-data/",
        "https://storage.googleapis.com/someone-elses-bucket/a.jpg",
        "https://v3.fal.media:8443/files/a.jpg",
        "file:///etc/passwd",
        # Dot segments: the client would request another path than the one judged.
        "https://storage.googleapis.com/falserverless/../other/x.png",
        "https://storage.googleapis.com/falserverless/./../other/x.png",
        "https://storage.googleapis.com/falserverless/%2e%2e/other/x.png",
        "https://storage.googleapis.com/falserverless/%2E%2E/other/x.png",
        "https://storage.googleapis.com/falserverless/.%2e/other/x.png",
        "https://storage.googleapis.com/falserverless/%252e%252e/other/x.png",
        "https://storage.googleapis.com/falserverless%2f..%2fother/x.png",
        "https://storage.googleapis.com/falserverless/..%5cother/x.png",
    ],
)
def test_anything_else_is_refused(url: str) -> None:
    with pytest.raises(MediaUrlRefused):
        check_media_url(url, DEFAULT_FAL_MEDIA_URLS.split(","))


def test_data_uris_decode() -> None:
    assert parse_data_uri("data:image/png;base64,aGVsbG8=").data == b"hello"
    with pytest.raises(ValueError, match="base64"):
        parse_data_uri("data:image/png,hello")
