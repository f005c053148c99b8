"""What ``kontext-s3 gallery`` copies to disk: only raster images of bounded size, named by what their bytes are.

Everything else (an SVG, an unknown type, an object over the cap, an upload its error
record says was refused) is a placeholder with its reason, and nothing of it is written.
Runs against the moto server; the browser-driven check of the page is tests/e2e/test_gallery.py.
"""

from __future__ import annotations

import gc
import io
import json
import tracemalloc
import uuid
from collections.abc import Callable
from html import escape
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kontext_s3.output_store import OutputLayout
from kontext_s3_tools import cli
from kontext_s3_tools.gallery import MAX_COPY_BYTES, write_gallery
from kontext_s3_tools.local_stack import TEST_CREDENTIALS
from kontext_s3_tools.template_model import REGION
from tests.helpers import Aws, jpeg_bytes

EVIL_SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(document.domain)</script></svg>'
#: What the pipeline's error record says of an upload it refused (kontext_s3.input_image).
NOT_AN_IMAGE = "the uploaded object is not a JPEG, PNG, WebP, GIF, HEIC/HEIF or AVIF image"


@pytest.fixture
def target(aws: Aws) -> cli.Target:
    return cli.Target(
        bucket=aws.resources.bucket,
        table=None,
        input_prefix=aws.resources.input_prefix,
        output_prefix=aws.resources.output_prefix,
        endpoint_url=aws.endpoint,
        region=REGION,
        credentials=TEST_CREDENTIALS,
    )


def image_bytes(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 90)).save(buffer, format=kind)
    return buffer.getvalue()


def oversized_jpeg() -> bytes:
    """A JPEG's first bytes, padded to one byte over the gallery's cap: its type is fine, its size is not."""
    head = jpeg_bytes()[:64]
    return head + b"\0" * (MAX_COPY_BYTES + 1 - len(head))


def upload(aws: Aws, target: cli.Target, name: str, body: bytes) -> dict[str, Any]:
    key = f"{target.input_prefix}{name}"
    put = aws.s3.put_object(Bucket=target.bucket, Key=key, Body=body)
    return {"bucket": target.bucket, "key": key, "version_id": put.get("VersionId"), "etag": put["ETag"]}


def failed_job(aws: Aws, target: cli.Target, name: str, body: bytes, *, code: str, message: str) -> str:
    """An upload and the error record the pipeline writes for it; the job's id."""
    job_id = uuid.uuid4().hex
    source = upload(aws, target, name, body)
    record = {"job_id": job_id, "source": source, "input": {"prompt": "p"}, "stage": "validation", "code": code, "message": message}
    key = OutputLayout.error_key(target.layout.job_prefix(source["key"], job_id))
    aws.s3.put_object(Bucket=target.bucket, Key=key, Body=json.dumps(record).encode())
    return job_id


def succeeded_job(aws: Aws, target: cli.Target, name: str, body: bytes, outputs: list[bytes]) -> str:
    """An upload, its outputs and the manifest the pipeline writes for them; the job's id."""
    job_id = uuid.uuid4().hex
    source = upload(aws, target, name, body)
    prefix = target.layout.job_prefix(source["key"], job_id)
    images = []
    for i, output in enumerate(outputs):
        key = f"{prefix}output-{i}.png"  # the name claims PNG whatever the bytes are
        aws.s3.put_object(Bucket=target.bucket, Key=key, Body=output)
        images.append({"key": key})
    manifest = {"job_id": job_id, "source": source, "input": {"prompt": "p"}, "images": images}
    aws.s3.put_object(Bucket=target.bucket, Key=OutputLayout.manifest_key(prefix), Body=json.dumps(manifest).encode())
    return job_id


