"""The webhook function behind a (local) Function URL, called as fal calls it."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import httpx
import pytest

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobState, JobStore, iso, new_holder, now_ms
from kontext_s3.output_store import OutputLayout
from kontext_s3_tools.emulator import FalEmulator, WebhookSigner
from kontext_s3_tools.local_stack import FunctionUrlServer, LambdaContext, function_url_event
from tests.helpers import Aws, RecordingServer, jpeg_bytes, png_bytes

SENT_INPUT = {
    "prompt": "make it night",
    "seed": 7,
    "num_images": 2,
    "output_format": "jpeg",
    "image_url": "s3://b/inputs/x.jpg?versionId=v1",
}


@dataclass
class Webhook:
    aws: Aws
    emulator: FalEmulator
    module: ModuleType
    server: FunctionUrlServer

    def job(self, key: str = "inputs/street/night.jpg", sent: dict[str, Any] | None = None) -> Job:
        """A job as the submit function leaves it: SUBMITTED with fal's request id."""
        created = self.unsubmitted_job(key, uuid.uuid4().hex, event_time=iso(now_ms() - 5000), sent=sent)
        request_id = str(uuid.uuid4())
        base = f"{self.emulator.base_url}/fal-ai/flux-pro/requests/{request_id}"
        submitted = JobStore(self.aws.table()).mark_submitted(
            created.job_id,
            str(created.holder),
            request_id=request_id,
            gateway_request_id=request_id,
            status_url=f"{base}/status",
            response_url=base,
            cancel_url=f"{base}/cancel",
        )
        assert submitted is not None
        return submitted

    def unsubmitted_job(self, key: str, version: str, event_time: str | None = None, sent: dict[str, Any] | None = None) -> Job:
        """A job whose submit is under way: SENDING, held by its sender, no fal request id yet."""
        job_id = derive_job_id(self.aws.resources.bucket, key, version)
        store = JobStore(self.aws.table())
        holder = new_holder()
        created = store.create(
            job_id=job_id,
            bucket=self.aws.resources.bucket,
            key=key,
            version_id=version,
            etag="etag",
            sequencer=None,
            event_time=event_time,
            output_prefix=OutputLayout("inputs/", "outputs/").job_prefix(key, job_id),
            holder=holder,
            hold_ms=60_000,
        )
        assert created is not None
        sending = store.begin_send(job_id, holder, input_json=json.dumps(sent or SENT_INPUT))
        assert sending is not None
        return sending

    def success(self, job: Job, images: list[bytes], **extra: Any) -> dict[str, Any]:
        described = [
            {
                "url": self.emulator.host_file(f"{job.request_id}/{i}.jpg", data, "image/jpeg"),
                "content_type": "image/jpeg",
                "file_name": f"{i}.jpg",
                "file_size": len(data),
                "width": 64,
                "height": 48,
            }
            for i, data in enumerate(images)
        ]
        payload = {
            "images": described,
            "timings": {"inference": 1.25},
            "seed": 7,
            "has_nsfw_concepts": [False] * len(images),
            "prompt": "make it night",
            **extra,
        }
        return {"request_id": job.request_id, "gateway_request_id": job.request_id, "status": "OK", "payload": payload}

    def post(
        self,
        job_id: str,
        document: dict[str, Any] | bytes,
        *,
        signer: WebhookSigner | None = None,
        request_id: str | None = None,
        timestamp: int | None = None,
        drop: str | None = None,
        body_override: bytes | None = None,
        user_id: str = "user-1",
    ) -> httpx.Response:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        rid = request_id or (json.loads(body)["request_id"] if not isinstance(document, bytes) else "x")
        headers = (signer or self.emulator.signer).headers(rid, user_id, body, timestamp)
        if drop:
            headers.pop(drop)
        return httpx.post(
            f"{self.server.url}/fal/{job_id}",
            content=body_override or body,
            headers={"Content-Type": "application/json", **headers},
            timeout=30,
        )

    def outputs(self, job: Job) -> list[str]:
        return self.aws.keys(job.output_prefix)

    def events(self) -> list[dict[str, Any]]:
        return self.aws.job_events()


