"""SQS -> submit: each S3 upload notification becomes (at most) one fal queue request.

Records of a batch are handled concurrently (fal's answer time dominates), and
failures are reported per record so only those messages come back. Metrics are
added on the invocation's own thread, from each record's result: Powertools'
metric store is not thread-safe.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import AsyncBatchProcessor, EventType, async_process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from kontext_s3 import wiring
from kontext_s3.cancellation import Cancellation
from kontext_s3.log import logger
from kontext_s3.settings import Settings
from kontext_s3.submit import ChangeResult, Outcome, Submitter

settings = Settings.from_env()
metrics = Metrics()
if settings.stack_name:
    metrics.set_default_dimensions(stack=settings.stack_name)
s3 = wiring.s3_client()
jobs = wiring.job_store(settings)
http = httpx.Client(limits=httpx.Limits(max_connections=20, max_keepalive_connections=10))
executor = ThreadPoolExecutor(max_workers=10, thread_name_prefix="submit")
# An all-failed batch is answered like any other (every id listed) instead of raising:
# SQS brings back the same messages either way, and each failure is already logged.
processor = AsyncBatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
fal = wiring.fal_client(settings, http)
finisher = wiring.job_finisher(settings, s3, jobs)
submitter = Submitter(
    settings=settings,
    s3=s3,
    jobs=jobs,
    fal=fal,
    finisher=finisher,
    cancellation=Cancellation(s3=s3, jobs=jobs, fal=fal, finisher=finisher),
    admission=finisher.admission,
    send_later=wiring.send_later(settings) if settings.uploads_queue_url else None,
    failures=wiring.delivery_failures(settings, jobs),
)

_METRIC_OF = {
    Outcome.SUBMITTED: "JobsSubmitted",
    Outcome.DUPLICATE: "DuplicatesSkipped",
    Outcome.FAILED: "JobsFailed",
    Outcome.UNCERTAIN: "JobsUncertain",
    Outcome.CANCELLED: "JobsCancelled",
    Outcome.WAITING: "JobsWaiting",
}


def _handle(record: SQSRecord, deadline: float) -> list[ChangeResult]:
    return submitter.handle_message(
        record.body,
        message_id=record.message_id,
        receive_count=int(record.attributes.get("ApproximateReceiveCount") or 1),
        deadline=deadline,
    )


async def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> list[ChangeResult]:
    # Two seconds are kept back to report partial failures before Lambda's own timeout.
    deadline = time.monotonic() + lambda_context.get_remaining_time_in_millis() / 1000 - 2
    results = await asyncio.get_running_loop().run_in_executor(executor, _handle, record, deadline)
    for result in results:  # back on the invocation's thread
        if result.outcome in _METRIC_OF:
            metrics.add_metric(name=_METRIC_OF[result.outcome], unit=MetricUnit.Count, value=1)
        if result.fal_attempts > 1:
            metrics.add_metric(name="FalRetries", unit=MetricUnit.Count, value=result.fal_attempts - 1)
    return results


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="MessagesReceived", unit=MetricUnit.Count, value=len(event.get("Records", [])))
    return dict(async_process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context))