def written(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def gallery_peak_bytes(target: cli.Target, out: Path) -> int:
    """The most memory Python allocated and held at once while the gallery was written (the uploads are not counted).

    Most of it is botocore's (a session per client loads its models); cyclic garbage is not
    collected meanwhile, so it piles up alike in every run and two runs' peaks compare.
    """
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        write_gallery(target, out)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()


def peak_growth(target: cli.Target, tmp_path: Path, add_job: Callable[[], object]) -> int:
    """How much more memory the gallery held at its peak once ``add_job()`` was done than before."""
    gallery_peak_bytes(target, tmp_path / "warm-up")  # process-wide caches (botocore's, the moto client's) fill on first use
    before = gallery_peak_bytes(target, tmp_path / "before")
    add_job()
    return gallery_peak_bytes(target, tmp_path / "gallery") - before


def test_a_refused_svg_upload_is_a_placeholder_with_its_reason_and_never_a_file(aws: Aws, target: cli.Target, tmp_path: Path) -> None:
    job_id = failed_job(aws, target, "evil.svg", EVIL_SVG, code="unsupported_object", message=NOT_AN_IMAGE)

    html = write_gallery(target, tmp_path / "gallery").read_text()

    files = written(tmp_path / "gallery")
    assert not [path for path in files if path.suffix.lower() == ".svg"], files
    assert not [path for path in files if b"<script" in path.read_bytes()], files
    assert [path.name for path in written(tmp_path / "gallery" / "media" / job_id)] == ["error.json"]
    assert '<figure class="missing">' in html and escape(NOT_AN_IMAGE) in html
    assert "<script" not in html


def test_an_svg_output_is_not_copied_even_when_no_record_refuses_it(aws: Aws, target: cli.Target, tmp_path: Path) -> None:
    # The type is judged from the bytes alone: a manifest does not make an SVG an image.
    job_id = succeeded_job(aws, target, "photo.jpg", jpeg_bytes(), outputs=[EVIL_SVG])

    html = write_gallery(target, tmp_path / "gallery").read_text()

    files = written(tmp_path / "gallery" / "media" / job_id)
    assert [path.name for path in files] == ["input.jpg", "manifest.json"]
    assert '<figure class="missing"><div>not copied: not a JPEG, PNG, GIF or WebP image</div>' in html


def test_a_refused_input_over_the_cap_is_neither_read_nor_written(aws: Aws, target: cli.Target, tmp_path: Path) -> None:
    message = f"the image is {MAX_COPY_BYTES + 1} bytes; the limit is {MAX_COPY_BYTES} (MAX_INPUT_BYTES)"
    body = oversized_jpeg()

    growth = peak_growth(target, tmp_path, lambda: failed_job(aws, target, "huge.jpg", body, code="unsupported_object", message=message))

    assert all(path.stat().st_size <= MAX_COPY_BYTES for path in written(tmp_path / "gallery"))
    assert not [path for path in written(tmp_path / "gallery") if path.suffix == ".jpg"]
    assert growth < MAX_COPY_BYTES // 2, growth
    assert escape(message) in (tmp_path / "gallery" / "index.html").read_text()


def test_an_output_over_the_cap_is_not_copied_and_not_held_in_memory(aws: Aws, target: cli.Target, tmp_path: Path) -> None:
    # No record refuses it: the object's size, known before its bytes are read, does.
    succeeded_job(aws, target, "small.jpg", jpeg_bytes(), outputs=[jpeg_bytes()])  # the same work, bar the big object
    body = oversized_jpeg()
    job_ids: list[str] = []

    growth = peak_growth(target, tmp_path, lambda: job_ids.append(succeeded_job(aws, target, "photo.jpg", jpeg_bytes(), outputs=[body])))

    files = written(tmp_path / "gallery" / "media" / job_ids[0])
    assert [path.name for path in files] == ["input.jpg", "manifest.json"]
    assert growth < MAX_COPY_BYTES // 2, growth
    html = (tmp_path / "gallery" / "index.html").read_text()
    assert f"not copied: {MAX_COPY_BYTES + 1} bytes" in html


@pytest.mark.parametrize(
    ("kind", "name", "extension"),
    [
        ("JPEG", "photo.png", "jpg"),
        ("JPEG", "photo", "jpg"),
        ("PNG", "photo.jpg", "png"),
        ("GIF", "photo.svg", "gif"),
        ("WEBP", "photo.html", "webp"),
    ],
)
def test_a_copy_is_named_by_what_its_bytes_are(aws: Aws, target: cli.Target, tmp_path: Path, kind: str, name: str, extension: str) -> None:
    body = image_bytes(kind)
    job_id = failed_job(aws, target, name, body, code="fal_error", message="fal ran it and it failed")

    html = write_gallery(target, tmp_path / "gallery").read_text()

    media = tmp_path / "gallery" / "media" / job_id
    assert [path.name for path in written(media)] == sorted([f"input.{extension}", "error.json"])
    assert (media / f"input.{extension}").read_bytes() == body
    assert f'src="media/{job_id}/input.{extension}"' in html
