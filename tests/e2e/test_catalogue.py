"""The catalogue people already have (issue 12), over the local stack: backfill, late tags, re-runs, dead letters."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from PIL import Image

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobState
from kontext_s3.tag_codec import encode_tags
from kontext_s3_tools import cli
from kontext_s3_tools.local_stack import LocalStack
from tests.helpers import eventually as until
from tests.helpers import jpeg_bytes


def jobs_of(stack: LocalStack, key: str, version: str) -> list[Job]:
    return stack.jobs().jobs_of_upload(derive_job_id(stack.resources.bucket, key, version))


def ended(stack: LocalStack, key: str, version: str, count: int = 1) -> list[Job] | None:
    jobs = jobs_of(stack, key, version)
    return jobs if len(jobs) == count and all(job.state.ended for job in jobs) else None


def tag(stack: LocalStack, key: str, fields: dict[str, object]) -> None:
    tag_set = [{"Key": name, "Value": value} for name, value in encode_tags(fields).items()]
    stack.client("s3").put_object_tagging(Bucket=stack.resources.bucket, Key=key, Tagging={"TagSet": tag_set})


@contextmanager
def notifications_off(stack: LocalStack) -> Iterator[None]:
    """The bucket as it was before the stack existed: writes send no events."""
    s3 = stack.client("s3")
    config = s3.get_bucket_notification_configuration(Bucket=stack.resources.bucket)
    config.pop("ResponseMetadata", None)
    s3.put_bucket_notification_configuration(Bucket=stack.resources.bucket, NotificationConfiguration={})
    try:
        yield
    finally:
        s3.put_bucket_notification_configuration(Bucket=stack.resources.bucket, NotificationConfiguration=config)


@pytest.fixture
def run_cli(stack: LocalStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    for name, value in stack.cli_environment().items():
        monkeypatch.setenv(name, value)

    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(list(argv))
        return code, capsys.readouterr().out

    return run


def test_a_hundred_images_already_in_the_bucket_are_backfilled_once(stack: LocalStack, run_cli: Callable[..., tuple[int, str]]) -> None:
    s3 = stack.client("s3")
    versions = {}
    with notifications_off(stack):
        for i in range(100):
            key = f"inputs/e2e/backfill/old-{i:03}.jpg"
            versions[key] = s3.put_object(Bucket=stack.resources.bucket, Key=key, Body=jpeg_bytes(48, 32, (i, 90, 200)))["VersionId"]
    time.sleep(2)
    assert stack.accepted_requests_per_job() == Counter()  # they are old: nothing started them

    code, out = run_cli("backfill", "e2e/backfill/", "--prompt", "Make it autumn")
    assert code == 0 and "listed 100, queued 100, already had a job 0" in out
    until(lambda: all(ended(stack, k, v) for k, v in versions.items()), timeout=300, what="100 backfilled jobs to end")
    jobs = [jobs_of(stack, k, v)[0] for k, v in versions.items()]
    assert Counter(job.state for job in jobs) == Counter({JobState.COMPLETED: 100})
    assert all(job.sent_input and job.sent_input["prompt"] == "Make it autumn" for job in jobs)

    code, out = run_cli("backfill", "e2e/backfill/", "--prompt", "Make it autumn")
    assert code == 0 and "listed 100, queued 0, already had a job 100" in out
    time.sleep(3)
    accepted = stack.accepted_requests_per_job()
    assert sorted(accepted) == sorted(job.job_id for job in jobs) and set(accepted.values()) == {1}


def test_tags_put_30_s_after_the_upload_start_it_and_an_upload_never_tagged_gets_its_error_record(stack: LocalStack) -> None:
    wait = int(stack.parameters["TagWaitSeconds"])
    assert 30 < wait <= 60  # the e2e stack's TagWaitSeconds (300 when deployed)
    s3 = stack.client("s3")
    uploaded_at = time.monotonic()
    late = s3.put_object(Bucket=stack.resources.bucket, Key="inputs/e2e/late/tagged.jpg", Body=jpeg_bytes())["VersionId"]
    never = s3.put_object(Bucket=stack.resources.bucket, Key="inputs/e2e/late/never.jpg", Body=jpeg_bytes())["VersionId"]
    time.sleep(30)
    assert jobs_of(stack, "inputs/e2e/late/tagged.jpg", late) == []  # waiting for its tags, not failed
    assert jobs_of(stack, "inputs/e2e/late/never.jpg", never) == []
    tag(stack, "inputs/e2e/late/tagged.jpg", {"prompt": "Add falling snow"})

    [done] = until(lambda: ended(stack, "inputs/e2e/late/tagged.jpg", late), timeout=60, what="the late-tagged job")
    assert done.state is JobState.COMPLETED and done.sent_input and done.sent_input["prompt"] == "Add falling snow"
    [refused] = until(lambda: ended(stack, "inputs/e2e/late/never.jpg", never), timeout=wait + 30, what="the error record")
    assert time.monotonic() - uploaded_at >= wait
    assert refused.state is JobState.FAILED and refused.error_code == "invalid_tags" and "prompt" in str(refused.error_message)
    time.sleep(wait - (time.monotonic() - uploaded_at) + 3)  # the tagged one's deadline passes too: it changes nothing
    assert ended(stack, "inputs/e2e/late/tagged.jpg", late) is not None
    assert stack.client("s3").list_objects_v2(Bucket=stack.resources.bucket, Prefix=done.output_prefix + "error.json").get("KeyCount") == 0


def test_a_changed_prompt_runs_again_in_its_own_folder_and_setting_it_again_runs_nothing(stack: LocalStack) -> None:
    target = stack.target()
    uploaded = cli.upload_bytes(target, jpeg_bytes(), "rerun.jpg", {"prompt": "Make it blue"}, key="inputs/e2e/rerun.jpg")
    assert cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None).succeeded
    assert uploaded.version_id is not None
    tag(stack, uploaded.key, {"prompt": "Make it red"})
    first, second = until(lambda: ended(stack, uploaded.key, str(uploaded.version_id), 2), timeout=60, what="the re-run")
    assert first.job_id == uploaded.job_id and second.state is JobState.COMPLETED
    assert second.output_prefix != first.output_prefix and second.output_prefix.startswith("outputs/e2e/rerun.jpg/")
    manifest = stack.client("s3").get_object(Bucket=stack.resources.bucket, Key=second.output_prefix + "manifest.json")
    assert b"Make it red" in manifest["Body"].read()

    tag(stack, uploaded.key, {"prompt": "Make it red"})  # the same edit again
    tag(stack, uploaded.key, {"prompt": "Make it blue"})  # and the first one again
    time.sleep(8)
    assert len(jobs_of(stack, uploaded.key, str(uploaded.version_id))) == 2
    assert stack.accepted_requests_per_job() == Counter({first.job_id: 1, second.job_id: 1})


def test_a_dead_lettered_upload_is_listed_and_redriven_once_to_completion(
    stack: LocalStack, run_cli: Callable[..., tuple[int, str]]
) -> None:
    stack.emulator.set_faults(submit_5xx=100_000)  # fal is down for every delivery
    target = stack.target()
    uploaded = cli.upload_bytes(target, jpeg_bytes(), "dead.jpg", {"prompt": "Make it green"}, key="inputs/e2e/dead.jpg")

    def listed() -> str | None:
        code, out = run_cli("dlq", "list")
        return out if code == 0 and uploaded.key in out else None

    out = until(listed, timeout=90, what="the upload in the dead-letter queue")
    [line] = [line for line in out.splitlines() if uploaded.key in line]
    assert "fal_unavailable" in line and "received" in line
    stack.emulator.set_faults(submit_5xx=0)  # the operator fixed fal's side

    code, out = run_cli("dlq", "redrive", "--key", uploaded.key)
    assert code == 0 and f"moved back: {uploaded.key}" in out
    # The job failed retryably on the last delivery; the redriven message takes it up again.
    until(lambda: (job := stack.jobs().get(uploaded.job_id)) and job.state is JobState.COMPLETED, timeout=60, what="completion")
    code, out = run_cli("dlq", "list")
    assert uploaded.key not in out
    time.sleep(2)
    assert stack.accepted_requests_per_job()[uploaded.job_id] == 1


def phone_photo(width: int, height: int, orientation: int) -> bytes:
    image = Image.new("RGB", (width, height), (200, 120, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_a_sideways_phone_photo_reaches_fal_upright_and_its_manifest_says_why(stack: LocalStack) -> None:
    target = stack.target()
    uploaded = cli.upload_bytes(target, phone_photo(120, 80, 6), "sideways.jpg", {"prompt": "Add a hat"}, key="inputs/e2e/sideways.jpg")
    result = cli.wait_for_result(target, uploaded, timeout=60, progress=lambda _: None)
    assert result.succeeded and result.manifest is not None
    [request] = [r for r in stack.emulator.requests.values() if r.fetched]
    assert request.fetched is not None and (request.fetched["width"], request.fetched["height"], request.fetched["orientation"]) == (
        80,
        120,
        1,
    )
    image = result.manifest["input_image"]
    assert (image["width"], image["height"], image["orientation"]) == (80, 120, 6)
    assert image["prepared"]["key"] == f"{uploaded.output_prefix}input-prepared.jpg"
    assert [change["change"] for change in image["prepared"]["changes"]] == ["turned upright"]
    assert all(out["width"] and out["height"] for out in result.manifest["images"])  # each output's size beside the input's


def test_a_heic_upload_is_converted_and_an_oversized_one_refused_before_any_submit(stack: LocalStack) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    out = io.BytesIO()
    Image.new("RGB", (96, 64), (20, 140, 90)).save(out, "HEIF")
    target = stack.target()
    heic = cli.upload_bytes(target, out.getvalue(), "shot.heic", {"prompt": "Make it dusk"}, key="inputs/e2e/shot.heic")
    result = cli.wait_for_result(target, heic, timeout=60, progress=lambda _: None)
    assert result.succeeded and result.manifest is not None
    assert result.manifest["input_image"]["content_type"] == "image/heic"
    assert result.manifest["input_image"]["prepared"]["content_type"] == "image/jpeg"
    assert [r.fetched["format"] for r in stack.emulator.requests.values() if r.fetched] == ["JPEG"]

    limit = int(stack.parameters.get("MaxInputPixels", "25000000"))  # the template default
    side = int(limit**0.5) + 1  # a PNG just past the pixel limit, a few kilobytes on the wire
    big = io.BytesIO()
    Image.new("L", (side, side), 0).save(big, "PNG", optimize=True)
    oversized = cli.upload_bytes(target, big.getvalue(), "huge.png", {"prompt": "Make it dusk"}, key="inputs/e2e/huge.png")
    refused = cli.wait_for_result(target, oversized, timeout=60, progress=lambda _: None)
    assert not refused.succeeded and refused.error is not None
    assert refused.error["code"] == "unsupported_object" and f"the limit is {limit}" in refused.error["message"]
    assert stack.accepted_requests_per_job()[oversized.job_id] == 0
    assert len(stack.emulator.submits()) == 1  # the HEIC's only
