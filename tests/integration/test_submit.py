"""The submit function against moto (over HTTP) and the fal emulator (over HTTP).

Each test uploads to S3, takes the notification S3 put on the queue, and runs the
real handler on it as Lambda's SQS event source would (``SqsPoller``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote_plus

import httpx
import pytest

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import JobState, JobStore
from kontext_s3.s3_events import notification, parse_notification
from kontext_s3.tag_codec import encode_tags, tagging_header
from kontext_s3_tools.emulator import FalEmulator
from kontext_s3_tools.local_stack import SqsPoller
from tests.helpers import Aws, invoke_sqs, jpeg_bytes

EVENTS = Path(__file__).resolve().parents[2] / "events"
WEBHOOK = "http://127.0.0.1:9/webhook-under-test"


@pytest.fixture
def submit(load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]) -> ModuleType:
    return load_handler("submit", function_env(webhook_url=WEBHOOK))


def poller(aws: Aws, module: ModuleType, timeout: float = 20.0) -> SqsPoller:
    return SqsPoller(
        module.lambda_handler,
        endpoint=aws.endpoint,
        queue_url=aws.resources.queue_url,
        queue_arn=aws.resources.queue_arn,
        timeout_seconds=timeout,
        retry_delay_seconds=0,
    )


def upload(aws: Aws, key: str, fields: dict[str, object], body: bytes | None = None) -> str:
    aws.drain_test_event()
    put = aws.s3.put_object(Bucket=aws.resources.bucket, Key=key, Body=body or jpeg_bytes(), Tagging=tagging_header(encode_tags(fields)))
    return str(put["VersionId"])


def job_of(aws: Aws, key: str, version: str) -> tuple[str, JobStore]:
    """The id of the upload's one job (with re-runs on tag changes it names the edit too), and the store."""
    store = JobStore(aws.table())
    jobs = store.jobs_of_upload(derive_job_id(aws.resources.bucket, key, version))
    assert len(jobs) == 1, f"{len(jobs)} jobs for {key}"
    return jobs[0].job_id, store


def test_a_tagged_upload_becomes_one_fal_request_with_the_model_input_and_a_webhook(
    aws: Aws, emulator: FalEmulator, submit: ModuleType
) -> None:
    key = "inputs/kitchen/flour café.jpg"
    image = jpeg_bytes()
    prompt = "Put a donut next to the flour, then add 'fal' on the bag? Yes!"
    version = upload(aws, key, {"prompt": prompt, "seed": 42, "num_images": 2, "aspect_ratio": "16:9"}, image)
    assert poller(aws, submit).poll_once(wait_seconds=2) == 1

    submits = emulator.submits()
    assert len(submits) == 1
    body = dict(submits[0]["body"])
    image_url = body.pop("image_url")
    assert body == {
        "prompt": prompt,
        "seed": 42,
        "guidance_scale": 3.5,
        "sync_mode": False,
        "num_images": 2,
        "output_format": "jpeg",
        "safety_tolerance": "2",
        "enhance_prompt": False,
        "aspect_ratio": "16:9",
    }
    # fal can fetch exactly the uploaded version through the URL it was given.
    assert httpx.get(image_url).content == image
    job_id, jobs = job_of(aws, key, version)
    assert submits[0]["webhook_url"] == f"{WEBHOOK}/fal/{job_id}"
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.SUBMITTED
    assert job.request_id in emulator.requests
    assert job.status_url and job.status_url.endswith(f"/requests/{job.request_id}/status")
    assert [h.state for h in job.history] == [JobState.SUBMITTING, JobState.SENDING, JobState.SUBMITTED]
    # The presigned URL is a credential: the job keeps the object's address instead.
    assert job.sent_input is not None and job.sent_input["image_url"] == f"s3://{aws.resources.bucket}/{key}?versionId={version}"
    assert aws.receive(wait=0, visibility=0) == []  # the message was deleted, not retried


