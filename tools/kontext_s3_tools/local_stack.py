"""The whole pipeline on one machine: moto in server mode, the fal emulator, the real handlers.

* AWS is a ``moto`` server in its own process; everything talks to it over
  HTTP through ``AWS_ENDPOINT_URL``, exactly as boto3 talks to AWS.
* What ``template.yaml`` creates is created from the template itself: the jobs
  table's keys and index, the queue's redrive count, the bucket's notification
  prefixes and events, the parameters' defaults.
* The submit handler runs on SQS messages received from moto and shaped as
  Lambda's SQS event; failed records come back as Lambda's event source mapping
  would bring them back (after a short, local visibility delay).
* The webhook handler is served over HTTP, each request shaped as a Lambda
  Function URL event (payload format 2.0).
* The handlers are the production modules, configured only by environment.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import boto3
import yaml

from kontext_s3.jobs import JobStore
from kontext_s3_tools.cli import Target
from kontext_s3_tools.emulator import FalEmulator

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
REGION = "us-east-1"
ACCOUNT = "123456789012"


# -- template ----------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (``!Ref``, ``!Sub`` ...) kept as ``{"Fn": value}``."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {suffix: value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        document: dict[str, Any] = yaml.load(handle, Loader=_CfnLoader)  # noqa: S506 - a SafeLoader subclass
    return document


def parameter_defaults(template: dict[str, Any]) -> dict[str, str]:
    return {name: str(spec.get("Default", "")) for name, spec in template["Parameters"].items()}


# -- processes and clients ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MotoServer:
    """``moto_server`` in a child process (its own interpreter, like a real endpoint)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self._process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()


def aws_session() -> boto3.session.Session:
    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)


def aws_environment(endpoint: str) -> dict[str, str]:
    """What makes boto3, in any process, talk to the moto server instead of AWS."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }


# -- resources ----------------------------------------------------------------------------


@dataclass
class Resources:
    bucket: str
    table: str
    queue_url: str
    queue_arn: str
    dlq_url: str
    secret_arn: str
    event_bus: str
    events_queue_url: str
    input_prefix: str
    output_prefix: str
    max_receive_count: int


def provision(
    endpoint: str,
    *,
    fal_key: str,
    name: str | None = None,
    max_receive_count: int | None = None,
    visibility_timeout: int = 30,
    template: dict[str, Any] | None = None,
) -> Resources:
    """Create the template's bucket, queues, table, secret and event bus in the moto server at ``endpoint``."""
    template = template or load_template()
    params = parameter_defaults(template)
    resources = template["Resources"]
    name = name or f"kontext-{uuid.uuid4().hex[:8]}"
    session = aws_session()
    s3 = session.client("s3", endpoint_url=endpoint)
    sqs = session.client("sqs", endpoint_url=endpoint)
    ddb = session.client("dynamodb", endpoint_url=endpoint)
    secrets = session.client("secretsmanager", endpoint_url=endpoint)
    events = session.client("events", endpoint_url=endpoint)

    receive_count = max_receive_count or int(params["MaxReceiveCount"])
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue_url = sqs.create_queue(
        QueueName=f"{name}-uploads",
        Attributes={
            "VisibilityTimeout": str(visibility_timeout),
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": receive_count}),
        },
    )["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]

    table_spec = resources["JobsTable"]["Properties"]
    ddb.create_table(
        TableName=f"{name}-jobs",
        BillingMode=table_spec["BillingMode"],
        AttributeDefinitions=table_spec["AttributeDefinitions"],
        KeySchema=table_spec["KeySchema"],
        GlobalSecondaryIndexes=table_spec["GlobalSecondaryIndexes"],
    )
    ddb.update_time_to_live(
        TableName=f"{name}-jobs",
        TimeToLiveSpecification={"AttributeName": table_spec["TimeToLiveSpecification"]["AttributeName"], "Enabled": True},
    )

    bucket = f"{name}-bucket"
    bucket_spec = resources["InputBucket"]["Properties"]
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": bucket_spec["VersioningConfiguration"]["Status"]})
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]},
    )
    input_prefix, output_prefix = params["InputPrefix"], params["OutputPrefix"]
    notifications: list[Any] = [
        {
            "QueueArn": queue_arn,
            "Events": [config["Event"]],
            "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": input_prefix}]}},
        }
        for config in bucket_spec["NotificationConfiguration"]["QueueConfigurations"]
    ]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": notifications})

    secret_arn = secrets.create_secret(Name=f"{name}/fal-key", SecretString=fal_key)["ARN"]

    bus = f"{name}-bus"
    events.create_event_bus(Name=bus)
    events_queue_url = sqs.create_queue(QueueName=f"{name}-events")["QueueUrl"]
    events_queue_arn = sqs.get_queue_attributes(QueueUrl=events_queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name=f"{name}-ended-jobs", EventBusName=bus, EventPattern=json.dumps({"source": ["kontext-s3"]}))
    events.put_targets(Rule=f"{name}-ended-jobs", EventBusName=bus, Targets=[{"Id": "local-queue", "Arn": events_queue_arn}])

    return Resources(
        bucket=bucket,
        table=f"{name}-jobs",
        queue_url=queue_url,
        queue_arn=queue_arn,
        dlq_url=dlq_url,
        secret_arn=secret_arn,
        event_bus=bus,
        events_queue_url=events_queue_url,
        input_prefix=input_prefix,
        output_prefix=output_prefix,
        max_receive_count=receive_count,
    )


