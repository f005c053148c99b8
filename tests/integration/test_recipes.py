"""Folder recipes through the real submit handler, moto (over HTTP) and the fal emulator."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import pytest

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import JobState, JobStore
from kontext_s3.recipes import RecipeBook, recipe_keys
from kontext_s3.tag_codec import encode_tags, tagging_header
from kontext_s3_tools.emulator import FalEmulator
from tests.helpers import Aws, jpeg_bytes
from tests.integration.test_submit import WEBHOOK, poller


@pytest.fixture
def submit(load_handler: Callable[..., ModuleType], function_env: Callable[..., dict[str, str]]) -> ModuleType:
    # Untagged uploads without a recipe are reported at once here; waiting for late tags is test_submit's.
    return load_handler("submit", function_env(webhook_url=WEBHOOK, TAG_WAIT_SECONDS="0"))


def put_recipe(aws: Aws, key: str, fields: object) -> str:
    body = fields if isinstance(fields, bytes) else json.dumps(fields).encode()
    return str(aws.s3.put_object(Bucket=aws.resources.bucket, Key=key, Body=body)["VersionId"])


def upload(aws: Aws, key: str, fields: dict[str, object] | None = None) -> str:
    extra = {"Tagging": tagging_header(encode_tags(fields))} if fields else {}
    return str(aws.s3.put_object(Bucket=aws.resources.bucket, Key=key, Body=jpeg_bytes(), **extra)["VersionId"])


def job(aws: Aws, key: str, version: str) -> tuple[JobStore, str]:
    store = JobStore(aws.table())
    jobs = store.jobs_of_upload(derive_job_id(aws.resources.bucket, key, version))
    assert len(jobs) == 1, f"{len(jobs)} jobs for {key}"
    return store, jobs[0].job_id


def drain(aws: Aws, submit: ModuleType) -> None:
    while poller(aws, submit).poll_once(wait_seconds=2):
        pass


def test_the_nearest_recipe_wins_and_the_uploads_tags_override_it_field_by_field(
    aws: Aws, emulator: FalEmulator, submit: ModuleType
) -> None:
    aws.drain_test_event()
    put_recipe(aws, "inputs/_kontext.json", {"prompt": "far", "seed": 1})
    near = put_recipe(aws, "inputs/shop/_kontext.json", {"prompt": "Remove the background", "output_format": "png", "seed": 7})
    time.sleep(1.1)  # S3's LastModified is to the second: the uploads come strictly after the recipes
    plain = upload(aws, "inputs/shop/shoes/a.jpg")
    tagged = upload(aws, "inputs/shop/b.jpg", {"prompt": "Make it blue", "seed": 9})
    drain(aws, submit)

    bodies = {s["body"]["prompt"]: s["body"] for s in emulator.submits()}
    assert set(bodies) == {"Remove the background", "Make it blue"}
    assert bodies["Remove the background"]["output_format"] == "png" and bodies["Remove the background"]["seed"] == 7
    assert bodies["Make it blue"]["output_format"] == "png" and bodies["Make it blue"]["seed"] == 9
    jobs, job_id = job(aws, "inputs/shop/shoes/a.jpg", plain)
    recorded = jobs.get(job_id)
    assert recorded is not None and recorded.state is JobState.SUBMITTED
    assert recorded.recipe is not None and recorded.recipe["key"] == "inputs/shop/_kontext.json" and recorded.recipe["version_id"] == near
    assert jobs.get(job(aws, "inputs/shop/b.jpg", tagged)[1]) is not None


def test_writing_a_recipe_starts_no_job(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    aws.drain_test_event()
    put_recipe(aws, "inputs/shop/_kontext.json", {"prompt": "Remove the background"})
    drain(aws, submit)
    assert emulator.submits() == []
    assert aws.s3.list_objects_v2(Bucket=aws.resources.bucket, Prefix="outputs/").get("KeyCount", 0) == 0


def test_a_recipe_changed_after_an_upload_applies_only_to_later_uploads(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    aws.drain_test_event()
    put_recipe(aws, "inputs/shop/_kontext.json", {"prompt": "old edit"})
    time.sleep(1.1)
    upload(aws, "inputs/shop/early.jpg")
    time.sleep(1.1)
    put_recipe(aws, "inputs/shop/_kontext.json", {"prompt": "new edit"})
    time.sleep(1.1)
    upload(aws, "inputs/shop/late.jpg")
    drain(aws, submit)  # the early upload is handled only now, after the change
    prompts = sorted(s["body"]["prompt"] for s in emulator.submits())
    assert prompts == ["new edit", "old edit"]


def test_an_invalid_recipe_gives_each_upload_below_it_an_error_record_naming_it_and_nothing_is_sent(
    aws: Aws, emulator: FalEmulator, submit: ModuleType
) -> None:
    aws.drain_test_event()
    version = put_recipe(aws, "inputs/shop/_kontext.json", {"prompt": "x", "num_images": 9})
    time.sleep(1.1)
    uploads = {key: upload(aws, key) for key in ("inputs/shop/a.jpg", "inputs/shop/deep/b.jpg")}
    drain(aws, submit)
    assert emulator.submits() == []
    for key, upload_version in uploads.items():
        jobs, job_id = job(aws, key, upload_version)
        failed = jobs.get(job_id)
        assert failed is not None and failed.state is JobState.FAILED and failed.error_code == "invalid_recipe"
        record = json.loads(aws.s3.get_object(Bucket=aws.resources.bucket, Key=str(failed.error_key))["Body"].read())
        assert record["code"] == "invalid_recipe" and "inputs/shop/_kontext.json" in record["message"]
        assert record["recipe"] == {"key": "inputs/shop/_kontext.json", "version_id": version}
        assert [p["field"] for p in record["problems"]] == ["num_images"]


def test_a_recipe_that_is_not_json_is_named_in_the_error(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    aws.drain_test_event()
    put_recipe(aws, "inputs/shop/_kontext.json", b"prompt: not json")
    time.sleep(1.1)
    version = upload(aws, "inputs/shop/a.jpg")
    drain(aws, submit)
    jobs, job_id = job(aws, "inputs/shop/a.jpg", version)
    failed = jobs.get(job_id)
    assert failed is not None and failed.error_code == "invalid_recipe" and "not JSON" in str(failed.error_message)
    assert emulator.submits() == []


@pytest.mark.parametrize("depth", [300, 5000])
def test_a_deeply_nested_recipe_fails_its_uploads_with_an_error_record_and_sends_nothing_to_the_dlq(
    aws: Aws, emulator: FalEmulator, submit: ModuleType, depth: int
) -> None:
    # 300: parses on any Python, but pydantic cannot write it into the error record; 5000: parses on python3.13, the runtime.
    aws.drain_test_event()
    put_recipe(aws, "inputs/shop/_kontext.json", b'{"prompt": "x", "seed": ' + b"[" * depth + b"]" * depth + b"}")
    time.sleep(1.1)
    version = upload(aws, "inputs/shop/a.jpg")
    drain(aws, submit)
    jobs, job_id = job(aws, "inputs/shop/a.jpg", version)
    failed = jobs.get(job_id)
    assert failed is not None and failed.state is JobState.FAILED and failed.error_code == "invalid_recipe"
    assert "levels deep" in str(failed.error_message)
    record = json.loads(aws.s3.get_object(Bucket=aws.resources.bucket, Key=str(failed.error_key))["Body"].read())
    assert record["code"] == "invalid_recipe" and [p["field"] for p in record["problems"]] == ["(file)"]
    assert aws.receive(aws.resources.dlq_url, wait=0) == []
    assert emulator.submits() == []


def test_an_upload_with_neither_tags_nor_recipe_says_where_the_prompt_can_come_from(
    aws: Aws, emulator: FalEmulator, submit: ModuleType
) -> None:
    aws.drain_test_event()
    version = upload(aws, "inputs/lonely.jpg")
    drain(aws, submit)
    jobs, job_id = job(aws, "inputs/lonely.jpg", version)
    failed = jobs.get(job_id)
    assert failed is not None and failed.error_code == "invalid_tags" and "_kontext.json" in str(failed.error_message)


def test_recipe_keys_go_from_the_folder_up_to_the_input_prefix() -> None:
    assert recipe_keys("inputs/a/b/c.png", "inputs/") == ["inputs/a/b/_kontext.json", "inputs/a/_kontext.json", "inputs/_kontext.json"]
    assert recipe_keys("inputs/c.png", "inputs/") == ["inputs/_kontext.json"]
    assert recipe_keys("c.png", "") == ["_kontext.json"]


def test_a_recipe_deleted_after_an_upload_still_applies_to_that_upload(aws: Aws, emulator: FalEmulator, submit: ModuleType) -> None:
    aws.drain_test_event()
    put_recipe(aws, "inputs/shop/_kontext.json", {"prompt": "as it stood"})
    time.sleep(1.1)
    upload(aws, "inputs/shop/a.jpg")
    time.sleep(1.1)
    aws.s3.delete_object(Bucket=aws.resources.bucket, Key="inputs/shop/_kontext.json")
    time.sleep(1.1)
    later = upload(aws, "inputs/shop/b.jpg")
    drain(aws, submit)
    assert [s["body"]["prompt"] for s in emulator.submits()] == ["as it stood"]
    jobs, job_id = job(aws, "inputs/shop/b.jpg", later)
    failed = jobs.get(job_id)
    assert failed is not None and failed.error_code == "invalid_tags"


def test_a_batch_of_uploads_into_one_folder_looks_its_recipes_up_once(aws: Aws) -> None:
    put_recipe(aws, "inputs/shop/_kontext.json", {"prompt": "on white"})
    time.sleep(1.2)  # the uploads arrived after the recipe, and before the batch is read (past the clock margin)
    arrived = datetime.now(UTC) - timedelta(seconds=1)
    heads: list[str] = []

    class CountedS3:
        def __getattr__(self, name: str) -> Any:
            return getattr(aws.s3, name)

        def head_object(self, **kwargs: Any) -> Any:
            heads.append(kwargs["Key"])
            time.sleep(0.05)  # as long as a HEAD takes: the other records arrive while it is on the wire
            return aws.s3.head_object(**kwargs)

    book = RecipeBook(CountedS3(), aws.resources.bucket, "inputs/")  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=10) as pool:  # the submit function's records run on ten threads
        found = list(pool.map(lambda i: book.for_upload(f"inputs/shop/{i}.jpg", arrived), range(10)))
    assert all(recipe is not None and recipe.fields["prompt"] == "on white" for recipe in found)
    assert heads == ["inputs/shop/_kontext.json"]  # one HEAD for the ten, not ten