def test_a_second_delivery_of_the_same_event_submits_nothing(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    upload(aws, "inputs/twice.jpg", {"prompt": "make it blue"})
    [message] = aws.upload_events(1)
    assert invoke_sqs(submit, [message], aws.resources.queue_arn) == {"batchItemFailures": []}
    # S3 redelivers as a new SQS message (new id), possibly twice in one batch.
    copies = [dict(message, MessageId=str(uuid.uuid4())) for _ in range(2)]
    assert invoke_sqs(submit, copies, aws.resources.queue_arn) == {"batchItemFailures": []}
    assert len(emulator.submits()) == 1


def test_duplicates_in_one_batch_race_and_only_one_submits(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    emulator.set_faults(submit_delay_ms=300)  # keep the first submit in flight while the copies arrive
    upload(aws, "inputs/race.jpg", {"prompt": "make it red"})
    [message] = aws.upload_events(1)
    batch = [dict(message, MessageId=str(uuid.uuid4())) for _ in range(5)]
    assert invoke_sqs(submit, batch, aws.resources.queue_arn) == {"batchItemFailures": []}
    assert len(emulator.submits()) == 1


def test_the_s3_test_event_is_acknowledged(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    [message] = aws.receive()
    assert json.loads(message["Body"])["Event"] == "s3:TestEvent"  # moto, like S3, sends it on configuration
    assert invoke_sqs(submit, [message], aws.resources.queue_arn) == {"batchItemFailures": []}
    sample = json.loads((EVENTS / "sqs-s3-test-event.json").read_text())
    assert submit.lambda_handler(sample, _context()) == {"batchItemFailures": []}
    assert emulator.submits() == []


def test_a_bad_tag_gives_an_error_record_and_no_retry(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    key = "inputs/bad.jpg"
    version = upload(aws, key, {"prompt": "brighter", "guidance_scale": 25})
    assert poller(aws, submit).poll_once(wait_seconds=2) == 1
    job_id, jobs = job_of(aws, key, version)
    error = aws.get_json(f"outputs/bad.jpg/{job_id}/error.json")
    assert error["code"] == "invalid_tags"
    assert error["source"] == {"bucket": aws.resources.bucket, "key": key, "version_id": version, "etag": error["source"]["etag"]}
    [problem] = error["problems"]
    assert problem["field"] == "guidance_scale"
    assert problem["allowed"] == "a number from 1 to 20"
    assert "guidance_scale" in error["message"]
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.FAILED and not job.failure_retryable
    assert job.error_key == f"outputs/bad.jpg/{job_id}/error.json"
    assert emulator.submits() == []
    assert aws.receive(wait=0, visibility=0) == []  # acknowledged: retrying cannot fix a tag


def test_without_a_tag_wait_a_missing_prompt_is_reported_at_once(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    submit = load_handler("submit", function_env(webhook_url=WEBHOOK, TAG_WAIT_SECONDS="0"))
    version = upload(aws, "inputs/no-prompt.jpg", {"seed": 3})
    poller(aws, submit).poll_once(wait_seconds=2)
    job_id, _ = job_of(aws, "inputs/no-prompt.jpg", version)
    error = aws.get_json(f"outputs/no-prompt.jpg/{job_id}/error.json")
    assert error["problems"][0]["field"] == "prompt"
    assert "required" in error["problems"][0]["message"]
    assert emulator.submits() == []


# -- tags that come after the upload, and changed tags ---------------------------------------------------


def tagged_later(aws: Aws, key: str, fields: dict[str, object]) -> None:
    tags = encode_tags(fields)
    aws.s3.put_object_tagging(Bucket=aws.resources.bucket, Key=key, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]})


def deliver_all(aws: Aws, submit: ModuleType, wait_seconds: int = 2) -> int:
    handled = 0
    while count := poller(aws, submit).poll_once(wait_seconds=wait_seconds):
        handled += count
    return handled


def test_an_upload_without_a_prompt_waits_for_its_tags_and_then_reports_them_missing(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    submit = load_handler("submit", function_env(webhook_url=WEBHOOK, TAG_WAIT_SECONDS="3"))
    version = upload(aws, "inputs/untagged.jpg", {"seed": 3})
    assert poller(aws, submit).poll_once(wait_seconds=2) == 1
    assert JobStore(aws.table()).jobs_of_upload(derive_job_id(aws.resources.bucket, "inputs/untagged.jpg", version)) == []
    assert aws.keys("outputs/untagged.jpg/") == []  # no error record yet: its tags may still come
    # The deadline is a message SQS holds back for TAG_WAIT_SECONDS, not a function asleep.
    deliver_all(aws, submit, wait_seconds=5)
    job_id, _ = job_of(aws, "inputs/untagged.jpg", version)
    error = aws.get_json(f"outputs/untagged.jpg/{job_id}/error.json")
    assert error["code"] == "invalid_tags" and error["problems"][0]["field"] == "prompt"
    assert emulator.submits() == []
    assert aws.receive(aws.resources.dlq_url, wait=0) == []


def test_tags_put_after_the_upload_start_its_job_once(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    submit = load_handler("submit", function_env(webhook_url=WEBHOOK, TAG_WAIT_SECONDS="3"))
    aws.drain_test_event()
    version = str(aws.s3.put_object(Bucket=aws.resources.bucket, Key="inputs/late.jpg", Body=jpeg_bytes())["VersionId"])
    assert deliver_all(aws, submit) == 1  # the upload waits for its tags
    tagged_later(aws, "inputs/late.jpg", {"prompt": "paint it gold", "seed": 5})
    deliver_all(aws, submit, wait_seconds=5)  # the tagging event, then the upload's deadline
    [submitted] = emulator.submits()
    assert submitted["body"]["prompt"] == "paint it gold" and submitted["body"]["seed"] == 5
    job_id, jobs = job_of(aws, "inputs/late.jpg", version)
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.SUBMITTED
    assert aws.keys("outputs/late.jpg/") == []  # the deadline found the job: no error record


def test_a_changed_prompt_is_a_new_job_in_its_own_folder_and_the_same_prompt_again_is_nothing(
    aws: Aws, emulator: FalEmulator, submit: ModuleType
) -> None:
    version = upload(aws, "inputs/again.jpg", {"prompt": "make it blue"})
    deliver_all(aws, submit)
    tagged_later(aws, "inputs/again.jpg", {"prompt": "make it red"})
    deliver_all(aws, submit)
    tagged_later(aws, "inputs/again.jpg", {"prompt": "make it red"})  # set again: the same edit
    tagged_later(aws, "inputs/again.jpg", {"prompt": "make it blue"})  # back to the first: it ran already
    deliver_all(aws, submit)
    assert [s["body"]["prompt"] for s in emulator.submits()] == ["make it blue", "make it red"]
    jobs = JobStore(aws.table()).jobs_of_upload(derive_job_id(aws.resources.bucket, "inputs/again.jpg", version))
    assert [job.sent_input["prompt"] for job in jobs if job.sent_input] == ["make it blue", "make it red"]
    folders = {job.output_prefix for job in jobs}
    assert len(folders) == 2 and all(folder.startswith("outputs/again.jpg/") for folder in folders)


def test_an_uploads_own_tags_seen_again_as_a_tagging_event_start_nothing(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    upload(aws, "inputs/echo.jpg", {"prompt": "once", "seed": 4})
    assert deliver_all(aws, submit) == 1  # S3 sends ObjectCreated only (moto_server puts moto's extra event right)
    tagged_later(aws, "inputs/echo.jpg", {"prompt": "once", "seed": 4})  # a tool writing the same tags again
    assert deliver_all(aws, submit) == 1
    assert len(emulator.submits()) == 1


def test_a_repeat_of_the_upload_event_asking_another_edit_is_a_duplicate_not_a_rerun(
    aws: Aws, emulator: FalEmulator, submit: ModuleType
) -> None:
    # A backfill (or a redelivery after a default changed) about an upload that already ran: only new tags re-run.
    upload(aws, "inputs/ran.jpg", {"prompt": "make it blue"})
    [message] = aws.upload_events(1)
    assert invoke_sqs(submit, [message], aws.resources.queue_arn) == {"batchItemFailures": []}
    [change] = parse_notification(message["Body"])
    again = dict(message, MessageId="backfill", Body=notification([change], backfill=True, fields={"output_format": "png"}))
    assert invoke_sqs(submit, [again], aws.resources.queue_arn) == {"batchItemFailures": []}
    assert len(emulator.submits()) == 1


def test_invalid_tags_then_fixed_tags_run_the_fixed_edit(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    version = upload(aws, "inputs/fixed.jpg", {"prompt": "brighter", "guidance_scale": 25})
    deliver_all(aws, submit)
    tagged_later(aws, "inputs/fixed.jpg", {"prompt": "brighter", "guidance_scale": 5})
    deliver_all(aws, submit)
    [sent] = emulator.submits()
    assert sent["body"]["guidance_scale"] == 5
    jobs = JobStore(aws.table()).jobs_of_upload(derive_job_id(aws.resources.bucket, "inputs/fixed.jpg", version))
    assert [(job.state, job.error_code) for job in jobs] == [(JobState.FAILED, "invalid_tags"), (JobState.SUBMITTED, None)]


def test_with_reruns_off_changed_tags_start_nothing(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    submit = load_handler("submit", function_env(webhook_url=WEBHOOK, RERUN_ON_TAG_CHANGE="false"))
    upload(aws, "inputs/once.jpg", {"prompt": "make it blue"})
    deliver_all(aws, submit)
    tagged_later(aws, "inputs/once.jpg", {"prompt": "make it red"})
    deliver_all(aws, submit)
    assert [s["body"]["prompt"] for s in emulator.submits()] == ["make it blue"]


def test_an_object_that_is_not_an_image_is_refused(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    version = upload(aws, "inputs/notes.jpg", {"prompt": "x"}, body=b"%PDF-1.7 not an image at all")
    poller(aws, submit).poll_once(wait_seconds=2)
    job_id, _ = job_of(aws, "inputs/notes.jpg", version)
    error = aws.get_json(f"outputs/notes.jpg/{job_id}/error.json")
    assert error["code"] == "unsupported_object"
    assert "JPEG, PNG, WebP, GIF, HEIC/HEIF or AVIF" in error["message"]
    assert emulator.submits() == []


def test_a_429_then_200_gives_one_job(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    emulator.set_faults(submit_429=1)
    key = "inputs/busy.jpg"
    version = upload(aws, key, {"prompt": "snow"})
    assert poller(aws, submit).poll_once(wait_seconds=2) == 1
    assert len(emulator.submits()) == 2  # the 429, then the accepted retry
    assert len(emulator.requests) == 1
    job_id, jobs = job_of(aws, key, version)
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.SUBMITTED and job.request_id in emulator.requests
    assert aws.receive(wait=0, visibility=0) == []


def test_fal_500_forever_ends_in_the_dlq_with_the_job_marked_failed(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    emulator.set_faults(submit_5xx=10_000)
    key = "inputs/down.jpg"
    version = upload(aws, key, {"prompt": "sunset"})
    local_lambda = poller(aws, submit, timeout=7.0)  # ~2 s of retries per invocation, then 3 s to hear an answer
    deliveries = 0
    for _ in range(aws.resources.max_receive_count + 2):
        deliveries += local_lambda.poll_once(wait_seconds=1)
    assert deliveries == aws.resources.max_receive_count
    dead = aws.receive(aws.resources.dlq_url, wait=1)
    assert len(dead) == 1 and unquote_plus(json.loads(dead[0]["Body"])["Records"][0]["s3"]["object"]["key"]) == "inputs/down.jpg"
    job_id, jobs = job_of(aws, key, version)
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.FAILED and job.failure_retryable
    assert job.attempts == aws.resources.max_receive_count
    error = aws.get_json(f"outputs/down.jpg/{job_id}/error.json")
    assert error["code"] == "fal_unavailable" and error["retryable"] is True
    assert "503" in error["message"]
    assert emulator.requests == {}  # nothing was ever accepted, so nothing was paid for


def test_a_dlq_redrive_resumes_a_retryably_failed_job(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    emulator.set_faults(submit_5xx=10_000)
    key = "inputs/redrive.jpg"
    version = upload(aws, key, {"prompt": "fog"})
    local_lambda = poller(aws, submit, timeout=6.0)
    for _ in range(aws.resources.max_receive_count + 1):
        local_lambda.poll_once(wait_seconds=1)
    [dead] = aws.receive(aws.resources.dlq_url, wait=1)
    emulator.set_faults(submit_5xx=0)  # the operator fixed the cause, then redrives
    assert invoke_sqs(submit, [dict(dead, MessageId=str(uuid.uuid4()))], aws.resources.queue_arn) == {"batchItemFailures": []}
    job_id, jobs = job_of(aws, key, version)
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.SUBMITTED
    assert len(emulator.requests) == 1


def test_a_4xx_from_fal_fails_the_job_with_fals_answer(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    # A misconfigured endpoint id: fal answers 404, which no retry can fix.
    module = load_handler("submit", function_env(webhook_url=WEBHOOK, FAL_ENDPOINT="fal-ai/flux-pro/kontext/max/unknown"))
    key = "inputs/unknown-endpoint.jpg"
    version = upload(aws, key, {"prompt": "x"})
    poller(aws, module).poll_once(wait_seconds=2)
    job_id, jobs = job_of(aws, key, version)
    error = aws.get_json(f"outputs/unknown-endpoint.jpg/{job_id}/error.json")
    assert error["code"] == "fal_rejected"
    assert error["fal"]["status_code"] == 404
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.FAILED


def test_a_submit_that_may_have_reached_fal_is_never_sent_twice(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    module = load_handler("submit", function_env(webhook_url=WEBHOOK, FAL_TIMEOUT_SECONDS="0.3"))
    emulator.set_faults(submit_delay_ms=1500)  # fal accepts it, but answers after our timeout
    key = "inputs/slow.jpg"
    version = upload(aws, key, {"prompt": "x"})
    [message] = aws.upload_events(1)
    assert invoke_sqs(module, [message], aws.resources.queue_arn) == {"batchItemFailures": []}
    assert invoke_sqs(module, [dict(message, MessageId="again")], aws.resources.queue_arn) == {"batchItemFailures": []}
    job_id, jobs = job_of(aws, key, version)
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.UNCERTAIN
    assert "not resent" in (job.error_message or "")
    assert len(emulator.submits()) == 1


def test_a_wrong_fal_key_keeps_the_upload_for_a_retry(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    secrets = aws.client("secretsmanager")
    secrets.put_secret_value(SecretId=aws.resources.secret_arn, SecretString="wrong:key")
    module = load_handler("submit", function_env(webhook_url=WEBHOOK))
    key = "inputs/key.jpg"
    version = upload(aws, key, {"prompt": "x"})
    [message] = aws.upload_events(1)
    response = invoke_sqs(module, [message], aws.resources.queue_arn)
    assert response == {"batchItemFailures": [{"itemIdentifier": message["MessageId"]}]}
    job_id, jobs = job_of(aws, key, version)
    job = jobs.get(job_id)
    assert job is not None and job.state is JobState.SUBMITTING and job.holder is None
    assert "key" in (job.error_message or "")


def test_uploads_outside_the_input_prefix_are_ignored(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    sample = json.loads((EVENTS / "sqs-s3-put.json").read_text())
    body = json.loads(sample["Records"][0]["body"])
    body["Records"][0]["s3"]["object"]["key"] = "outputs/kitchen/flour.jpg/abc/image-0.jpg"
    body["Records"][0]["s3"]["bucket"]["name"] = aws.resources.bucket
    sample["Records"][0]["body"] = json.dumps(body)
    assert submit.lambda_handler(sample, _context()) == {"batchItemFailures": []}
    assert emulator.submits() == []
    assert aws.table().scan()["Items"] == []


def test_a_message_that_is_not_an_s3_event_is_retried_towards_the_dlq(aws: Aws, submit: ModuleType) -> None:
    sample = json.loads((EVENTS / "sqs-s3-put.json").read_text())
    sample["Records"][0]["body"] = "this is not JSON"
    response = submit.lambda_handler(sample, _context())
    assert response == {"batchItemFailures": [{"itemIdentifier": sample["Records"][0]["messageId"]}]}


def _context() -> object:
    from kontext_s3_tools.local_stack import LambdaContext

    return LambdaContext("submit", 20.0)


def test_fal_is_told_how_long_to_keep_its_copies_of_the_outputs_when_a_retention_is_set(
    aws: Aws, emulator: FalEmulator, load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]
) -> None:
    kept = load_handler("submit", function_env(webhook_url=WEBHOOK, FAL_MEDIA_RETENTION_SECONDS="7200"))
    upload(aws, "inputs/kept.jpg", {"prompt": "x"})
    deliver_all(aws, kept)
    default = load_handler("submit", function_env(webhook_url=WEBHOOK))
    tags = tagging_header(encode_tags({"prompt": "x"}))
    aws.s3.put_object(Bucket=aws.resources.bucket, Key="inputs/default.jpg", Body=jpeg_bytes(), Tagging=tags)
    deliver_all(aws, default)
    preference = [{k.lower(): v for k, v in s["headers"].items()}.get("x-fal-object-lifecycle-preference") for s in emulator.submits()]
    assert [json.loads(p) if p else None for p in preference] == [{"expiration_duration_seconds": 7200}, None]
