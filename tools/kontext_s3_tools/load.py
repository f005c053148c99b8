"""``python -m kontext_s3_tools.load``: push many uploads through the local stack and account for each.

For every upload it checks what a user is promised: exactly one request that fal
ran (so paid for once) and one complete output set (every image and the
manifest), or a recorded failure; and nothing lost, duplicated or dead-lettered.
The accounting reads the bucket with one paginated listing and the jobs table
with one paginated scan, whatever the number of uploads.

It also reports how fal was used: the emulator's concurrency limit, the peak
of requests running and of requests open (queued or running) at fal, how busy
fal's slots were while uploads waited, how long a freed slot stayed unused
before the next submit (webhook to next submit), how many requests fal could
not start in time (back in line), and the moto server's peak memory.

Results go to ``out/<name>.json`` (the functions' logs to ``out/<name>-logs/``); this is a measurement, nothing here
asserts a time. Ctrl-C stops the stack and keeps a partial report.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from kontext_s3 import table_keys
from kontext_s3.jobs import JobState
from kontext_s3.tag_codec import encode_tags, tagging_header
from kontext_s3_tools.emulator import Faults
from kontext_s3_tools.local_stack import ROOT, LocalStack

OUT = ROOT / "out"


def _image(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _peak_rss_mb(pid: int | None) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def percentiles(values: list[float], digits: int = 2) -> dict[str, float | int] | None:
    """Median and p95 (nearest rank) of some measurements, with how many there were."""
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    return {"p50": round(statistics.median(ordered), digits), "p95": round(p95, digits), "samples": len(ordered)}


def _progress(text: str) -> None:
    print(f"\r  {text:<100}", end="", flush=True)


def _jobs_ended(stack: LocalStack) -> int:
    table = stack.client("dynamodb")
    ended = 0
    for page in table.get_paginator("scan").paginate(
        TableName=stack.resources.table,
        ProjectionExpression="#s",
        ExpressionAttributeNames={"#s": "state"},
    ):
        ended += sum(
            1 for item in page.get("Items", []) if item.get("state", {}).get("S") in (JobState.COMPLETED.value, JobState.FAILED.value)
        )
    return ended


def _busy_ratio(timeline: list[tuple[float, int, int]], start: float, end: float, limit: int | None) -> float | None:
    """Mean IN_PROGRESS over [start, end] divided by fal's limit: how much of fal's capacity ran while uploads waited."""
    if not limit or end <= start or not timeline:
        return None
    area, previous_t, previous_running = 0.0, start, 0
    for t, running, _ in timeline:
        if t <= start:
            previous_running = running
            continue
        if t >= end:
            break
        area += (t - previous_t) * previous_running
        previous_t, previous_running = t, running
    area += (end - previous_t) * previous_running
    return round(area / ((end - start) * limit), 3)


def _handoff_gaps(stack: LocalStack, until: float) -> list[float]:
    """Seconds from each delivered webhook (a slot freed) to the next submit fal received, while uploads still waited."""
    submits = sorted(r["at"] for r in stack.emulator.submits())
    gaps = []
    for delivery in stack.emulator.deliveries:
        at = delivery.get("at", 0.0)
        if delivery.get("status_code") != 200 or at >= until:
            continue
        later = next((s for s in submits if s >= at), None)
        if later is not None:
            gaps.append(later - at)
    return gaps


def _account(stack: LocalStack, keys: list[str], num_images: int) -> dict[str, Any]:
    """Every upload's end, from one scan of the jobs table and one listing of the outputs."""
    table = stack.client("dynamodb")
    jobs: dict[str, dict[str, Any]] = {}
    for page in table.get_paginator("scan").paginate(TableName=stack.resources.table):
        for item in page["Items"]:
            if table_keys.is_job(item[table_keys.KEY]["S"]):
                jobs[item["key"]["S"]] = {name: next(iter(value.values())) for name, value in item.items()}
    outputs: Counter[str] = Counter()
    for page in (
        stack.client("s3").get_paginator("list_objects_v2").paginate(Bucket=stack.resources.bucket, Prefix=stack.resources.output_prefix)
    ):
        for item in page.get("Contents", []):
            prefix = item["Key"].rsplit("/", 1)[0] + "/"
            outputs[prefix] += 1
    accepted = stack.accepted_requests_per_job()
    report: dict[str, Any] = {"completed_once": 0, "failed": 0, "lost": 0, "duplicated": 0, "waiting": 0, "incomplete_output_sets": 0}
    failures: Counter[str] = Counter()
    latencies: list[float] = []
    for key in keys:
        job = jobs.get(key)
        state = job.get("state") if job else None
        if job and accepted[job["job_id"]] > 1:
            report["duplicated"] += 1
        if state == JobState.COMPLETED.value:
            if outputs[job["output_prefix"]] == num_images + 1 and accepted[job["job_id"]] == 1:  # type: ignore[index]
                report["completed_once"] += 1
                latencies.append((int(job["ended_at_ms"]) - int(job["arrived_at_ms"])) / 1000)  # type: ignore[index]
            else:
                report["incomplete_output_sets"] += 1
        elif state == JobState.FAILED.value:
            report["failed"] += 1
            failures[str(job.get("error_code"))] += 1  # type: ignore[union-attr]
        elif state == JobState.WAITING.value:
            report["waiting"] += 1
        else:
            report["lost"] += 1
    report["failure_codes"] = dict(failures)
    report["last_ended_at_ms"] = max((int(j["ended_at_ms"]) for j in jobs.values() if j.get("ended_at_ms")), default=None)
    report["upload_to_outputs_s"] = percentiles(latencies)
    attributes = stack.client("sqs").get_queue_attributes(QueueUrl=stack.resources.dlq_url, AttributeNames=["ApproximateNumberOfMessages"])
    report["dlq"] = int(attributes["Attributes"]["ApproximateNumberOfMessages"])
    return report