def function_environment(resources: Resources, *, emulator: FalEmulator, webhook_url: str, aws_endpoint: str) -> dict[str, str]:
    """The environment variables the template gives the functions, with local values."""
    return {
        **aws_environment(aws_endpoint),
        "JOBS_TABLE": resources.table,
        "INPUT_BUCKET": resources.bucket,
        "INPUT_PREFIX": resources.input_prefix,
        "OUTPUT_PREFIX": resources.output_prefix,
        "FAL_QUEUE_URL": emulator.base_url,
        "FAL_KEY_SECRET_ARN": resources.secret_arn,
        "EVENT_BUS_NAME": resources.event_bus,
        "WEBHOOK_URL": webhook_url,
        "MAX_RECEIVE_COUNT": str(resources.max_receive_count),
        "FAL_JWKS_URL": emulator.jwks_url,
        "ALLOWED_MEDIA_URLS": emulator.files_url,
        "RECOVERY_AFTER_SECONDS": os.environ.get("RECOVERY_AFTER_SECONDS", "5"),
        "JOB_MAX_AGE_SECONDS": os.environ.get("JOB_MAX_AGE_SECONDS", "600"),
        "POWERTOOLS_SERVICE_NAME": "kontext-local",
        "POWERTOOLS_METRICS_NAMESPACE": "KontextS3",
        "POWERTOOLS_LOG_LEVEL": os.environ.get("POWERTOOLS_LOG_LEVEL", "WARNING"),
        "POWERTOOLS_METRICS_DISABLED": os.environ.get("POWERTOOLS_METRICS_DISABLED", "true"),
    }


# -- Lambda, locally ------------------------------------------------------------------------


_instance_numbers = itertools.count(1)


def load_function(name: str) -> ModuleType:
    """Import ``functions/<name>/app.py`` afresh, as one Lambda execution environment does at cold start.

    Every call gives a new module (its own clients, caches and Powertools state), read
    from the environment as it is now.
    """
    module_name = f"kontext_function_{name}_{next(_instance_numbers)}"  # count() is atomic under the GIL
    path = ROOT / "functions" / name / "app.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class ExecutionEnvironments:
    """Lambda's execution environments, locally: one invocation at a time in each, more made on demand.

    Lambda never runs two invocations in one environment at once, and code relies on
    it: Powertools' batch processor and event resolvers keep the current invocation in
    module state. Calling one module from several threads would mix invocations, so
    each concurrent invocation gets an environment of its own, started when none is idle.
    """

    def __init__(self, factory: Callable[[], Handler], first: Handler | None = None) -> None:
        self._factory = factory
        self._idle: list[Handler] = [first] if first else []
        self._lock = threading.Lock()
        self.started = len(self._idle)

    def invoke(self, event: dict[str, Any], context: Any) -> Any:
        with self._lock:
            handler = self._idle.pop() if self._idle else None
        if handler is None:
            handler = self._factory()
            with self._lock:
                self.started += 1
        try:
            return handler(event, context)
        finally:
            with self._lock:
                self._idle.append(handler)


@dataclass
class LambdaContext:
    """The parts of Lambda's context object the handlers and Powertools read."""

    function_name: str
    timeout_seconds: float
    memory_limit_in_mb: int = 512
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    _started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{self.function_name}"

    @property
    def function_version(self) -> str:
        return "$LATEST"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return "local"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_seconds - (time.monotonic() - self._started)) * 1000))


Handler = Callable[[dict[str, Any], Any], Any]


def sqs_event(messages: Sequence[Mapping[str, Any]], queue_arn: str) -> dict[str, Any]:
    """SQS messages as Lambda's event source mapping hands them to a function."""
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": dict(m.get("Attributes", {})),
                "messageAttributes": {},
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
    }