@pytest.fixture
def webhook(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> Iterator[Webhook]:
    module = load_handler("webhook", function_env())
    server = FunctionUrlServer(module.lambda_handler).start()
    yield Webhook(aws, emulator, module, server)
    server.stop()


def test_a_signed_success_writes_every_image_and_the_manifest(webhook: Webhook) -> None:
    job = webhook.job()
    images = [jpeg_bytes(color=(10, 200, 30)), jpeg_bytes(color=(250, 0, 90))]
    document = webhook.success(job, images)
    response = webhook.post(job.job_id, document)
    assert response.status_code == 200, response.text
    assert response.json() == {"job_id": job.job_id, "state": "COMPLETED"}
    prefix = job.output_prefix
    assert prefix == f"outputs/street/night.jpg/{job.job_id}/"
    assert webhook.outputs(job) == [f"{prefix}image-0.jpg", f"{prefix}image-1.jpg", f"{prefix}manifest.json"]
    s3 = webhook.aws.s3
    for index, data in enumerate(images):
        stored = s3.get_object(Bucket=job.bucket, Key=f"{prefix}image-{index}.jpg")
        assert stored["Body"].read() == data  # byte for byte what fal served
        assert stored["ContentType"] == "image/jpeg"
    manifest = webhook.aws.get_json(f"{prefix}manifest.json")
    assert manifest["output"] == document["payload"]  # the full model output
    assert manifest["request_id"] == job.request_id
    assert manifest["input"] == SENT_INPUT
    assert manifest["source"] == {"bucket": job.bucket, "key": job.key, "version_id": job.version_id, "etag": "etag"}
    assert [i["key"] for i in manifest["images"]] == [f"{prefix}image-0.jpg", f"{prefix}image-1.jpg"]
    assert [(i["width"], i["height"], i["bytes"]) for i in manifest["images"]] == [(64, 48, len(images[0])), (64, 48, len(images[1]))]
    ended = JobStore(webhook.aws.table()).get(job.job_id)
    assert ended is not None and ended.state is JobState.COMPLETED and ended.manifest_key == f"{prefix}manifest.json"
    [event] = webhook.events()
    assert event["detail-type"] == "Kontext Edit Succeeded"
    assert event["detail"]["output_keys"] == [f"{prefix}image-0.jpg", f"{prefix}image-1.jpg"]
    assert event["detail"]["input_key"] == job.key


@pytest.mark.parametrize(
    "attack",
    [
        "tampered body",
        "wrong key",
        "timestamp 301 s old",
        "missing signature",
        "missing timestamp",
        "missing request id",
        "missing user id",
    ],
)
def test_an_unverified_call_is_rejected_with_nothing_written(webhook: Webhook, attack: str) -> None:
    job = webhook.job()
    document = webhook.success(job, [jpeg_bytes()])
    body = json.dumps(document).encode()
    kwargs: dict[str, Any] = {}
    if attack == "tampered body":
        kwargs["body_override"] = body.replace(b'"seed": 7', b'"seed": 8')
    elif attack == "wrong key":
        kwargs["signer"] = WebhookSigner()
    elif attack == "timestamp 301 s old":
        kwargs["timestamp"] = int(time.time()) - 301
    else:
        kwargs["drop"] = {
            "missing signature": "X-Fal-Webhook-Signature",
            "missing timestamp": "X-Fal-Webhook-Timestamp",
            "missing request id": "X-Fal-Webhook-Request-Id",
            "missing user id": "X-Fal-Webhook-User-Id",
        }[attack]
    response = webhook.post(job.job_id, document, **kwargs)
    assert response.status_code == 401
    assert response.json()["error"]
    assert webhook.outputs(job) == []
    still = JobStore(webhook.aws.table()).get(job.job_id)
    assert still is not None and still.state is JobState.SUBMITTED


def test_a_timestamp_within_the_window_is_accepted(webhook: Webhook) -> None:
    job = webhook.job()
    assert webhook.post(job.job_id, webhook.success(job, [jpeg_bytes()]), timestamp=int(time.time()) - 290).status_code == 200


def test_unknown_jobs_and_foreign_request_ids_are_not_found(webhook: Webhook) -> None:
    job = webhook.job()
    other = webhook.job(key="inputs/other.jpg")
    assert webhook.post("0" * 32, webhook.success(job, [jpeg_bytes()])).status_code == 404
    assert webhook.post("not-a-job", webhook.success(job, [jpeg_bytes()])).status_code == 404
    # A valid, signed delivery for one job replayed against another job's URL.
    response = webhook.post(other.job_id, webhook.success(job, [jpeg_bytes()]))
    assert response.status_code == 404
    assert webhook.outputs(other) == [] and webhook.outputs(job) == []


def test_a_repeat_delivery_after_the_end_changes_nothing(webhook: Webhook) -> None:
    job = webhook.job()
    document = webhook.success(job, [jpeg_bytes()])
    assert webhook.post(job.job_id, document).status_code == 200
    s3 = webhook.aws.s3
    before = {k: s3.head_object(Bucket=job.bucket, Key=k)["VersionId"] for k in webhook.outputs(job)}
    history = JobStore(webhook.aws.table()).get(job.job_id).history  # type: ignore[union-attr]
    again = webhook.post(job.job_id, document)
    assert again.status_code == 200 and again.json()["note"] == "already recorded"
    after = {k: s3.head_object(Bucket=job.bucket, Key=k)["VersionId"] for k in webhook.outputs(job)}
    assert after == before  # no new object versions were written
    assert JobStore(webhook.aws.table()).get(job.job_id).history == history  # type: ignore[union-attr]
    assert len(webhook.events()) == 1


def test_two_concurrent_deliveries_end_with_one_complete_set(webhook: Webhook) -> None:
    job = webhook.job()
    document = webhook.success(job, [jpeg_bytes(color=(1, 2, 3)), jpeg_bytes(color=(4, 5, 6))])
    webhook.emulator.set_faults(file_delay_ms=200)  # both are mid-copy at the same time
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(webhook.post(job.job_id, document).status_code)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One claims the job and copies; the other is told to retry (or finds it ended).
    assert sorted(answers) in ([200, 200], [200, 409])
    assert all(count == 1 for count in webhook.emulator.file_fetches.values()), webhook.emulator.file_fetches
    prefix = job.output_prefix
    assert webhook.outputs(job) == [f"{prefix}image-0.jpg", f"{prefix}image-1.jpg", f"{prefix}manifest.json"]
    versions = webhook.aws.s3.list_object_versions(Bucket=job.bucket, Prefix=prefix)["Versions"]
    etags: dict[str, set[str]] = {}
    for version in versions:
        etags.setdefault(version["Key"], set()).add(version["ETag"])
    assert all(len(tags) == 1 for tags in etags.values()), etags
    assert len(versions) == 3  # each file written once
    ended = JobStore(webhook.aws.table()).get(job.job_id)
    assert ended is not None and ended.state is JobState.COMPLETED
    assert [h.state for h in ended.history].count(JobState.COMPLETED) == 1
    assert len(webhook.events()) == 1


def test_an_error_payload_gives_an_error_record(webhook: Webhook) -> None:
    job = webhook.job()
    detail = {"detail": [{"loc": ["body", "image_url"], "msg": "Failed to download the file", "type": "file_download_error"}]}
    document = {
        "request_id": job.request_id,
        "gateway_request_id": job.request_id,
        "status": "ERROR",
        "error": "Invalid status code: 422",
        "payload": detail,
    }
    assert webhook.post(job.job_id, document).status_code == 200
    error = webhook.aws.get_json(f"{job.output_prefix}error.json")
    assert error["code"] == "fal_error" and error["message"] == "Invalid status code: 422"
    assert error["fal"]["detail"] == detail
    assert webhook.outputs(job) == [f"{job.output_prefix}error.json"]
    ended = JobStore(webhook.aws.table()).get(job.job_id)
    assert ended is not None and ended.state is JobState.FAILED and ended.error_key == f"{job.output_prefix}error.json"
    [event] = webhook.events()
    assert event["detail-type"] == "Kontext Edit Failed" and event["detail"]["error_code"] == "fal_error"


def test_a_payload_error_gives_an_error_record(webhook: Webhook) -> None:
    job = webhook.job()
    document = {
        "request_id": job.request_id,
        "gateway_request_id": job.request_id,
        "status": "OK",
        "payload": None,
        "payload_error": "Object of type bytes is not JSON serializable",
    }
    assert webhook.post(job.job_id, document).status_code == 200
    error = webhook.aws.get_json(f"{job.output_prefix}error.json")
    assert error["fal"]["payload_error"] == "Object of type bytes is not JSON serializable"


def test_an_output_off_the_allow_list_is_refused_not_fetched(webhook: Webhook) -> None:
    elsewhere = RecordingServer()
    try:
        job = webhook.job()
        document = webhook.success(job, [jpeg_bytes()])
        document["payload"]["images"][0]["url"] = f"{elsewhere.url}/latest/meta-data/iam/security-credentials/"
        assert webhook.post(job.job_id, document).status_code == 200
        assert elsewhere.paths == []
        error = webhook.aws.get_json(f"{job.output_prefix}error.json")
        assert error["code"] == "media_url_refused"
        assert "allow-list" in error["message"]
    finally:
        elsewhere.stop()


def test_a_payload_that_is_not_the_models_output_is_recorded_as_failed(webhook: Webhook) -> None:
    job = webhook.job()
    document = webhook.success(job, [jpeg_bytes()])
    del document["payload"]["seed"]
    assert webhook.post(job.job_id, document).status_code == 200
    error = webhook.aws.get_json(f"{job.output_prefix}error.json")
    assert error["code"] == "invalid_output"
    assert [p["field"] for p in error["problems"]] == ["seed"]


def test_a_download_fault_answers_5xx_and_leaves_the_job_open_for_the_retry(webhook: Webhook) -> None:
    job = webhook.job()
    document = webhook.success(job, [jpeg_bytes()])
    served = webhook.emulator.files.pop(f"{job.request_id}/0.jpg")  # the file host loses it
    response = webhook.post(job.job_id, document)
    assert response.status_code == 502
    still = JobStore(webhook.aws.table()).get(job.job_id)
    assert still is not None and still.state is JobState.SUBMITTED
    assert f"{job.output_prefix}manifest.json" not in webhook.outputs(job)
    webhook.emulator.files[f"{job.request_id}/0.jpg"] = served  # fal's retry, once the host is back
    assert webhook.post(job.job_id, document).status_code == 200
    assert webhook.aws.s3.get_object(Bucket=job.bucket, Key=f"{job.output_prefix}image-0.jpg")["Body"].read() == served[0]


def test_sync_mode_data_uris_are_decoded(webhook: Webhook) -> None:
    job = webhook.job(sent={**SENT_INPUT, "sync_mode": True, "output_format": "png"})
    image = png_bytes(color=(9, 9, 9))
    document = webhook.success(job, [image])
    document["payload"]["images"][0] |= {"url": "data:image/png;base64," + base64.b64encode(image).decode(), "content_type": "image/png"}
    assert webhook.post(job.job_id, document).status_code == 200
    stored = webhook.aws.s3.get_object(Bucket=job.bucket, Key=f"{job.output_prefix}image-0.png")
    assert stored["Body"].read() == image
    manifest = webhook.aws.get_json(f"{job.output_prefix}manifest.json")
    assert manifest["output"]["images"][0]["url"].startswith("data:image/png;base64,...")  # not repeated in full


def test_a_large_image_is_copied_in_parts_byte_for_byte(webhook: Webhook) -> None:
    job = webhook.job()
    big = jpeg_bytes() + bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MiB: three multipart parts
    document = webhook.success(job, [big])
    assert webhook.post(job.job_id, document).status_code == 200
    stored = webhook.aws.s3.get_object(Bucket=job.bucket, Key=f"{job.output_prefix}image-0.jpg")
    assert stored["ContentLength"] == len(big)
    assert stored["Body"].read() == big


def test_an_oversized_body_is_refused(
    webhook: Webhook, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    module = load_handler("webhook", function_env(WEBHOOK_MAX_BODY_BYTES="1000"))
    job = webhook.job()
    document = webhook.success(job, [jpeg_bytes()])
    document["payload"]["padding"] = "x" * 2000
    body = json.dumps(document).encode()
    headers = {
        "content-type": "application/json",
        **{k.lower(): v for k, v in webhook.emulator.signer.headers(str(job.request_id), "u", body).items()},
    }
    event = function_url_event("POST", f"/fal/{job.job_id}", "", headers, body, "local", "127.0.0.1")
    answer = module.lambda_handler(event, LambdaContext("webhook", 30))
    assert answer["statusCode"] == 413


def test_a_base64_encoded_function_url_body_is_verified_on_its_raw_bytes(webhook: Webhook) -> None:
    job = webhook.job()
    body = json.dumps(webhook.success(job, [jpeg_bytes()])).encode()
    headers = {
        "content-type": "application/octet-stream",
        **{k.lower(): v for k, v in webhook.emulator.signer.headers(str(job.request_id), "u", body).items()},
    }
    event = function_url_event("POST", f"/fal/{job.job_id}", "", headers, body, "local", "127.0.0.1")
    assert event["isBase64Encoded"] is True
    answer = webhook.module.lambda_handler(event, LambdaContext("webhook", 30))
    assert answer["statusCode"] == 200, answer


def test_a_webhook_faster_than_the_submit_record_is_asked_to_retry(webhook: Webhook) -> None:
    store = JobStore(webhook.aws.table())
    created = webhook.unsubmitted_job("inputs/fast.jpg", "v1")
    job_id = created.job_id
    request_id = str(uuid.uuid4())
    document = webhook.success(Job.model_validate({**created.model_dump(), "request_id": request_id}), [jpeg_bytes()])
    early = webhook.post(job_id, document)
    assert early.status_code == 409
    assert webhook.aws.keys(created.output_prefix) == []
    store.mark_submitted(
        job_id, str(created.holder), request_id=request_id, gateway_request_id=None, status_url="s", response_url="r", cancel_url="c"
    )
    assert webhook.post(job_id, document).status_code == 200  # fal's retry


def test_an_uncertain_job_learns_its_request_id_from_a_verified_webhook(webhook: Webhook) -> None:
    # A first webhook whose request id our submit recorded proves (and pins) our fal account.
    first = webhook.job(key="inputs/first.jpg")
    assert webhook.post(first.job_id, webhook.success(first, [jpeg_bytes()])).status_code == 200
    store = JobStore(webhook.aws.table())
    created = webhook.unsubmitted_job("inputs/uncertain.jpg", "v9")
    job_id = created.job_id
    store.mark_uncertain(job_id, holder=str(created.holder), reason="read timeout")
    request_id = str(uuid.uuid4())
    fake = Job.model_validate({**created.model_dump(), "request_id": request_id})
    assert webhook.post(job_id, webhook.success(fake, [jpeg_bytes()])).status_code == 200
    ended = store.get(job_id)
    assert ended is not None and ended.state is JobState.COMPLETED and ended.request_id == request_id


def test_an_uncertain_jobs_webhook_from_another_fal_account_is_refused(webhook: Webhook) -> None:
    first = webhook.job(key="inputs/first.jpg")
    assert webhook.post(first.job_id, webhook.success(first, [jpeg_bytes()])).status_code == 200  # pins "user-1"
    store = JobStore(webhook.aws.table())
    created = webhook.unsubmitted_job("inputs/uncertain.jpg", "v9")
    store.mark_uncertain(created.job_id, holder=str(created.holder), reason="read timeout")
    fake = Job.model_validate({**created.model_dump(), "request_id": str(uuid.uuid4())})
    # Validly signed by fal, for another fal account's request.
    response = webhook.post(created.job_id, webhook.success(fake, [jpeg_bytes()]), user_id="someone-else")
    assert response.status_code == 403 and "fal account" in response.json()["error"]
    assert webhook.outputs(created) == []
    still = store.get(created.job_id)
    assert still is not None and still.state is JobState.UNCERTAIN and still.request_id is None
