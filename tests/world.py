"""A world for the handlers, in process: the real handlers, over sockets, against AWS and fal that can misbehave.

Each test gets fresh AWS resources in the moto server (deployed from the
template), reached through the AWS gateway (so AWS faults can be injected on
the wire), the fal emulator (reset), and the handlers loaded as a cold start
loads them. The adversarial and admission suites use it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from kontext_s3.job_id import derive_job_id
from kontext_s3.jobs import Job, JobStore
from kontext_s3.output_store import OutputLayout
from kontext_s3.tag_codec import encode_tags, tagging_header
from kontext_s3_tools.aws_gateway import AwsGateway
from kontext_s3_tools.emulator import FalEmulator
from kontext_s3_tools.local_stack import (
    TEST_CREDENTIALS,
    FunctionUrlServer,
    LambdaContext,
    MotoServer,
    function_environment,
    provision,
    sqs_event,
)
from tests.helpers import FAL_KEY, Aws, jpeg_bytes

MAX_RECEIVE_COUNT = 5


@dataclass
class World:
    aws: Aws
    gateway: AwsGateway
    emulator: FalEmulator
    load: Callable[[str, dict[str, str]], ModuleType]
    servers: list[FunctionUrlServer] = field(default_factory=list)

    def env(self, webhook_url: str = "http://127.0.0.1:9/unused", **overrides: str) -> dict[str, str]:
        env = function_environment(self.aws.resources, emulator=self.emulator, webhook_url=webhook_url, aws_endpoint=self.gateway.url)
        env.update(overrides)
        return env

    def submit(self, webhook_url: str = "http://127.0.0.1:9/unused", **overrides: str) -> ModuleType:
        return self.load("submit", self.env(webhook_url, **overrides))

    def webhook(self, timeout_seconds: float = 60.0, **overrides: str) -> tuple[ModuleType, FunctionUrlServer]:
        module = self.load("webhook", self.env(**overrides))
        server = FunctionUrlServer(module.lambda_handler, timeout_seconds=timeout_seconds).start()
        self.servers.append(server)
        return module, server

    def recover(self, **overrides: str) -> ModuleType:
        return self.load("recover", self.env(**overrides))

    # -- uploads and deliveries ------------------------------------------------------

    def upload(
        self, key: str, fields: dict[str, Any] | None = None, *, tags: dict[str, str] | None = None, body: bytes | None = None
    ) -> str:
        tagging = tagging_header(tags if tags is not None else encode_tags(fields or {"prompt": "make it night"}))
        put = self.aws.s3.put_object(Bucket=self.aws.resources.bucket, Key=key, Body=body or jpeg_bytes(), Tagging=tagging)
        return str(put["VersionId"])

    def upload_event(self) -> dict[str, Any]:
        """The S3 notification message of the one upload just made."""
        for message in self.aws.upload_events(1):
            return message
        raise AssertionError("no S3 event")

    def deliver(self, module: ModuleType, message: dict[str, Any], receive_count: int = 1, timeout: float = 20.0) -> list[str]:
        """One invocation on one message, as Lambda's event source mapping delivers it; the ids it reports failed."""
        copy = {**message, "Attributes": {**message.get("Attributes", {}), "ApproximateReceiveCount": str(receive_count)}}
        event = sqs_event([copy], self.aws.resources.queue_arn)
        response = module.lambda_handler(event, LambdaContext("submit", timeout))
        return [item["itemIdentifier"] for item in response["batchItemFailures"]]

    def deliver_until_dead(self, module: ModuleType, message: dict[str, Any], timeout: float = 20.0) -> int:
        """Every delivery SQS would make, up to the DLQ; then a redrive (a new message with the same body). Returns failures."""
        failures = 0
        for receive_count in range(1, MAX_RECEIVE_COUNT + 1):
            if not self.deliver(module, message, receive_count, timeout):
                break
            failures += 1
        redriven = {**message, "MessageId": str(uuid.uuid4())}
        failures += len(self.deliver(module, redriven, 1, timeout))
        return failures

    def posts(self) -> int:
        """Submits fal received (each one it accepted is paid)."""
        return len(self.emulator.submits())

    # -- what was left ---------------------------------------------------------------------

    def job(self, key: str, version: str) -> Job:
        """The upload's one job (see :meth:`jobs_of_upload` when its edit changed)."""
        jobs = self.jobs_of_upload(key, version)
        assert len(jobs) == 1, f"{len(jobs)} jobs for {key}"
        return jobs[0]

    def jobs_of_upload(self, key: str, version: str) -> list[Job]:
        return JobStore(self.aws.table()).jobs_of_upload(derive_job_id(self.aws.resources.bucket, key, version))

    def jobs_of(self, key: str) -> list[Job]:
        """Every job of an input key, whatever its version (when the event named none)."""
        store = JobStore(self.aws.table())
        items = self.aws.table().scan()["Items"]
        return [job for item in items if item.get("key") == key and (job := store.get(str(item["job_id"]))) is not None]

    def jobs_states(self) -> list[str]:
        """The state of every job in the table (not the admission items)."""
        items = self.aws.table().scan(ProjectionExpression="job_id, #s", ExpressionAttributeNames={"#s": "state"})["Items"]
        return [str(item["state"]) for item in items if not str(item["job_id"]).startswith("_")]

    def error_record(self, job: Job) -> dict[str, Any]:
        data: dict[str, Any] = self.aws.get_json(OutputLayout("inputs/", "outputs/").error_key(job.output_prefix))
        return data

    def raw_job_item(self, job_id: str) -> dict[str, Any]:
        item = self.aws.client("dynamodb").get_item(TableName=self.aws.resources.table, Key={"job_id": {"S": job_id}})["Item"]
        return dict(item)

    def events(self) -> list[dict[str, Any]]:
        return self.aws.job_events()


@pytest.fixture
def world(
    moto_server: MotoServer, emulator: FalEmulator, load_handler: Callable[..., ModuleType], caplog: pytest.LogCaptureFixture
) -> Iterator[World]:
    caplog.set_level(logging.INFO)
    resources = provision(moto_server.url, fal_key=FAL_KEY, max_receive_count=MAX_RECEIVE_COUNT)
    gateway = AwsGateway(moto_server.url, admin=TEST_CREDENTIALS).start()
    world = World(Aws(endpoint=moto_server.url, resources=resources), gateway, emulator, load_handler)
    world.aws.drain_test_event()
    yield world
    for server in world.servers:
        server.stop()
    gateway.stop()


def our_log_lines(caplog: pytest.LogCaptureFixture, *, level: int = logging.WARNING) -> list[logging.LogRecord]:
    """Lines our code wrote (the kontext logger) at ``level`` or above."""
    return [r for r in caplog.records if r.levelno >= level and r.name.startswith("kontext")]
