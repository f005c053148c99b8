"""Function URL -> fal's webhook: verify, copy outputs to S3, end the job."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.event_handler import LambdaFunctionUrlResolver, Response
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from kontext_s3 import wiring
from kontext_s3.fal_account import FalAccount
from kontext_s3.jobs import Job, JobState
from kontext_s3.log import logger
from kontext_s3.settings import Settings
from kontext_s3.webhook import WebhookReceiver, deadline_from
from kontext_s3.webhook_signature import JwksCache

settings = Settings.from_env()
metrics = Metrics()
if settings.stack_name:
    metrics.set_default_dimensions(stack=settings.stack_name)
s3 = wiring.s3_client()
jobs = wiring.job_store(settings)
http = wiring.media_http_client()
receiver = WebhookReceiver(
    jobs=jobs,
    finisher=wiring.job_finisher(settings, s3, jobs, http),
    # Module scope: the keys stay cached across invocations of a warm function.
    jwks=JwksCache(http, settings.fal_jwks_url, ttl_seconds=settings.jwks_cache_seconds),
    account=FalAccount(jobs.table, configured_user_id=settings.fal_user_id),
    max_body_bytes=settings.webhook_max_body_bytes,
    tolerance_seconds=settings.signature_tolerance_seconds,
)
app = LambdaFunctionUrlResolver()


@app.post("/fal/<job_id>")
def fal_webhook(job_id: str) -> Response[str]:
    event = app.current_event
    body = event.body or ""
    raw = base64.b64decode(body) if event.is_base64_encoded else body.encode("utf-8")
    metrics.add_metric(name="WebhooksReceived", unit=MetricUnit.Count, value=1)
    # Answer before Lambda's timeout, with time for fal to hear a 5xx and retry.
    deadline = deadline_from(app.lambda_context.get_remaining_time_in_millis())
    answer = receiver.handle(job_id, dict(event.headers), raw, deadline=deadline)
    if answer.status in (400, 401, 403, 404, 409, 413):
        metrics.add_metric(name="WebhooksRefused", unit=MetricUnit.Count, value=1)
    if answer.status == 401:  # fal's signature did not verify: someone else is calling the public URL
        metrics.add_metric(name="WebhookSignatureRefused", unit=MetricUnit.Count, value=1)
    if answer.ended is not None:
        _count_ended(answer.ended)
    return Response(status_code=answer.status, content_type="application/json", body=json.dumps(answer.body))


def _count_ended(job: Job) -> None:
    if job.state is JobState.COMPLETED:
        metrics.add_metric(name="JobsSucceeded", unit=MetricUnit.Count, value=1)
        metrics.add_metric(name="ImagesWritten", unit=MetricUnit.Count, value=len(job.output_keys))
    else:
        metrics.add_metric(name="JobsFailed", unit=MetricUnit.Count, value=1)
    if job.event_time:
        uploaded = datetime.fromisoformat(job.event_time.replace("Z", "+00:00"))
        latency_ms = (datetime.now(UTC) - uploaded).total_seconds() * 1000
        metrics.add_metric(name="EndToEndLatency", unit=MetricUnit.Milliseconds, value=round(latency_ms, 1))


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
