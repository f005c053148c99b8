"""The webhook attacked with validly signed calls: huge or empty outputs, trickling and lying media hosts, races, other accounts.

Each call is signed with the key the emulator's JWKS serves, so every case
passes the signature check: what is tested is what comes after it.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
import uuid
from typing import Any

import httpx
import pytest

from kontext_s3.jobs import Job, JobState, JobStore, new_holder
from kontext_s3.output_store import OutputLayout
from tests.adversarial.hostile import Reply, ScriptedHost
from tests.helpers import jpeg_bytes
from tests.world import World

pytestmark = pytest.mark.adversarial

PRESIGNED = (
    "https://kontext-bucket.s3.amazonaws.com/inputs/x.jpg?versionId=v1&X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=ASIAEXAMPLE%2F20261125%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261125T120000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLE&X-Amz-Signature=0123abcd"
)


def submitted(world: World, key: str = "inputs/x.jpg", num_images: int = 2) -> Job:
    """A job as the submit function leaves it: SUBMITTED with fal's request id."""
    store = JobStore(world.aws.table())
    job_id = uuid.uuid4().hex
    holder = new_holder()
    created = store.create(
        job_id=job_id,
        bucket=world.aws.resources.bucket,
        key=key,
        version_id="v1",
        etag="e",
        sequencer=None,
        event_time="2026-11-25T10:00:00.000Z",
        output_prefix=OutputLayout("inputs/", "outputs/").job_prefix(key, job_id),
        holder=holder,
        hold_ms=60_000,
    )
    assert created is not None
    sent = {"prompt": "night", "num_images": num_images, "output_format": "jpeg", "image_url": f"s3://b/{key}?versionId=v1"}
    store.begin_send(job_id, holder, input_json=json.dumps(sent))
    request_id = str(uuid.uuid4())
    base = f"{world.emulator.base_url}/fal-ai/flux-pro/requests/{request_id}"
    job = store.mark_submitted(
        job_id,
        holder,
        request_id=request_id,
        gateway_request_id=None,
        status_url=f"{base}/status",
        response_url=base,
        cancel_url=f"{base}/cancel",
    )
    assert job is not None
    return job


def payload(images: list[dict[str, Any]]) -> dict[str, Any]:
    return {"images": images, "timings": {"inference": 1.0}, "seed": 1, "has_nsfw_concepts": [False] * len(images), "prompt": "night"}


def ok(job: Job, images: list[dict[str, Any]]) -> dict[str, Any]:
    return {"request_id": job.request_id, "gateway_request_id": job.request_id, "status": "OK", "payload": payload(images)}


def hosted(world: World, job: Job, count: int, data: bytes | None = None) -> list[dict[str, Any]]:
    return [
        {
            "url": world.emulator.host_file(f"{job.request_id}/{i}.jpg", data or jpeg_bytes(color=(i % 256, 9, 9)), "image/jpeg"),
            "width": 64,
            "height": 48,
        }
        for i in range(count)
    ]


def post(world: World, url: str, job: Job, document: dict[str, Any], user_id: str = "our-account", timeout: float = 60) -> httpx.Response:
    body = json.dumps(document).encode()
    headers = world.emulator.signer.headers(str(document["request_id"]), user_id, body)
    return httpx.post(f"{url}/fal/{job.job_id}", content=body, headers={"Content-Type": "application/json", **headers}, timeout=timeout)


def stored(world: World, job: Job) -> list[str]:
    return [key.rsplit("/", 1)[-1] for key in world.aws.keys(job.output_prefix)]