def run(
    uploads: int,
    *,
    fal_concurrency: int | None,
    processing_ms: int,
    max_jobs_at_fal: int,
    presign_seconds: int,
    submit_concurrency: int = 5,
    uploaders: int = 8,
    num_images: int = 1,
    faults: dict[str, int] | None = None,
    timeout: float = 1500.0,
) -> dict[str, Any]:
    parameters = {
        "MaxJobsAtFal": str(max_jobs_at_fal),
        "PresignExpirySeconds": str(presign_seconds),
        "SubmitMaxConcurrency": str(submit_concurrency),
        "WebhookReservedConcurrency": "20",
    }
    report: dict[str, Any] = {
        "uploads": uploads,
        "fal_limit": fal_concurrency,
        "max_jobs_at_fal_setting": max_jobs_at_fal,
        "settings": {"processing_ms": processing_ms, "presign_seconds": presign_seconds, "submit_concurrency": submit_concurrency},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    with LocalStack(parameters=parameters, max_receive_count=5, recovery_interval_seconds=60.0, fal_concurrency=fal_concurrency) as stack:
        stack.emulator.set_faults(processing_ms=processing_ms, **(faults or {}))
        s3 = stack.client("s3")
        tags = tagging_header(encode_tags({"prompt": "Load test: make it glow, please!", "num_images": num_images}))
        keys = [f"inputs/load/{i:05d}.jpg" for i in range(uploads)]
        images = [_image(i) for i in range(min(uploads, 64))]
        print(f"uploading {uploads} images with {uploaders} threads ...", flush=True)
        started = time.monotonic()
        started_wall = time.time()

        def one(index: int) -> None:
            s3.put_object(Bucket=stack.resources.bucket, Key=keys[index], Body=images[index % len(images)], Tagging=tags)

        try:
            with ThreadPoolExecutor(max_workers=uploaders) as pool:
                list(pool.map(one, range(uploads)))
            report["upload_s"] = round(time.monotonic() - started, 1)
            deadline = time.monotonic() + timeout
            ended = 0
            while time.monotonic() < deadline:
                requests = list(stack.emulator.requests.values())
                states = Counter(r.status for r in requests)
                ended = sum(1 for r in requests if r.status == "COMPLETED" and r.error is None)
                running, queued = stack.emulator.queue.counts()
                _progress(
                    f"{ended}/{uploads} edited at fal | at fal now: {running} running, {queued} queued | "
                    f"{len(requests)} requests | {time.monotonic() - started:.0f} s"
                )
                if ended >= uploads and states.get("IN_QUEUE", 0) == 0:
                    break
                time.sleep(2)
            # fal is done; the webhooks may not be (without admission they queue up behind fal): wait for the table.
            print()
            last, stalled_since = -1, time.monotonic()
            while time.monotonic() < deadline:
                done = _jobs_ended(stack)
                _progress(f"{done}/{uploads} jobs ended in the table | {time.monotonic() - started:.0f} s")
                if done >= uploads:
                    break
                if done != last:
                    last, stalled_since = done, time.monotonic()
                elif time.monotonic() - stalled_since > 120:
                    break  # nothing ends any more: count what there is
                time.sleep(5)
            print()
        except KeyboardInterrupt:
            print("\ninterrupted: accounting for what happened so far", file=sys.stderr)
            report["interrupted"] = True
        report["wall_s"] = round(time.monotonic() - started, 1)
        report.update(_account(stack, keys, num_images))
        last_ended = report.pop("last_ended_at_ms")
        # Throughput counts from the first upload to the last job's end, not to when this loop noticed.
        report["first_upload_to_last_end_s"] = round(last_ended / 1000 - started_wall, 1) if last_ended else None
        report["uploads_per_s"] = round(report["completed_once"] / report["first_upload_to_last_end_s"], 2) if last_ended else None
        snapshot = stack.emulator.queue.snapshot()
        report["max_in_progress_at_fal"] = snapshot["peak_in_progress"]
        report["max_open_at_fal"] = snapshot["peak_open"]
        submits = stack.emulator.submits()
        last_submit = max((s["at"] for s in submits), default=started_wall)
        report["fal_submits_received"] = len(submits)
        report["fal_requests"] = len(stack.emulator.requests)
        report["back_in_line_not_started_in_time"] = sum(1 for r in stack.emulator.requests.values() if r.error_type == "request_timeout")
        report["fal_busy_ratio"] = _busy_ratio(stack.emulator.queue.stats.timeline, started_wall, last_submit, fal_concurrency)
        report["webhook_to_next_submit_s"] = percentiles(_handoff_gaps(stack, last_submit), digits=3)
        report["moto_peak_rss_mb"] = _peak_rss_mb(stack.moto.pid())
        report["function_cold_starts"] = {name: f.cold_starts for name, f in stack.functions.items()}
        report["logs"] = str(stack.log_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kontext_s3_tools.load", description=__doc__)
    parser.add_argument("--name", default="load", help="the report is out/<name>.json")
    parser.add_argument("--uploads", type=int, default=500)
    parser.add_argument("--fal-concurrency", type=int, default=None, help="the emulator's concurrency limit (fal's account limit)")
    parser.add_argument("--processing-ms", type=int, default=0, help="how long fal's runner takes per request")
    parser.add_argument("--max-jobs-at-fal", type=int, default=4, help="the MaxJobsAtFal parameter (0: no admission)")
    parser.add_argument("--presign-seconds", type=int, default=3600, help="the PresignExpirySeconds parameter")
    parser.add_argument("--submit-concurrency", type=int, default=5, help="the SubmitMaxConcurrency parameter")
    parser.add_argument("--uploaders", type=int, default=8)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--fault", action="append", default=[], metavar="NAME=N", help="emulator faults, e.g. submit_429=100")
    parser.add_argument("--timeout", type=float, default=1500.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("KONTEXT_LOG_DIR", str(OUT / f"{args.name}-logs"))
    try:
        report = run(
            args.uploads,
            fal_concurrency=args.fal_concurrency,
            processing_ms=args.processing_ms,
            max_jobs_at_fal=args.max_jobs_at_fal,
            presign_seconds=args.presign_seconds,
            submit_concurrency=args.submit_concurrency,
            uploaders=args.uploaders,
            num_images=args.num_images,
            faults=Faults.parse(args.fault),
            timeout=args.timeout,
        )
    except KeyboardInterrupt:
        print("\ninterrupted before the stack was up", file=sys.stderr)
        return 130
    OUT.mkdir(parents=True, exist_ok=True)
    output = OUT / f"{args.name}.json"
    report["command"] = "python -m kontext_s3_tools.load " + " ".join(argv if argv is not None else sys.argv[1:])
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "settings")}, indent=2))
    ok = report["completed_once"] == args.uploads and report["lost"] == report["duplicated"] == report["dlq"] == report["failed"] == 0
    print(f"{'OK' if ok else 'NOT OK'}: {report['completed_once']}/{args.uploads} completed once; written to {output.relative_to(ROOT)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
