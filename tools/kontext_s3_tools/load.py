"""``python -m kontext_s3_tools.load``: push many uploads through the local stack and account for each.

For every upload it checks what a user is promised: exactly one request accepted
by fal (so paid for once) and one complete output set (every image and the
manifest), or a recorded failure. It reports lost and duplicated uploads,
throughput and upload-to-outputs latency, and writes the figures to JSON.
This is a measurement, not a test: nothing here asserts a time.
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
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from kontext_s3.jobs import JobState
from kontext_s3_tools.cli import Uploaded, upload_bytes
from kontext_s3_tools.emulator import Faults
from kontext_s3_tools.local_stack import LocalStack


def _image(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


def run(uploads: int, *, concurrency: int, uploaders: int, num_images: int, faults: dict[str, int], timeout: float) -> dict[str, Any]:
    stack = LocalStack(parameters={"SubmitMaxConcurrency": str(concurrency)}, max_receive_count=5, recovery_interval_seconds=None).start()
    try:
        stack.emulator.set_faults(**faults)
        target = stack.target()
        images = [_image(i) for i in range(uploads)]
        print(f"uploading {uploads} images with {uploaders} threads ...", flush=True)
        started = time.monotonic()

        def one(index: int) -> Uploaded:
            fields = {"prompt": f"Load test #{index}: make it glow, please!", "num_images": num_images, "seed": index}
            return upload_bytes(target, images[index], f"{index}.jpg", fields, key=f"inputs/load/{index:04d}.jpg")

        with ThreadPoolExecutor(max_workers=uploaders) as pool:
            uploaded = list(pool.map(one, range(uploads)))
        upload_seconds = time.monotonic() - started
        print(f"uploaded in {upload_seconds:.1f} s; waiting for every job to end ...", flush=True)

        store = stack.jobs()
        pending = {u.job_id: u for u in uploaded}
        ended: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        last_report = 0.0
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                job = store.get(job_id)
                if job is not None and job.state.ended:
                    ended[job_id] = job
                    del pending[job_id]
            if time.monotonic() - last_report > 5:
                print(f"  {len(ended)}/{uploads} ended after {time.monotonic() - started:.0f} s", flush=True)
                last_report = time.monotonic()
            if pending:
                time.sleep(0.5)
        wall = time.monotonic() - started

        accepted = stack.accepted_requests_per_job()
        s3 = stack.client("s3")
        complete, incomplete, failed, duplicated = 0, [], [], []
        latencies = []
        for item in uploaded:
            job = ended.get(item.job_id)
            if accepted[item.job_id] > 1:
                duplicated.append(item.key)
            if job is None:
                continue
            if job.state is JobState.FAILED:
                failed.append({"key": item.key, "error": job.error_message})
                continue
            listing = s3.list_object_versions(Bucket=target.bucket, Prefix=item.output_prefix)
            versions = Counter(v["Key"] for v in listing.get("Versions", []))
            expected = {f"{item.output_prefix}image-{i}.jpg" for i in range(num_images)} | {f"{item.output_prefix}manifest.json"}
            if set(versions) == expected and accepted[item.job_id] == 1:
                complete += 1
            else:
                incomplete.append(item.key)
            if job.event_time and job.ended_at_ms:
                uploaded_at = datetime.fromisoformat(job.event_time.replace("Z", "+00:00")).timestamp() * 1000
                latencies.append((job.ended_at_ms - uploaded_at) / 1000)
        lost = [u.key for u in uploaded if u.job_id not in ended]
        latencies.sort()
        report = {
            "uploads": uploads,
            "completed_with_one_output_set": complete,
            "failed_recorded": len(failed),
            "lost": len(lost),
            "duplicated_fal_requests": len(duplicated),
            "incomplete_output_sets": len(incomplete),
            "fal_requests_accepted": sum(accepted.values()),
            "fal_submits_received": len(stack.emulator.submits()),
            "wall_seconds": round(wall, 1),
            "throughput_uploads_per_second": round(uploads / wall, 2) if wall else None,
            "latency_seconds": {
                "p50": round(statistics.median(latencies), 2) if latencies else None,
                "p95": round(latencies[int(len(latencies) * 0.95) - 1], 2) if latencies else None,
                "max": round(latencies[-1], 2) if latencies else None,
            },
            "settings": {"submit_concurrency": concurrency, "uploaders": uploaders, "num_images": num_images, "faults": faults},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "examples": {"lost": lost[:5], "duplicated": duplicated[:5], "incomplete": incomplete[:5], "failed": failed[:5]},
            "submit_handler_errors": stack.poller.errors[:5],
        }
        return report
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kontext_s3_tools.load", description=__doc__)
    parser.add_argument("--uploads", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4, help="local submit pollers (Lambda's SQS concurrency)")
    parser.add_argument("--uploaders", type=int, default=8)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument(
        "--fault", action="append", default=[], metavar="NAME=N", help="emulator faults during the run, e.g. submit_429=100"
    )
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args(argv)
    report = run(
        args.uploads,
        concurrency=args.concurrency,
        uploaders=args.uploaders,
        num_images=args.num_images,
        faults=Faults.parse(args.fault),
        timeout=args.timeout,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    ok = report["lost"] == 0 and report["duplicated_fal_requests"] == 0 and report["incomplete_output_sets"] == 0
    print(f"{'OK' if ok else 'NOT OK'}: {report['lost']} lost, {report['duplicated_fal_requests']} duplicated, written to {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
