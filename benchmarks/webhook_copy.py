"""One webhook copy, measured in a process of its own (the emulator holding the file is elsewhere).

Usage: ``python -m benchmarks.webhook_copy ENDPOINT BUCKET TABLE URL ALLOWED_PREFIX SIZE``.
Prints one JSON line: the copy through ``JobFinisher.succeed`` (download stream,
S3 upload, manifest, job update) against ``put_object`` of the same bytes held in
memory, each timed without tracing and then measured under ``tracemalloc``, plus the
process's peak resident size during one copy (Linux VmHWM, reset just before).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import httpx

from kontext_s3.completion import JobFinisher, MediaPolicy
from kontext_s3.jobs import JobStore, new_holder
from kontext_s3.notifications import JobEvents
from kontext_s3.output_store import OutputLayout


def reset_peak_rss() -> None:
    """Reset Linux's high-water mark: ru_maxrss would include the parent's memory from before exec."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(action: Callable[[], Any], traced_action: Callable[[], Any] | None = None) -> tuple[float, float]:
    """(milliseconds untraced, peak traced MB of a second run, of ``traced_action`` if given)."""
    started = time.perf_counter()
    action()
    elapsed = (time.perf_counter() - started) * 1000
    tracemalloc.start()
    (traced_action or action)()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak / 1024 / 1024


def main() -> None:
    endpoint, bucket, table, url, allowed, size = sys.argv[1:7]
    session = boto3.session.Session(region_name="us-east-1")
    s3 = session.client("s3", endpoint_url=endpoint)
    jobs = JobStore(session.resource("dynamodb", endpoint_url=endpoint).Table(table))
    finisher = JobFinisher(
        s3=s3,
        jobs=jobs,
        events=JobEvents(None, bus_name="", source="bench"),
        layout=OutputLayout("inputs/", "outputs/"),
        http=httpx.Client(timeout=60),
        media=MediaPolicy(allowed_urls=(allowed,), max_image_bytes=10**9),
    )
    payload = {
        "images": [{"url": url, "content_type": "image/jpeg", "width": 1, "height": 1}],
        "timings": {},
        "seed": 1,
        "has_nsfw_concepts": [False],
        "prompt": "bench",
    }

    def copy() -> None:
        job_id = uuid.uuid4().hex
        holder = new_holder()
        created = jobs.create(
            job_id=job_id,
            bucket=bucket,
            key="inputs/bench.jpg",
            version_id=job_id,
            etag=None,
            sequencer=None,
            event_time=None,
            output_prefix=f"outputs/bench/{job_id}/",
            holder=holder,
            hold_ms=60_000,
        )
        assert created is not None
        jobs.begin_send(job_id, holder, input_json="{}")
        jobs.mark_submitted(job_id, holder, request_id=job_id, gateway_request_id=None, status_url="s", response_url="r", cancel_url="c")
        claim = jobs.claim(job_id, new_holder(), hold_ms=60_000)
        assert claim is not None
        assert finisher.succeed(claim, payload, deadline=time.monotonic() + 60) is not None

    copy()  # warm imports and connections, so the peak below is the copy's own
    reset_peak_rss()
    copy()
    peak_rss = peak_rss_mb()
    copy_ms, copy_peak = measure(copy)

    data = os.urandom(int(size))
    raw_ms, raw_peak = measure(
        lambda: s3.put_object(Bucket=bucket, Key="outputs/bench/raw.jpg", Body=data),
        # A raw upload has to hold the image: its bytes are made inside the traced run.
        lambda: s3.put_object(Bucket=bucket, Key="outputs/bench/raw.jpg", Body=os.urandom(int(size))),
    )
    print(
        json.dumps(
            {
                "bytes": int(size),
                "copy_ms": round(copy_ms),
                "raw_put_ms": round(raw_ms),
                "copy_peak_traced_mb": round(copy_peak, 1),
                "raw_put_peak_traced_mb": round(raw_peak, 1),
                "process_peak_rss_during_copy_mb": round(peak_rss, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
