"""SQS -> submit: each S3 upload notification becomes (at most) one fal queue request.

Records of a batch are handled concurrently (fal's answer time dominates), and
failures are reported per record so only those messages come back.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import httpx
from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import AsyncBatchProcessor, EventType, async_process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.parameters import SecretsProvider
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config

from kontext_s3.completion import JobFinisher
from kontext_s3.fal_queue import FalQueueClient
from kontext_s3.jobs import JobStore
from kontext_s3.log import logger
from kontext_s3.notifications import JobEvents
from kontext_s3.output_store import OutputLayout
from kontext_s3.settings import Settings
from kontext_s3.submit import ChangeResult, Outcome, Submitter

settings = Settings.from_env()
metrics = Metrics()
_aws = Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=20)
s3 = boto3.client("s3", config=Config(signature_version="s3v4").merge(_aws))
jobs = JobStore(boto3.resource("dynamodb", config=_aws).Table(settings.jobs_table), ttl_days=settings.job_ttl_days)
events = JobEvents(boto3.client("events", config=_aws), bus_name=settings.event_bus_name, source=settings.event_source)
secrets = SecretsProvider(boto3_client=boto3.client("secretsmanager", config=_aws))
http = httpx.Client(limits=httpx.Limits(max_connections=20, max_keepalive_connections=10))
executor = ThreadPoolExecutor(max_workers=10, thread_name_prefix="submit")
# An all-failed batch is answered like any other (every id listed) instead of raising:
# SQS brings back the same messages either way, and each failure is already logged.
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


def fal_key() -> str:
    """The key from Secrets Manager, cached for ``FAL_KEY_CACHE_SECONDS``; plain text or ``{"FAL_KEY": ...}``."""
    value = str(secrets.get(settings.fal_key_secret, max_age=settings.fal_key_cache_seconds))
    if value.lstrip().startswith("{"):
        document = json.loads(value)
        value = document.get("FAL_KEY") or document.get("key") or ""
    return value.strip()


def _count_retry(reason: str) -> None:
    metrics.add_metric(name="FalRetries", unit=MetricUnit.Count, value=1)


submitter = Submitter(
    settings=settings,
    s3=s3,
    jobs=jobs,
    fal=FalQueueClient(
        http, base_url=settings.fal_queue_url, key=fal_key, timeout_seconds=settings.fal_timeout_seconds, on_retry=_count_retry
    ),
    finisher=JobFinisher(s3=s3, jobs=jobs, events=events, layout=OutputLayout(settings.input_prefix, settings.output_prefix)),
)

_METRIC_OF = {
    Outcome.SUBMITTED: "JobsSubmitted",
    Outcome.DUPLICATE: "DuplicatesSkipped",
    Outcome.FAILED: "JobsFailed",
    Outcome.UNCERTAIN: "JobsUncertain",
}


def _handle(record: SQSRecord, deadline: float) -> list[ChangeResult]:
    results = submitter.handle_message(
        record.body,
        receive_count=int(record.attributes.approximate_receive_count or 1),
        deadline=deadline,
    )
    for result in results:
        if result.outcome in _METRIC_OF:
            metrics.add_metric(name=_METRIC_OF[result.outcome], unit=MetricUnit.Count, value=1)
    return results


async def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> list[ChangeResult]:
    # Two seconds are kept back to report partial failures before Lambda's own timeout.
    deadline = time.monotonic() + lambda_context.get_remaining_time_in_millis() / 1000 - 2
    return await asyncio.get_running_loop().run_in_executor(executor, _handle, record, deadline)


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="MessagesReceived", unit=MetricUnit.Count, value=len(event.get("Records", [])))
    return dict(async_process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context))
