"""Cold start as deployed: each handler on python3.13, from the built artifact, on a read-only mount.

Two figures per handler, each against a baseline measured in the same run and
in the same way, and each with the build's bytecode and without it (a copy of
the build with every ``__pycache__`` removed, as a build without a compile
step ships):

* (a) module import: ``import app``, against a bare ``import boto3`` from the
  same layer;
* (b) init plus the first real-shaped event against the local endpoints (the
  moto server behind the AWS gateway, the fal emulator), with the function
  role's credentials and the template's environment, against a minimal
  function that imports boto3 and makes one S3 call (a HEAD of an upload) to
  the same endpoint with the same credentials.

Every sample is a fresh process (``-s``, bytecode writing off, the build
mounted read-only when this machine allows it). Medians of ``--repeats``.
"""

from __future__ import annotations

import io
import json
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from kontext_s3.fal_queue import Accepted, FalQueueClient
from kontext_s3.jobs import new_holder
from kontext_s3.output_store import OutputLayout
from kontext_s3.tag_codec import encode_tags, tagging_header
from kontext_s3_tools.lambda_runtime import find_python313, read_only_mounts_available
from kontext_s3_tools.load import _image
from kontext_s3_tools.local_stack import LocalStack, function_url_event, sqs_event

RUNNER = textwrap.dedent(
    """
    import json, sys, time
    started = time.perf_counter()
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    mode, event_path = sys.argv[3], sys.argv[4]
    if mode == "baseline-import":
        import boto3
        print(json.dumps({"import_ms": (time.perf_counter() - started) * 1000}))
        raise SystemExit
    if mode == "baseline-event":
        import boto3
        imported = time.perf_counter()
        target = json.load(open(event_path))
        boto3.client("s3").head_object(Bucket=target["bucket"], Key=target["key"])
        done = time.perf_counter()
        print(json.dumps({"import_ms": (imported - started) * 1000, "total_ms": (done - started) * 1000}))
        raise SystemExit
    import app
    imported = time.perf_counter()
    if mode == "import":
        print(json.dumps({"import_ms": (imported - started) * 1000}))
        raise SystemExit

    class Context:
        function_name = "bench"
        function_version = "$LATEST"
        invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"
        memory_limit_in_mb = 512
        aws_request_id = "bench"
        log_group_name = "/aws/lambda/bench"
        log_stream_name = "bench"
        deadline = time.time() + 60
        def get_remaining_time_in_millis(self):
            return int((self.deadline - time.time()) * 1000)

    answer = app.lambda_handler(json.load(open(event_path)), Context())
    done = time.perf_counter()
    print(json.dumps({"import_ms": (imported - started) * 1000, "total_ms": (done - started) * 1000, "answer": str(answer)[:200]}))
    """
)


def _without_bytecode(build: Path, into: Path) -> Path:
    copy = into / "build-no-bytecode"
    shutil.copytree(build, copy, symlinks=True)
    for cache in list(copy.rglob("__pycache__")):
        shutil.rmtree(cache)
    return copy


class ColdStart:
    def __init__(self, stack: LocalStack, build: Path, workdir: Path) -> None:
        self.stack = stack
        self.python = find_python313()
        self.workdir = workdir
        self.runner = workdir / "runner.py"
        self.runner.write_text(RUNNER)
        self.builds = {"with bytecode": build, "without bytecode": _without_bytecode(build, workdir)}
        self.read_only = read_only_mounts_available()

    def sample(self, build: Path, function: str | None, mode: str, event: dict[str, Any] | None = None) -> dict[str, float]:
        spec = self.stack.functions[function or self.stack.function_id("submit")].spec
        event_path = self.workdir / f"event-{uuid.uuid4().hex}.json"
        event_path.write_text(json.dumps(event or {}))
        code = str(build / (function or spec.logical_id))
        command = [self.python, "-s", "-B", str(self.runner), code, str(build / "SharedLayer" / "python"), mode, str(event_path)]
        if self.read_only:
            command = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(build), *command]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **spec.environment, **spec.credentials()}
        answer = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd="/")
        if answer.returncode != 0:
            raise RuntimeError(f"{function} {mode} failed: {answer.stderr[-1500:]}")
        result: dict[str, float] = json.loads(answer.stdout.strip().splitlines()[-1])
        return result


def _median(samples: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(s[key] for s in samples), 1)