def test_ten_thousand_images_are_capped_at_the_number_asked(world: World) -> None:
    _, server = world.webhook()
    job = submitted(world, num_images=2)
    two = hosted(world, job, 2)
    images = [two[i % 2] | {"url": f"{two[i % 2]['url']}?n={i}"} if i >= 2 else two[i] for i in range(10_000)]
    tracemalloc.start()
    started = time.monotonic()
    response = post(world, server.url, job, ok(job, images))
    elapsed = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert response.status_code == 200, response.text
    assert elapsed < 20, elapsed  # bounded time
    assert peak < 200 * 1024 * 1024, peak  # bounded memory (the whole process, emulator included): under 200 MB
    assert sum(world.emulator.file_fetches.values()) == 2  # only what was asked is downloaded
    assert stored(world, job) == ["image-0.jpg", "image-1.jpg", "manifest.json"]
    manifest = world.aws.get_json(f"{job.output_prefix}manifest.json")
    assert (manifest["images_asked"], manifest["images_returned"], len(manifest["images"])) == (2, 10_000, 2)
    ended = JobStore(world.aws.table()).get(job.job_id)
    assert ended is not None and ended.state is JobState.COMPLETED and len(ended.output_keys) == 2


def test_a_media_host_trickling_a_byte_a_second_cannot_hold_the_function(world: World) -> None:
    trickle = ScriptedHost(lambda _: Reply(200, (bytes([b]) for b in jpeg_bytes()), {"Content-Type": "image/jpeg"}, chunk_delay=1.0))
    try:
        _, server = world.webhook(timeout_seconds=15.0, ALLOWED_MEDIA_URLS=f"{trickle.url}/")
        job = submitted(world, num_images=1)
        started = time.monotonic()
        response = post(world, server.url, job, ok(job, [{"url": f"{trickle.url}/slow.jpg"}]))
        elapsed = time.monotonic() - started
        assert response.status_code == 502  # fal retries a 5xx
        assert elapsed < 10.0, elapsed  # answered well inside the function's 15 s, with time for fal to hear it
        still = JobStore(world.aws.table()).get(job.job_id)
        assert still is not None and still.state is JobState.SUBMITTED and still.holder is None  # open, and free for the retry
        assert "manifest.json" not in stored(world, job)
    finally:
        trickle.stop()


def test_a_page_that_is_not_an_image_is_not_stored_as_one(world: World) -> None:
    liar = ScriptedHost(lambda _: Reply(200, b"<html><body>Sign in to continue</body></html>" * 20, {"Content-Type": "image/jpeg"}))
    try:
        _, server = world.webhook(ALLOWED_MEDIA_URLS=f"{liar.url}/")
        job = submitted(world, num_images=1)
        assert post(world, server.url, job, ok(job, [{"url": f"{liar.url}/out.jpg"}])).status_code == 200
        ended = JobStore(world.aws.table()).get(job.job_id)
        assert ended is not None and ended.state is JobState.FAILED and ended.error_code == "not_an_image"
        assert stored(world, job) == ["error.json"]
        assert "not an image" in world.aws.get_json(f"{job.output_prefix}error.json")["message"]
    finally:
        liar.stop()


def test_fewer_images_than_asked_or_none_are_recorded_as_what_they_are(world: World) -> None:
    _, server = world.webhook()
    none = submitted(world, "inputs/none.jpg", num_images=2)
    assert post(world, server.url, none, ok(none, [])).status_code == 200
    ended = JobStore(world.aws.table()).get(none.job_id)
    assert ended is not None and ended.state is JobState.FAILED and ended.error_code == "no_images"
    one = submitted(world, "inputs/one.jpg", num_images=2)
    assert post(world, server.url, one, ok(one, hosted(world, one, 1))).status_code == 200
    manifest = world.aws.get_json(f"{one.output_prefix}manifest.json")
    assert (manifest["images_asked"], manifest["images_returned"]) == (2, 1)
    events = {e["detail"]["input_key"]: e["detail-type"] for e in world.events()}
    assert events == {"inputs/none.jpg": "Kontext Edit Failed", "inputs/one.jpg": "Kontext Edit Succeeded"}


def _consistent(world: World, job: Job) -> JobState:
    """The job's files agree with its state: outputs and no error record, or an error record and nothing else."""
    ended = JobStore(world.aws.table()).get(job.job_id)
    assert ended is not None
    files = set(stored(world, job))
    if ended.state is JobState.COMPLETED:
        assert files == {"image-0.jpg", "manifest.json"}, files
    elif ended.state is JobState.FAILED:
        assert files == {"error.json"}, files
    else:
        assert "manifest.json" not in files and "error.json" not in files, files
    return ended.state


