"""Scheduled: finish jobs whose webhook was lost, expire jobs that can no longer finish."""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from kontext_s3 import wiring
from kontext_s3.log import logger
from kontext_s3.recovery import Recovery
from kontext_s3.settings import Settings

settings = Settings.from_env()
metrics = Metrics()
if settings.stack_name:
    metrics.set_default_dimensions(stack=settings.stack_name)
s3 = wiring.s3_client()
jobs = wiring.job_store(settings)
http = wiring.media_http_client()
finisher = wiring.job_finisher(settings, s3, jobs, http)
recovery = Recovery(
    jobs=jobs,
    fal=wiring.fal_client(settings, http),
    finisher=finisher,
    recovery_after_seconds=settings.recovery_after_seconds,
    job_max_age_seconds=settings.job_max_age_seconds,
    admission=finisher.admission,
    slot_freed=finisher.slot_freed,
)


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - 5
    report = recovery.run(deadline=deadline)
    metrics.add_metric(name="RecoveryChecked", unit=MetricUnit.Count, value=report.checked)
    metrics.add_metric(name="JobsRecovered", unit=MetricUnit.Count, value=report.completed)
    metrics.add_metric(name="JobsExpired", unit=MetricUnit.Count, value=report.failed)
    metrics.add_metric(name="JobsStuckUncertain", unit=MetricUnit.Count, value=report.stuck_uncertain)
    metrics.add_metric(name="JobsWaiting", unit=MetricUnit.Count, value=report.waiting)
    metrics.add_metric(name="SlotsReclaimed", unit=MetricUnit.Count, value=report.slots_reclaimed)
    if settings.daily_image_budget:
        metrics.add_metric(name="ImagesUsedToday", unit=MetricUnit.Count, value=report.images_used_today)
    summary = {
        "checked": report.checked,
        "completed": report.completed,
        "failed": report.failed,
        "uncertain": report.uncertain,
        "notified": report.notified,
        "still_running": report.still_running,
        "stuck_uncertain": report.stuck_uncertain,
        "back_in_line": report.back_in_line,
        "slots_reclaimed": report.slots_reclaimed,
        "waiting": report.waiting,
        "images_used_today": report.images_used_today,
    }
    logger.info("recovery run", extra={**summary, "errors": len(report.errors)})
    return {**summary, "errors": report.errors[:20]}