def _sideways_photo() -> bytes:
    image = Image.new("RGB", (1200, 900), (120, 160, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def _events(stack: LocalStack) -> dict[str, tuple[str, Callable[[], dict[str, Any]]]]:
    """A fresh real-shaped first event per sample, for each handler."""
    target = stack.target()
    s3 = stack.client("s3")
    sqs = stack.client("sqs")
    resources = stack.resources
    stack.poller.stop()  # the benchmark hands the submit events to the handler itself
    jobs = stack.jobs()
    fal = FalQueueClient(httpx.Client(), base_url=stack.emulator.base_url, key=lambda: stack.fal_key)

    def upload_event(body: bytes | None = None) -> dict[str, Any]:
        key = f"inputs/bench/{uuid.uuid4().hex}.jpg"
        tagging = tagging_header(encode_tags({"prompt": "bench, please!"}))
        s3.put_object(Bucket=target.bucket, Key=key, Body=body or _image(1), Tagging=tagging)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for message in sqs.receive_message(
                QueueUrl=resources.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageSystemAttributeNames=["All"]
            ).get("Messages", []):
                sqs.delete_message(QueueUrl=resources.queue_url, ReceiptHandle=message["ReceiptHandle"])
                # The upload's own event, not moto's ObjectTagging:Put that follows it.
                if (key.replace("/", "%2F") in message["Body"] or key in message["Body"]) and "ObjectCreated" in message["Body"]:
                    return sqs_event([message], resources.queue_arn)
        raise RuntimeError("no S3 event for the benchmark's upload")

    def webhook_event() -> dict[str, Any]:
        stack.emulator.set_faults(lose_webhook=1)
        image = stack.emulator.host_file(f"bench/{uuid.uuid4().hex}.jpg", _image(2), "image/jpeg")
        outcome = fal.submit(
            "fal-ai/flux-pro/kontext/max",
            {"prompt": "x", "image_url": image},
            webhook_url="http://127.0.0.1:9/",
            deadline=time.monotonic() + 10,
            key=stack.fal_key,
        )
        assert isinstance(outcome, Accepted)
        request = stack.emulator.requests[outcome.request.request_id]
        while request.status != "COMPLETED":
            time.sleep(0.05)
        job_id, holder, key = uuid.uuid4().hex, new_holder(), "inputs/bench/webhook.jpg"
        jobs.create(
            job_id=job_id,
            bucket=target.bucket,
            key=key,
            version_id=job_id,
            etag=None,
            sequencer=None,
            event_time=None,
            output_prefix=OutputLayout("inputs/", "outputs/").job_prefix(key, job_id),
            holder=holder,
            hold_ms=60_000,
        )
        jobs.begin_send(job_id, holder, input_json=json.dumps({"prompt": "x", "num_images": 1, "output_format": "jpeg"}))
        queued = outcome.request
        jobs.mark_submitted(
            job_id,
            holder,
            request_id=queued.request_id,
            gateway_request_id=None,
            status_url=queued.status_url,
            response_url=queued.response_url,
            cancel_url=queued.cancel_url,
        )
        body = json.dumps({"request_id": request.request_id, "status": "OK", "payload": request.result}).encode()
        headers = {k.lower(): v for k, v in stack.emulator.signer.headers(request.request_id, stack.emulator.user_id, body).items()}
        return function_url_event("POST", f"/fal/{job_id}", "", {"content-type": "application/json", **headers}, body, "bench", "127.0.0.1")

    def scheduled_event() -> dict[str, Any]:
        return {"version": "0", "id": str(uuid.uuid4()), "detail-type": "Scheduled Event", "source": "aws.scheduler", "detail": {}}

    return {
        "SubmitFunction": ("SubmitFunction", upload_event),
        # The uncommon path: a phone photo stored sideways, so Pillow is imported and a prepared copy written.
        "SubmitFunction, sideways photo": ("SubmitFunction", lambda: upload_event(_sideways_photo())),
        "WebhookFunction": ("WebhookFunction", webhook_event),
        "RecoverFunction": ("RecoverFunction", scheduled_event),
    }


def measure(stack: LocalStack, build: Path, repeats: int, workdir: Path) -> dict[str, Any]:
    bench = ColdStart(stack, build, workdir)
    events = _events(stack)
    # The minimal function's one S3 call: a HEAD of an upload (the submit role may read uploads).
    bucket = {"bucket": stack.resources.bucket, "key": "inputs/bench/baseline.jpg"}
    stack.client("s3").put_object(Bucket=bucket["bucket"], Key=bucket["key"], Body=_image(0))
    report: dict[str, Any] = {"read_only_mount": bench.read_only, "repeats": repeats, "variants": {}}
    for variant, tree in bench.builds.items():
        base_import = [bench.sample(tree, None, "baseline-import") for _ in range(repeats)]
        base_event = [bench.sample(tree, None, "baseline-event", bucket) for _ in range(repeats)]
        figures: dict[str, Any] = {
            "baseline": {
                "import boto3 (ms)": _median(base_import, "import_ms"),
                "import boto3 + one S3 call (ms)": _median(base_event, "total_ms"),
            }
        }
        for label, (function, make_event) in events.items():
            imports = [bench.sample(tree, function, "import") for _ in range(repeats)]
            firsts = [bench.sample(tree, function, "event", make_event()) for _ in range(repeats)]
            figures[label] = {
                "import (ms)": _median(imports, "import_ms"),
                "import / import boto3": round(_median(imports, "import_ms") / figures["baseline"]["import boto3 (ms)"], 2),
                "init + first event (ms)": _median(firsts, "total_ms"),
                "init + first event / boto3 + one S3 call": round(
                    _median(firsts, "total_ms") / figures["baseline"]["import boto3 + one S3 call (ms)"], 2
                ),
            }
            print(f"  {variant:>17}  {label:<30} {figures[label]}", flush=True)
        report["variants"][variant] = figures
    return report


def run(repeats: int = 5) -> dict[str, Any]:
    with LocalStack(recovery_interval_seconds=None, max_receive_count=3) as stack, tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        from kontext_s3_tools.local_stack import host_build_dir

        return measure(stack, host_build_dir(), repeats, Path(tmp))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| handler | bytecode | import | ÷ `import boto3` (goal ≤ 1.5) | init + first event | ÷ boto3 + one S3 call (goal ≤ 2.5) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for variant, figures in report["variants"].items():
        base = figures["baseline"]
        lines.append(
            f"| baseline | {variant} | {base['import boto3 (ms)']} ms | 1.00 | {base['import boto3 + one S3 call (ms)']} ms | 1.00 |"
        )
        for function, f in figures.items():
            if function == "baseline":
                continue
            lines.append(
                f"| {function} | {variant} | {f['import (ms)']} ms | {f['import / import boto3']} | "
                f"{f['init + first event (ms)']} ms | {f['init + first event / boto3 + one S3 call']} |"
            )
    return "\n".join(lines)