@pytest.mark.parametrize("trial", range(4))
def test_ok_and_error_for_one_job_at_once_leave_one_outcome(world: World, trial: int) -> None:
    _, server = world.webhook()
    world.emulator.set_faults(file_delay_ms=300)  # the OK is mid-copy when the ERROR lands
    job = submitted(world, num_images=1)
    error = {
        "request_id": job.request_id,
        "gateway_request_id": job.request_id,
        "status": "ERROR",
        "error": "boom",
        "payload": {"detail": "x"},
    }
    documents = [ok(job, hosted(world, job, 1)), error] if trial % 2 == 0 else [error, ok(job, hosted(world, job, 1))]
    answers: list[int] = []
    threads = [threading.Thread(target=lambda d=d: answers.append(post(world, server.url, job, d).status_code)) for d in documents]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert sorted(answers) in ([200, 200], [200, 409])
    assert _consistent(world, job).ended
    assert len(world.events()) == 1


def test_the_same_webhook_twenty_times_at_once_copies_once_and_announces_once(world: World) -> None:
    _, server = world.webhook()
    world.emulator.set_faults(file_delay_ms=200)
    job = submitted(world, num_images=2)
    document = ok(job, hosted(world, job, 2))
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(post(world, server.url, job, document).status_code)) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(answers) <= {200, 409} and answers.count(200) >= 1
    assert dict(world.emulator.file_fetches) == {f"{job.request_id}/0.jpg": 1, f"{job.request_id}/1.jpg": 1}
    versions = world.aws.s3.list_object_versions(Bucket=job.bucket, Prefix=job.output_prefix)["Versions"]
    assert len(versions) == 3  # two images and the manifest, each written once
    assert len(world.events()) == 1


def test_a_signed_webhook_from_another_fal_account_is_refused(world: World) -> None:
    _, server = world.webhook(FAL_USER_ID="our-account")
    job = submitted(world, num_images=1)
    response = post(world, server.url, job, ok(job, hosted(world, job, 1)), user_id="their-account")
    assert response.status_code == 403
    assert stored(world, job) == [] and sum(world.emulator.file_fetches.values()) == 0
    assert post(world, server.url, job, ok(job, hosted(world, job, 1))).status_code == 200


@pytest.mark.parametrize(
    "path", ["/files/../private/x.png", "/files/./../private/x.png", "/files/%2e%2e/private/x.png", "/files/.%2E/x.png"]
)
def test_urls_that_leave_the_allowed_prefix_once_normalised_are_refused_unrequested(world: World, path: str) -> None:
    host = ScriptedHost(lambda _: Reply(200, jpeg_bytes(), {"Content-Type": "image/jpeg"}))
    try:
        _, server = world.webhook(ALLOWED_MEDIA_URLS=f"{host.url}/files/")
        job = submitted(world, num_images=1)
        assert post(world, server.url, job, ok(job, [{"url": f"{host.url}{path}"}])).status_code == 200
        assert host.seen == []
        ended = JobStore(world.aws.table()).get(job.job_id)
        assert ended is not None and ended.error_code == "media_url_refused"
    finally:
        host.stop()


def test_an_error_that_echoes_the_presigned_url_stores_no_credential(world: World) -> None:
    _, server = world.webhook()
    job = submitted(world, num_images=1)
    document = {
        "request_id": job.request_id,
        "gateway_request_id": job.request_id,
        "status": "ERROR",
        "error": f"Failed to download {PRESIGNED}",
        "payload": {
            "detail": [{"loc": ["body", "image_url"], "msg": "download failed", "input": PRESIGNED}],
            "Authorization": "Key abc:def",
        },
    }
    assert post(world, server.url, job, document).status_code == 200
    item = world.raw_job_item(job.job_id)
    texts = [json.dumps(world.aws.get_json(f"{job.output_prefix}error.json")), json.dumps(item), json.dumps(world.events())]
    for text in texts:
        assert "X-Amz-" not in text and "IQoJb3JpZ2luX2VjEXAMPLE" not in text and "abc:def" not in text, text[:400]
    assert "kontext-bucket.s3.amazonaws.com/inputs/x.jpg" in texts[0]  # the URL stays, readable, without its credential