class SqsPoller:
    """Lambda's SQS event source mapping, locally: receive, invoke, delete what succeeded."""

    def __init__(
        self,
        handler: Handler,
        *,
        endpoint: str,
        queue_url: str,
        queue_arn: str,
        function_name: str = "submit",
        timeout_seconds: float = 20.0,
        retry_delay_seconds: int = 1,
        concurrency: int = 2,
        batch_size: int = 10,
    ) -> None:
        self._handler = handler
        self._sqs = aws_session().client("sqs", endpoint_url=endpoint)
        self._queue_url = queue_url
        self._queue_arn = queue_arn
        self._function_name = function_name
        self._timeout = timeout_seconds
        self._retry_delay = retry_delay_seconds
        self._batch_size = batch_size
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"sqs-poller-{i}", daemon=True) for i in range(concurrency)]
        self.invocations = 0
        self.errors: list[str] = []

    def start(self) -> SqsPoller:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once(wait_seconds=1)
            except Exception as exc:  # keep polling, as Lambda would; the error is kept for inspection
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.5)

    def poll_once(self, wait_seconds: int = 0) -> int:
        messages = self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=self._batch_size,
            WaitTimeSeconds=wait_seconds,
            MessageSystemAttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return 0
        event = sqs_event(messages, self._queue_arn)
        self.invocations += 1
        try:
            response = self._handler(event, LambdaContext(self._function_name, self._timeout))
            failed = {item["itemIdentifier"] for item in (response or {}).get("batchItemFailures", [])}
        except Exception as exc:
            # A raised error fails the whole batch, as in Lambda.
            self.errors.append(f"{type(exc).__name__}: {exc}")
            failed = {m["MessageId"] for m in messages}
        for message in messages:
            if message["MessageId"] in failed:
                # Lambda leaves failures to the queue's visibility timeout; locally they come back sooner.
                self._sqs.change_message_visibility(
                    QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=self._retry_delay
                )
            else:
                self._sqs.delete_message(QueueUrl=self._queue_url, ReceiptHandle=message["ReceiptHandle"])
        return len(messages)


def function_url_event(
    method: str, raw_path: str, raw_query: str, headers: dict[str, str], body: bytes, host: str, source_ip: str
) -> dict[str, Any]:
    """An HTTP request as a Lambda Function URL event (payload format 2.0)."""
    content_type = headers.get("content-type", "")
    textual = content_type.startswith("text/") or any(t in content_type for t in ("json", "xml", "urlencoded", "javascript"))
    now = datetime.now(UTC)
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": raw_query,
        "headers": headers,
        "queryStringParameters": dict(parse_qsl(raw_query)) or None,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "local",
            "domainName": host,
            "domainPrefix": "local",
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": str(uuid.uuid4()),
            "routeKey": "$default",
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "body": (body.decode("utf-8") if textual else base64.b64encode(body).decode("ascii")) if body else None,
        "isBase64Encoded": bool(body) and not textual,
    }


class FunctionUrlServer:
    """A Lambda Function URL, locally: HTTP in, Function URL event to the handler, its answer out."""

    def __init__(self, handler: Handler, *, function_name: str = "webhook", timeout_seconds: float = 60.0, port: int = 0) -> None:
        outer = self
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _invoke(self) -> None:
                outer.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                event = function_url_event(
                    self.command, url.path, url.query, headers, body, self.headers.get("Host", ""), self.client_address[0]
                )
                try:
                    answer = handler(event, LambdaContext(function_name, timeout_seconds))
                except Exception as exc:  # Lambda answers 502 when the function raises
                    answer = {"statusCode": 502, "body": json.dumps({"message": f"function error: {type(exc).__name__}"})}
                status = int(answer.get("statusCode", 200))
                payload = answer.get("body") or ""
                data = base64.b64decode(payload) if answer.get("isBase64Encoded") else str(payload).encode("utf-8")
                self.send_response(status)
                for name, value in (answer.get("headers") or {}).items():
                    self.send_header(name, str(value))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _invoke
            do_POST = _invoke
            do_PUT = _invoke

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="function-url", daemon=True)

    def start(self) -> FunctionUrlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- the stack ------------------------------------------------------------------------------


