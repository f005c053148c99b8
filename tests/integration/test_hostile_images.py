"""Hostile images stay within their bounds: the pixel limit holds for what would be decoded, and no decode outlasts its turn.

The real submit handler, loaded as a cold start loads it, against moto and the fal emulator: a refused image gets an
``unsupported_object`` record and fal receives nothing for it; the other records of the batch go on.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

from PIL import Image

from kontext_s3.jobs import JobState
from kontext_s3_tools.local_stack import LambdaContext, sqs_event
from tests.integration.test_prepared_inputs import photo
from tests.world import World, world

__all__ = ["world"]

LAYER = Path(__file__).resolve().parents[2] / "layers" / "shared"


def jpeg_with_padding(width: int, height: int, padding: int) -> bytes:
    """An upright JPEG whose frame header (SOF) comes after ``padding`` bytes of comment segments."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 20, 160)).save(out, "JPEG")
    data = out.getvalue()
    segments = b""
    while len(segments) < padding:
        chunk = min(65533, padding - len(segments))
        segments += b"\xff\xfe" + struct.pack(">H", chunk + 2) + b"c" * chunk
    return data[:2] + segments + data[2:]


def gif_with_a_large_frame(screen: int, frame: int) -> bytes:
    """A GIF whose logical screen is ``screen`` square and whose one frame is ``frame`` square (its data left tiny)."""
    header = b"GIF89a" + struct.pack("<HH", screen, screen) + b"\x00\x00\x00"
    descriptor = b"\x2c" + struct.pack("<HHHH", 0, 0, frame, frame) + b"\x00"
    return header + descriptor + b"\x02\x02\x4c\x01\x00" + b"\x3b"


def many_scans(scans: int) -> bytes:
    """A sideways progressive JPEG (it must be turned, so decoded) whose last scan is repeated ``scans`` times."""
    data = photo(64, 48, orientation=6)
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.save(out, "JPEG", progressive=True, exif=image.info["exif"])
    progressive = out.getvalue()
    last = progressive.rindex(b"\xff\xda")
    return progressive[:last] + progressive[last:-2] * scans + b"\xff\xd9"


def refused(world: World, key: str, body: bytes, **limits: str) -> str:
    submit = world.submit(**limits)
    version = world.upload(key, body=body)
    assert world.deliver(submit, world.upload_event()) == []  # refused at once, not retried towards the DLQ
    job = world.job(key, version)
    assert job.state is JobState.FAILED and job.error_code == "unsupported_object", (job.state, job.error_message)
    assert world.error_record(job)["code"] == "unsupported_object"
    assert world.posts() == 0
    return str(job.error_message)


def test_an_upright_jpeg_whose_size_lies_past_the_first_read_is_still_held_to_the_pixel_limit(world: World) -> None:
    message = refused(world, "inputs/far-sof.jpg", jpeg_with_padding(200, 100, 70_000), MAX_INPUT_PIXELS="10000")
    assert "200x100 = 20000 pixels; the limit is 10000" in message


def test_a_jpeg_whose_size_is_not_in_its_first_megabyte_is_refused_not_sent_unmeasured(world: World) -> None:
    message = refused(world, "inputs/no-sof.jpg", jpeg_with_padding(200, 100, 1_100_000))
    assert "cannot be checked against the pixel limit" in message


def test_a_gif_whose_frame_is_larger_than_its_screen_is_held_to_the_pixel_limit_by_its_frame(world: World) -> None:
    message = refused(world, "inputs/big-frame.gif", gif_with_a_large_frame(64, 6000))
    assert "6000x6000 = 36000000 pixels" in message


def test_a_jpeg_with_thousands_of_scans_is_refused_and_the_rest_of_its_batch_goes_on(world: World) -> None:
    submit = world.submit()
    hostile = world.upload("inputs/scans.jpg", body=many_scans(5_000))
    innocent = world.upload("inputs/innocent.jpg")
    messages = world.aws.upload_events(2)
    response = submit.lambda_handler(sqs_event(messages, world.aws.resources.queue_arn), LambdaContext("submit", 60))
    assert response["batchItemFailures"] == []
    job = world.job("inputs/scans.jpg", hostile)
    assert job.error_code == "unsupported_object" and "scans" in str(job.error_message)
    assert world.job("inputs/innocent.jpg", innocent).state is JobState.SUBMITTED
    assert [s["body"]["image_url"].split("?")[0].rsplit("/", 1)[-1] for s in world.emulator.submits()] == ["innocent.jpg"]


def test_a_traceback_in_the_log_is_redacted_like_the_rest_of_it() -> None:
    code = (
        "from kontext_s3.log import logger\n"
        "try:\n"
        "    raise ValueError('fetching https://bucket.s3.amazonaws.com/in.jpg?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAX')\n"
        "except ValueError:\n"
        "    logger.exception('failed')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": str(LAYER)})
    [line] = [json.loads(text) for text in run.stdout.splitlines() if text.startswith("{")]
    assert "ValueError" in line["exception"] and "deadbeef" not in run.stdout and "AKIAX" not in run.stdout
