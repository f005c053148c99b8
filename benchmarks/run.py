"""``make bench`` (``python -m benchmarks.run``): what the functions cost, measured on this machine.

1. Cold start as deployed (``benchmarks.coldstart``): each handler on python3.13
   from the built artifact, read-only, with and without bytecode: its import
   against a bare ``import boto3``, and init plus its first real-shaped event
   against a minimal function that imports boto3 and makes one S3 call.
2. Warm cost per message of the submit function (running as deployed, on the
   local stack).
3. Wall time of one 10-message batch when fal takes L ms to answer a submit.
4. The webhook's copy of a 1, 5 and 20 MB image against a raw boto3 upload of
   the same bytes: time and peak memory, in a child process of its own.
5. End-to-end throughput on the local stack.
6. The submit function's peak memory on one batch of ten 25 MP sideways photos (``benchmarks.batch_memory``).
7. AWS requests per edited upload, by function and IAM action (``benchmarks.requests_per_upload``).

Results go to ``out/bench/latest.json`` and ``latest.md``; the tables in docs/development.md
change only with ``SAVE=1`` (``make bench SAVE=1``). These are measurements;
no test asserts a time. Ctrl-C stops cleanly, keeping what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from benchmarks import batch_memory, coldstart, requests_per_upload
from benchmarks.readme import replace_section
from kontext_s3.admission import is_dispatch
from kontext_s3_tools.cli import upload_bytes
from kontext_s3_tools.load import _image
from kontext_s3_tools.load import run as load_run
from kontext_s3_tools.local_stack import ROOT, LambdaContext, LocalStack, sqs_event

OUT = ROOT / "out" / "bench"


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
            # Only the uploads' own events: with admission the webhook also puts "a slot is free" signals on this
            # queue, and moto follows each PutObject with an ObjectTagging:Put (a duplicate the submit skips).
            if '"ObjectCreated:' in message["Body"] and not is_dispatch(message["Body"]):
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


SUBMIT_SETTINGS = {
    "no admission (MaxJobsAtFal 0)": {"MaxJobsAtFal": "0", "DailyImageBudget": "0"},
    "admission (MaxJobsAtFal 100, DailyImageBudget 1000000)": {"MaxJobsAtFal": "100", "DailyImageBudget": "1000000"},
}


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"Measured {report['measured_at']} on {machine['cpus']} CPUs ({machine['platform']}), with `{report['command']}`.",
        "",
    ]
    if "coldstart" in report:
        cold = report["coldstart"]
        lines += [
            "Cold start on python3.13 from the built artifact"
            + (", mounted read-only" if cold["read_only_mount"] else "")
            + f", median of {cold['repeats']} fresh processes each:",
            "",
            coldstart.markdown(cold),
            "",
        ]
    if "submit" in report:
        runs = report["submit"]
        labels = list(runs)
        lines += [
            "| Submit function (warm, as deployed) | " + " | ".join(labels) + " |",
            "| --- |" + " ---: |" * len(labels),
            "| one message per invocation, median (p95) | "
            + " | ".join(f"{r['warm_single_message_ms']['median']} ms ({r['warm_single_message_ms']['p95']} ms)" for r in runs.values())
            + " |",
            "| per message in a 10-message batch | "
            + " | ".join(f"{r['warm_per_message_in_a_batch_ms']} ms" for r in runs.values())
            + " |",
        ]
        for latency in runs[labels[0]]["batch_of_10_by_fal_latency"]:
            walls = " | ".join(f"{r['batch_of_10_by_fal_latency'][latency]['wall_ms']} ms" for r in runs.values())
            lines.append(f"| 10-message batch, fal answering in {latency} ms | {walls} |")
        lines.append("")
    if "webhook_copy" in report:
        lines += [
            "| Webhook copy | copy time | raw put_object | copy peak (traced) | raw put peak (traced) | process peak RSS during the copy |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for size, v in report["webhook_copy"].items():
            times = f"{v['copy_ms']} ms | {v['raw_put_ms']} ms"
            peaks = f"{v['copy_peak_traced_mb']} MB | {v['raw_put_peak_traced_mb']} MB | {v['process_peak_rss_during_copy_mb']} MB"
            lines.append(f"| {size} | {times} | {peaks} |")
        lines.append("")
    if "end_to_end" in report:
        load = report["end_to_end"]
        latency = load["upload_to_outputs_s"] or {"p50": "-", "p95": "-"}
        lines.append(
            f"End to end on the local stack (fal answering at once, no limit, no admission): {load['completed_once']} of "
            f"{load['uploads']} uploads completed once in {load['first_upload_to_last_end_s']} s "
            f"({load['uploads_per_s']} uploads/s), {load['lost']} lost, {load['duplicated']} duplicated; "
            f"upload-to-outputs p50 {latency['p50']} s, p95 {latency['p95']} s."
        )
    if "memory" in report:
        memory = report["memory"]
        lines += [
            "",
            f"Submit function, one batch of {memory['photos']} sideways {memory['megapixels']} MP photos ({memory['upload_mb']} MB "
            f"uploaded), each decoded, turned and written: peak RSS **{memory['peak_rss_mb']} MB** of its "
            f"{memory['memory_size_mb']} MB, {memory['prepared']} prepared, {memory['seconds']} s.",
        ]
    for section in ("requests", "requests_at_once"):
        if section in report:
            lines += ["", requests_per_upload.markdown(report[section])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--singles", type=int, default=30)
    parser.add_argument("--latencies", default="200,500")
    parser.add_argument("--sizes", default="1,5,20")
    parser.add_argument("--uploads", type=int, default=100, help="uploads for the end-to-end throughput figure")
    parser.add_argument("--only", default="coldstart,submit,webhook,end_to_end,memory,requests", help="which sections to measure")
    parser.add_argument(
        "--save", action="store_true", default=os.environ.get("SAVE") == "1", help="write the tables into docs/development.md"
    )
    args = parser.parse_args(argv)
    sections = set(args.only.split(","))
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "ERROR")
    report: dict[str, Any] = {
        "command": "make bench",
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        if "coldstart" in sections:
            print("cold start, as deployed ...", flush=True)
            report["coldstart"] = coldstart.run(args.repeats)
        if "submit" in sections:
            print("submit function, warm ...", flush=True)
            # Without admission, and with it (slots and budget always to spare, so every message is sent):
            # what admission's bookkeeping adds to a submit.
            report["submit"] = {}
            for label, parameters in SUBMIT_SETTINGS.items():
                with LocalStack(recovery_interval_seconds=None, parameters=parameters) as stack:
                    latencies = [int(x) for x in args.latencies.split(",")]
                    report["submit"][label] = submit_costs(stack, singles=args.singles, latencies=latencies)
        if "webhook" in sections:
            print("webhook copies ...", flush=True)
            with LocalStack(recovery_interval_seconds=None) as stack:
                report["webhook_copy"] = webhook_copies(stack, [int(x) for x in args.sizes.split(",")])
        if "end_to_end" in sections:
            print("end to end ...", flush=True)
            # fal with room for every request at once and no admission: what the pipeline itself sustains.
            measured = load_run(args.uploads, fal_concurrency=None, processing_ms=0, max_jobs_at_fal=0, presign_seconds=3600, timeout=600)
            report["end_to_end"] = {k: v for k, v in measured.items() if k not in ("machine", "logs")}
        if "memory" in sections:
            print("submit memory, one batch of ten 25 MP sideways photos ...", flush=True)
            with batch_memory.stack_for_one_batch() as stack:
                report["memory"] = batch_memory.peak_of_one_batch(stack, count=10, width=6124, height=4082, prefix="bench-memory")
        if "requests" in sections:
            print("AWS requests per upload ...", flush=True)
            report["requests"] = requests_per_upload.measure(20)
            report["requests_at_once"] = requests_per_upload.measure(20, at_once=True)
    except KeyboardInterrupt:
        print("\ninterrupted: what was measured so far is kept", file=sys.stderr)
        _write(report)
        return 130
    table = _write(report)
    print(table)
    if args.save:
        replace_section(ROOT / "docs" / "development.md", "bench", table)
        print("docs/development.md updated (SAVE=1)")
    return 0


def _write(report: dict[str, Any]) -> str:
    (OUT / "latest.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = markdown(report)
    (OUT / "latest.md").write_text(table + "\n", encoding="utf-8")
    print(f"results in {OUT.relative_to(ROOT)}/latest.json and latest.md")
    return table


if __name__ == "__main__":
    raise SystemExit(main())