@dataclass
class LocalStack:
    """Everything, started together: ``with LocalStack() as stack: ...``."""

    fal_key: str = "local-fal-key:local-secret"
    max_receive_count: int | None = 3
    submit_concurrency: int = 2
    submit_timeout_seconds: float = 20.0
    webhook_attempts: int = 10
    webhook_backoff_seconds: float = 0.2
    #: The recovery function's schedule (every 5 minutes on AWS); None runs it only on demand.
    recovery_interval_seconds: float | None = 10.0
    verbose: bool = False

    moto: MotoServer = field(init=False)
    emulator: FalEmulator = field(init=False)
    resources: Resources = field(init=False)
    webhook: FunctionUrlServer = field(init=False)
    poller: SqsPoller = field(init=False)
    environment: dict[str, str] = field(init=False)
    functions: dict[str, ModuleType] = field(init=False)
    environments: dict[str, ExecutionEnvironments] = field(init=False)

    def start(self) -> LocalStack:
        self.moto = MotoServer().start()
        self.emulator = FalEmulator(
            fal_key=self.fal_key,
            webhook_attempts=self.webhook_attempts,
            webhook_backoff_seconds=self.webhook_backoff_seconds,
            verbose=self.verbose,
        ).start()
        self.resources = provision(self.moto.url, fal_key=self.fal_key, max_receive_count=self.max_receive_count)
        # The webhook server needs its handler, and the handler's environment needs the server's URL:
        # the port is reserved first and the handler bound once the modules are loaded.
        self._webhook_handler: Handler | None = None
        self.webhook = FunctionUrlServer(self._call_webhook).start()
        self.environment = function_environment(
            self.resources, emulator=self.emulator, webhook_url=self.webhook.url, aws_endpoint=self.moto.url
        )
        os.environ.update(self.environment)
        self.functions = {name: load_function(name) for name in ("submit", "webhook", "recover")}
        self.environments = {
            name: ExecutionEnvironments(lambda name=name: load_function(name).lambda_handler, first=self.functions[name].lambda_handler)  # type: ignore[misc]
            for name in self.functions
        }
        self._webhook_handler = self.environments["webhook"].invoke
        self.poller = SqsPoller(
            self.environments["submit"].invoke,
            endpoint=self.moto.url,
            queue_url=self.resources.queue_url,
            queue_arn=self.resources.queue_arn,
            timeout_seconds=self.submit_timeout_seconds,
            concurrency=self.submit_concurrency,
        ).start()
        self._schedule = threading.Event()
        if self.recovery_interval_seconds:
            threading.Thread(target=self._recover_on_schedule, name="recovery-schedule", daemon=True).start()
        return self

    def run_recovery(self) -> dict[str, Any]:
        """Invoke the recovery function once, as its EventBridge Scheduler rule does."""
        event = {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.scheduler",
            "account": ACCOUNT,
            "time": datetime.now(UTC).isoformat(),
            "region": REGION,
            "resources": [],
            "detail": {},
        }
        result: dict[str, Any] = self.environments["recover"].invoke(event, LambdaContext("recover", 300))
        return result

    def _recover_on_schedule(self) -> None:
        assert self.recovery_interval_seconds
        while not self._schedule.wait(self.recovery_interval_seconds):
            try:
                self.run_recovery()
            except Exception as exc:  # a failed run is retried by the next one, as with the real schedule
                print(f"warning: recovery run failed: {exc}", file=sys.stderr)

    def _call_webhook(self, event: dict[str, Any], context: Any) -> Any:
        assert self._webhook_handler is not None
        return self._webhook_handler(event, context)

    def stop(self) -> None:
        if hasattr(self, "_schedule"):
            self._schedule.set()
        for stopper in (self.poller.stop, self.webhook.stop, self.emulator.stop, self.moto.stop):
            try:
                stopper()
            except Exception as exc:  # stop the rest regardless
                print(f"warning: stopping the local stack: {exc}", file=sys.stderr)
        for name, value in getattr(self, "_saved_environment", {}).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module_name in [m for m in sys.modules if m.startswith("kontext_function_")]:
            sys.modules.pop(module_name, None)

    def cli_environment(self) -> dict[str, str]:
        """What the kontext-s3 CLI needs to work against this stack."""
        return {
            **aws_environment(self.moto.url),
            "KONTEXT_S3_BUCKET": self.resources.bucket,
            "KONTEXT_S3_TABLE": self.resources.table,
            "KONTEXT_S3_INPUT_PREFIX": self.resources.input_prefix,
            "KONTEXT_S3_OUTPUT_PREFIX": self.resources.output_prefix,
        }

    def target(self) -> Target:
        return Target(
            bucket=self.resources.bucket,
            table=self.resources.table,
            input_prefix=self.resources.input_prefix,
            output_prefix=self.resources.output_prefix,
            endpoint_url=self.moto.url,
            region=REGION,
        )

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def client(self, service: str) -> Any:
        return aws_session().client(service, endpoint_url=self.moto.url)  # type: ignore[call-overload]

    def accepted_requests_per_job(self) -> Counter[str]:
        """How many requests the emulator accepted (fal would bill) per job, read from their webhook URLs."""
        return Counter(r.webhook_url.rsplit("/", 1)[-1] for r in self.emulator.requests.values() if r.webhook_url)

    def jobs(self) -> JobStore:
        return JobStore(aws_session().resource("dynamodb", endpoint_url=self.moto.url).Table(self.resources.table))
