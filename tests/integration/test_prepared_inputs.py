"""Prepared inputs: phone photos turned upright, HEIC/AVIF converted, size limits, ``aspect_ratio=match``.

The submit function runs from source against moto and the fal emulator; the emulator's runner records the
size, format and orientation of what it fetched, so these tests see the image as fal would.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from kontext_s3_tools.emulator import FalEmulator
from tests.world import World, world

__all__ = ["world"]

LAYER = Path(__file__).resolve().parents[2] / "layers" / "shared"


def photo(width: int, height: int, *, orientation: int = 1, fmt: str = "JPEG") -> bytes:
    """A photo as a phone stores it: ``width`` x ``height`` pixels, with an EXIF orientation viewers apply."""
    image = Image.new("RGB", (width, height), (200, 120, 40))
    image.paste((20, 40, 220), (0, 0, width // 4, height // 4))  # a corner mark, so turning it shows
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    out = io.BytesIO()
    if fmt == "HEIF":
        pillow_heif = pytest.importorskip("pillow_heif")
        pillow_heif.register_heif_opener()
    image.save(out, fmt, exif=exif.tobytes())
    return out.getvalue()


def fetched(emulator: FalEmulator, timeout: float = 10.0) -> dict[str, Any]:
    """What the emulator's runner fetched for the one request it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r.fetched for r in emulator.requests.values() if r.fetched]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("fal's runner fetched nothing")


def submitted(world: World, key: str, body: bytes, **fields: Any) -> tuple[Any, dict[str, Any] | None]:
    submit = world.submit()
    version = world.upload(key, {"prompt": "Add a hat", **fields}, body=body)
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job(key, version)
    return job, job.image


def test_a_phone_photo_with_orientation_6_reaches_fal_upright_from_a_prepared_copy(world: World) -> None:
    job, image = submitted(world, "inputs/phone/sideways.jpg", photo(96, 64, orientation=6))
    seen = fetched(world.emulator)
    assert (seen["width"], seen["height"], seen["orientation"]) == (64, 96, 1)  # upright, and nothing left to turn
    assert image is not None and (image["width"], image["height"], image["orientation"]) == (64, 96, 6)
    prepared = image["prepared"]
    assert prepared["key"] == f"{job.output_prefix}input-prepared.jpg" and (prepared["width"], prepared["height"]) == (64, 96)
    assert [c["change"] for c in prepared["changes"]] == ["turned upright"] and "orientation 6" in prepared["changes"][0]["why"]
    copy = world.aws.s3.get_object(Bucket=world.aws.resources.bucket, Key=prepared["key"])["Body"].read()
    assert Image.open(io.BytesIO(copy)).size == (64, 96)
    assert job.sent_input is not None and job.sent_input["image_url"].startswith("s3://")  # the record keeps the upload's address


def test_an_upright_jpeg_is_sent_as_it_is_with_its_size_recorded(world: World) -> None:
    job, image = submitted(world, "inputs/plain.jpg", photo(96, 64))
    assert image is not None and image.pop("bytes") > 0
    assert image == {"content_type": "image/jpeg", "orientation": 1, "width": 96, "height": 64}
    assert world.aws.keys(job.output_prefix) == []  # no prepared copy
    seen = fetched(world.emulator)
    assert (seen["width"], seen["height"], seen["format"]) == (96, 64, "JPEG")


def test_a_heic_photo_is_converted_to_jpeg_for_fal(world: World) -> None:
    _job, image = submitted(world, "inputs/camera/shot.heic", photo(80, 60, fmt="HEIF"))
    assert image is not None and image["content_type"] == "image/heic" and (image["width"], image["height"]) == (80, 60)
    assert image["prepared"]["content_type"] == "image/jpeg" and image["prepared"]["changes"][0]["change"] == "converted"
    seen = fetched(world.emulator)
    assert (seen["format"], seen["width"], seen["height"]) == ("JPEG", 80, 60)


def test_an_avif_photo_is_converted_to_jpeg_for_fal(world: World) -> None:
    _job, image = submitted(world, "inputs/camera/shot.avif", photo(80, 60, fmt="AVIF"))
    assert image is not None and image["content_type"] == "image/avif"
    assert fetched(world.emulator)["format"] == "JPEG"


@pytest.mark.parametrize(
    ("size", "limits", "says"),
    [
        ((400, 300), {"MAX_INPUT_PIXELS": "100000"}, "400x300 = 120000 pixels; the limit is 100000"),
        ((300, 20), {}, "each side must be at least 32 pixels"),
    ],
)
def test_an_image_outside_the_size_limits_is_refused_before_any_submit(
    world: World, size: tuple[int, int], limits: dict[str, str], says: str
) -> None:
    submit = world.submit(**limits)
    version = world.upload("inputs/sized.png", body=photo(*size, fmt="PNG"))
    assert world.deliver(submit, world.upload_event()) == []
    job = world.job("inputs/sized.png", version)
    assert job.error_code == "unsupported_object" and says in str(job.error_message)
    assert world.error_record(job)["code"] == "unsupported_object"
    assert world.posts() == 0


@pytest.mark.parametrize(("size", "ratio"), [((160, 90), "16:9"), ((90, 160), "9:16"), ((100, 98), "1:1"), ((300, 200), "3:2")])
def test_aspect_ratio_match_sends_the_allowed_ratio_nearest_the_inputs(world: World, size: tuple[int, int], ratio: str) -> None:
    _job, image = submitted(world, "inputs/match.png", photo(*size, fmt="PNG"), aspect_ratio="match")
    [sent] = world.emulator.submits()
    assert sent["body"]["aspect_ratio"] == ratio
    assert image is not None and image["aspect_ratio_matched"] == ratio


def test_aspect_ratio_match_follows_the_upright_size(world: World) -> None:
    submitted(world, "inputs/match-phone.jpg", photo(160, 90, orientation=6), aspect_ratio="match")
    [sent] = world.emulator.submits()
    assert sent["body"]["aspect_ratio"] == "9:16"


def test_the_common_path_does_not_import_pillow() -> None:
    # The submit function's cold start: every module of the submit path, and no image library among them.
    code = (
        "import sys; import kontext_s3.submit, kontext_s3.input_prep, kontext_s3.image_header; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('PIL', 'pillow_heif'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(LAYER)}
    )
    assert json.loads(out.stdout) == []


def test_a_size_hidden_past_the_header_is_still_held_to_the_pixel_limit_before_decoding(world: World) -> None:
    # EXIF orientation first, then a comment that pushes the frame header past the 64 KiB the header reader sees:
    # the image must be prepared, and only the decoder can tell its size.
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), comment=b"x" * 65_000)
    submit = world.submit(MAX_INPUT_PIXELS="10000")
    version = world.upload("inputs/hidden.jpg", body=out.getvalue())
    assert world.deliver(submit, world.upload_event()) == []  # refused, not retried towards the DLQ
    job = world.job("inputs/hidden.jpg", version)
    assert job.error_code == "unsupported_object" and "200x100 = 20000 pixels; the limit is 10000" in str(job.error_message)
    assert world.posts() == 0
