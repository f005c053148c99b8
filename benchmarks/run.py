"""``make bench`` (``python -m benchmarks.run``): what the functions cost, measured on this machine.

1. Cold import of each handler against a bare ``import boto3``, in the same run,
   with the ``.pyc`` files warm and with none (as a fresh ``sam build`` ships);
   plus what a Powertools ``Tracer()`` would add.
2. Warm cost per message of the submit handler (moto and the emulator on loopback).
3. Wall time of one 10-message batch when fal takes L ms to answer a submit.
4. The webhook's copy of a 1, 5 and 20 MB image against a raw boto3 upload of
   the same bytes: time and peak memory, in a child process of its own.
5. End-to-end throughput on the local stack.

Figures go to ``benchmarks/results/latest.json`` and a Markdown table is
printed for the README. These are measurements; no test asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from kontext_s3_tools.cli import upload_bytes
from kontext_s3_tools.load import _image
from kontext_s3_tools.load import run as load_run
from kontext_s3_tools.local_stack import ROOT, LambdaContext, LocalStack, sqs_event

RESULTS = ROOT / "benchmarks" / "results"
IMPORT_ENV = {
    "JOBS_TABLE": "jobs",
    "WEBHOOK_URL": "https://example.lambda-url.us-east-1.on.aws",
    "FAL_KEY_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123456789012:secret:fal",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "x",
    "AWS_SECRET_ACCESS_KEY": "x",
    "POWERTOOLS_METRICS_DISABLED": "true",
}
IMPORT_SNIPPETS = {
    "import boto3 (baseline)": "import boto3",
    "submit handler": f"import runpy; runpy.run_path({str(ROOT / 'functions/submit/app.py')!r})",
    "webhook handler": f"import runpy; runpy.run_path({str(ROOT / 'functions/webhook/app.py')!r})",
    "recover handler": f"import runpy; runpy.run_path({str(ROOT / 'functions/recover/app.py')!r})",
    "Powertools Tracer() (not used)": "from aws_lambda_powertools import Tracer; Tracer(disabled=True)",
}


def _timed_import(snippet: str, *, compiled: bool) -> float:
    code = f"import time; t = time.perf_counter(); {snippet}; print(time.perf_counter() - t)"
    env = {**os.environ, **IMPORT_ENV}
    args = [sys.executable, "-c", code]
    if not compiled:
        # An empty pycache prefix and -B: every module is compiled from source, as on a cold Lambda.
        env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="nopyc-")
        args.insert(1, "-B")
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def cold_imports(repeats: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for name, snippet in IMPORT_SNIPPETS.items():
        _timed_import(snippet, compiled=True)  # writes the .pyc files the warm runs read
        warm = [_timed_import(snippet, compiled=True) for _ in range(repeats)]
        cold = [_timed_import(snippet, compiled=False) for _ in range(max(2, repeats // 2))]
        results[name] = {"pyc_ms": round(statistics.median(warm) * 1000, 1), "no_pyc_ms": round(statistics.median(cold) * 1000, 1)}
        print(f"  import {name}: {results[name]}", flush=True)
    return results


def _upload_events(stack: LocalStack, count: int, prefix: str) -> list[dict[str, Any]]:
    target = stack.target()
    for i in range(count):
        upload_bytes(target, _image(i), f"{i}.jpg", {"prompt": f"bench {i}"}, key=f"inputs/{prefix}/{i}.jpg")
    sqs = stack.client("sqs")
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(messages) < count and time.monotonic() < deadline:
        got = sqs.receive_message(
            QueueUrl=stack.resources.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageSystemAttributeNames=["All"]
        )
        for message in got.get("Messages", []):
            if "s3:TestEvent" not in message["Body"]:
                messages.append(message)
            sqs.delete_message(QueueUrl=stack.resources.queue_url, ReceiptHandle=message["ReceiptHandle"])
    assert len(messages) == count, f"got {len(messages)} of {count} S3 events"
    return messages


def submit_costs(stack: LocalStack, *, singles: int, latencies: list[int]) -> dict[str, Any]:
    stack.poller.stop()  # the benchmark invokes the handler itself
    function = stack.functions[stack.function_id("submit")]

    def handler(event: dict[str, Any], context: Any) -> Any:
        return function.invoke(event)

    queue_arn = stack.resources.queue_arn
    messages = _upload_events(stack, singles + 3, "single")
    per_message = []
    for index, message in enumerate(messages):
        started = time.perf_counter()
        handler(sqs_event([message], queue_arn), LambdaContext("submit", 60))
        if index >= 3:  # the first ones warm connections and caches
            per_message.append((time.perf_counter() - started) * 1000)
    batch = _upload_events(stack, 10, "batch-warm")
    started = time.perf_counter()
    handler(sqs_event(batch, queue_arn), LambdaContext("submit", 60))
    batch_ms = (time.perf_counter() - started) * 1000
    by_latency = {}
    for latency in latencies:
        stack.emulator.set_faults(submit_delay_ms=latency)
        messages = _upload_events(stack, 10, f"batch-{latency}")
        started = time.perf_counter()
        response = handler(sqs_event(messages, queue_arn), LambdaContext("submit", 60))
        wall = (time.perf_counter() - started) * 1000
        assert response == {"batchItemFailures": []}, response
        by_latency[str(latency)] = {"wall_ms": round(wall), "one_answer_ms": latency, "ten_answers_in_a_row_ms": 10 * latency}
        print(f"  10-message batch, fal answering in {latency} ms: {wall:.0f} ms", flush=True)
    stack.emulator.set_faults(submit_delay_ms=0)
    return {
        "warm_single_message_ms": {
            "median": round(statistics.median(per_message), 1),
            "p95": round(sorted(per_message)[int(len(per_message) * 0.95) - 1], 1),
            "samples": len(per_message),
        },
        "warm_10_message_batch_ms": round(batch_ms, 1),
        "warm_per_message_in_a_batch_ms": round(batch_ms / 10, 1),
        "batch_of_10_by_fal_latency": by_latency,
    }


def webhook_copies(stack: LocalStack, sizes_mb: list[int]) -> dict[str, Any]:
    results = {}
    for size in sizes_mb:
        data = b"\xff\xd8\xff" + os.urandom(size * 1024 * 1024 - 3)
        url = stack.emulator.host_file(f"bench/{size}mb.jpg", data, "image/jpeg")
        args = [
            sys.executable,
            "-m",
            "benchmarks.webhook_copy",
            stack.moto.url,
            stack.resources.bucket,
            stack.resources.table,
            url,
            stack.emulator.files_url,
            str(len(data)),
        ]
        out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT, env={**os.environ, **stack.cli_environment()})
        results[f"{size}MB"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  webhook copy {size} MB: {results[f'{size}MB']}", flush=True)
    return results


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"Measured {report['measured_at']} on {machine['cpus']} CPUs, Python {machine['python']}, with `{report['command']}`.",
        "",
        "| Cold import (median) | with .pyc | without .pyc |",
        "| --- | ---: | ---: |",
    ]
    for name, value in report["cold_import_ms"].items():
        lines.append(f"| {name} | {value['pyc_ms']} ms | {value['no_pyc_ms']} ms |")
    submit = report["submit"]
    single = submit["warm_single_message_ms"]
    lines += [
        "",
        "| Submit handler (warm) | |",
        "| --- | ---: |",
        f"| one message per invocation, median (p95) | {single['median']} ms ({single['p95']} ms) |",
        f"| per message in a 10-message batch | {submit['warm_per_message_in_a_batch_ms']} ms |",
    ]
    for latency, value in submit["batch_of_10_by_fal_latency"].items():
        in_a_row = value["ten_answers_in_a_row_ms"]
        lines.append(f"| 10-message batch, fal answering in {latency} ms (10 in a row: {in_a_row} ms) | {value['wall_ms']} ms |")
    lines += [
        "",
        "| Webhook copy | copy time | raw put_object | copy peak (traced) | raw put peak (traced) | process peak RSS during the copy |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, v in report["webhook_copy"].items():
        times = f"{v['copy_ms']} ms | {v['raw_put_ms']} ms"
        peaks = f"{v['copy_peak_traced_mb']} MB | {v['raw_put_peak_traced_mb']} MB | {v['process_peak_rss_during_copy_mb']} MB"
        lines.append(f"| {size} | {times} | {peaks} |")
    load = report["end_to_end"]
    lines += [
        "",
        f"End to end on the local stack: {load['uploads']} uploads in {load['wall_seconds']} s "
        f"({load['throughput_uploads_per_second']} uploads/s), {load['lost']} lost, "
        f"{load['duplicated_fal_requests']} duplicated; upload-to-outputs latency "
        f"p50 {load['latency_seconds']['p50']} s, p95 {load['latency_seconds']['p95']} s.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--singles", type=int, default=30)
    parser.add_argument("--latencies", default="200,500")
    parser.add_argument("--sizes", default="1,5,20")
    parser.add_argument("--uploads", type=int, default=100, help="uploads for the end-to-end throughput figure")
    parser.add_argument("--table-only", action="store_true", help="print the table of the last results without measuring")
    args = parser.parse_args(argv)
    if args.table_only:
        print(markdown(json.loads((RESULTS / "latest.json").read_text(encoding="utf-8"))))
        return 0
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")
    report: dict[str, Any] = {
        "command": "make bench",
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    print("cold imports ...", flush=True)
    report["cold_import_ms"] = cold_imports(args.repeats)
    print("submit handler ...", flush=True)
    with LocalStack(recovery_interval_seconds=None) as stack:
        report["submit"] = submit_costs(stack, singles=args.singles, latencies=[int(x) for x in args.latencies.split(",")])
    print("webhook copies ...", flush=True)
    with LocalStack(recovery_interval_seconds=None) as stack:
        report["webhook_copy"] = webhook_copies(stack, [int(x) for x in args.sizes.split(",")])
    print("end to end ...", flush=True)
    report["end_to_end"] = {
        k: v
        for k, v in load_run(args.uploads, concurrency=4, uploaders=8, num_images=1, faults={}, timeout=600).items()
        if k not in ("examples", "machine")
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    (RESULTS / "latest.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
