"""The whole pipeline on one machine, deployed from ``template.yaml``: moto, the fal emulator, the built functions.

* AWS is a ``moto`` server in its own process, behind the AWS gateway
  (:mod:`kontext_s3_tools.aws_gateway`); everything talks to it over HTTP
  through ``AWS_ENDPOINT_URL``, as boto3 talks to AWS.
* What ``template.yaml`` declares is created from the template itself, as
  CloudFormation would create it: SAM's translator turns it into
  CloudFormation and :mod:`kontext_s3_tools.template_model` resolves it. The
  table with its keys, indexes and TTL; the queues and their redrive; the
  bucket and its notifications; the secret; each function's role with its
  policies; each function's handler, environment, timeout, memory and
  concurrency; the SQS event source mapping with its batch settings; the
  Function URL; the recovery schedule. The only local choices are parameter
  values (fal's URLs are the emulator's, thresholds are seconds), and a few
  stand-ins for what moto cannot run, listed in :data:`NOT_EMULATED`.
* The functions run from the built artifact (``make build-host``: the layout
  ``sam build`` makes, for this machine's architecture), on python3.13, on a
  read-only mount, each with credentials of its own role. moto enforces those
  roles for S3 and SQS; the gateway judges the other services' calls.
* Lambda's SQS event source mapping, Function URL and scheduler are stood in
  for by :class:`SqsPoller`, :class:`FunctionUrlServer` and a timer.
"""

from __future__ import annotations

import base64
import json
import os
import platform
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
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import boto3
import yaml
from botocore.credentials import Credentials

from kontext_s3 import table_keys
from kontext_s3.dynamo import Table
from kontext_s3.jobs import JobStore
from kontext_s3_tools.api_destinations import ApiDestinationRelay, RelaySpec, connection_headers
from kontext_s3_tools.aws_gateway import AwsGateway, Identity
from kontext_s3_tools.cli import Target
from kontext_s3_tools.emulator import FalEmulator
from kontext_s3_tools.http_server import QuietHTTPServer
from kontext_s3_tools.iam_policy import statements_of
from kontext_s3_tools.lambda_runtime import FunctionSpec, LocalFunction, Throttled, find_python313, read_only_mounts_available
from kontext_s3_tools.template_model import ACCOUNT, REGION, Stack, source_logical_id, translate

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
HOST_BUILD = ROOT / ".aws-sam" / "build-host"

#: Resources the local stack does not create, and why.
NOT_EMULATED = {
    "AWS::CloudWatch::Alarm": "no CloudWatch alarms locally (their metrics are in the function logs)",
    "AWS::CloudWatch::Dashboard": "no dashboard locally",
    "AWS::Logs::LogGroup": "function logs go to files under the stack's log directory",
    "AWS::Lambda::Permission": "the local Function URL and scheduler call the function directly",
    "AWS::S3::BucketPolicy": "the TLS-only policy would refuse the local stack's plain-HTTP endpoint",
    "AWS::SNS::Topic": "alarms are not emulated",
}


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
    """template.yaml as written (short-form tags kept), for tests of the template's text."""
    with path.open(encoding="utf-8") as handle:
        document: dict[str, Any] = yaml.load(handle, Loader=_CfnLoader)  # noqa: S506 - a SafeLoader subclass
    return document


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
            # moto's server, with its S3 events (notifications and EventBridge's) as S3 sends them (see the module).
            [sys.executable, "-m", "kontext_s3_tools.moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            # AWS's managed policies (AWSLambdaBasicExecutionRole ...), which SAM attaches to function roles.
            env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
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

    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()


TEST_CREDENTIALS = Credentials("testing", "testing", "testing")


def aws_session(credentials: Credentials = TEST_CREDENTIALS) -> boto3.session.Session:
    return boto3.session.Session(
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.token,
        region_name=REGION,
    )


def aws_environment(endpoint: str, credentials: Credentials = TEST_CREDENTIALS) -> dict[str, str]:
    """What makes boto3, in any process, talk to the local endpoint instead of AWS."""
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }
    if credentials.token:
        env["AWS_SESSION_TOKEN"] = credentials.token
    return env


def local_parameters(emulator: FalEmulator, **overrides: str) -> dict[str, str]:
    """The template parameters that differ locally: fal is the emulator, and thresholds are seconds, not minutes."""
    return {
        "FalQueueUrl": emulator.base_url,
        "FalJwksUrl": emulator.jwks_url,
        "AllowedMediaUrls": emulator.files_url,
        "RecoveryAfterSeconds": "5",
        "JobMaxAgeSeconds": "600",
        # Nothing is billed locally: no daily cap unless a test or a tool asks for one (the template's default is 100).
        "DailyImageBudget": "0",
        **overrides,
    }


# -- deploying the template into moto ----------------------------------------------------------


@dataclass
class Resources:
    """What a deployment created, by the names tests and tools use."""

    stack: Stack
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
    admin: Credentials = TEST_CREDENTIALS
    roles: dict[str, str] = field(default_factory=dict)  # function logical id -> role ARN

    def function_ids(self) -> list[str]:
        return [logical_id for logical_id, _ in self.stack.of_type("AWS::Lambda::Function")]


def _physical_name(stack: str, logical_id: str, limit: int = 64) -> str:
    return f"{stack}-{logical_id}-{uuid.uuid4().hex[:8]}"[-limit:].lstrip("-")


class _Deployer:
    """Creates each resource of the translated template in moto, when it is first referenced."""

    def __init__(self, endpoint: str, *, credentials: Credentials, fal_key: str, function_urls: Mapping[str, str]) -> None:
        session = aws_session(credentials)
        self.endpoint = endpoint
        # Typed loosely: the template's properties are passed through as CloudFormation gives them.
        self.s3: Any = session.client("s3", endpoint_url=endpoint)
        self.sqs: Any = session.client("sqs", endpoint_url=endpoint)
        self.ddb: Any = session.client("dynamodb", endpoint_url=endpoint)
        self.secrets: Any = session.client("secretsmanager", endpoint_url=endpoint)
        self.iam: Any = session.client("iam", endpoint_url=endpoint)
        self.fal_key = fal_key
        self.function_urls = function_urls
        # The deploying identity assumes the function roles locally (moto checks trust by exact principal).
        self.trusted_principal = session.client("sts", endpoint_url=endpoint).get_caller_identity()["Arn"]
        self.events: Any = session.client("events", endpoint_url=endpoint)
        self.stack: Stack | None = None
        # EventBridge API destinations, which moto does not call: relayed (see ``api_destinations``).
        self.connections: dict[str, tuple[str, dict[str, Any]]] = {}
        self.destinations: dict[str, dict[str, Any]] = {}
        self.relays: list[RelaySpec] = []

    def __call__(self, logical_id: str, resource: dict[str, Any]) -> dict[str, Any]:
        assert self.stack is not None
        stack = self.stack
        kind = resource["Type"]
        name = _physical_name(stack.name, logical_id)
        if kind in NOT_EMULATED or kind in ("AWS::Lambda::EventSourceMapping", "AWS::Scheduler::Schedule"):
            return {"Ref": name}
        props = stack.properties(logical_id)
        if kind == "AWS::SecretsManager::Secret":
            value = props.get("SecretString")
            generate = props.get("GenerateSecretString")
            if value is None and generate:
                value = json.dumps({**json.loads(generate["SecretStringTemplate"]), generate["GenerateStringKey"]: uuid.uuid4().hex})
            # The fal key secret is created as the template creates it, and stored as an operator would store it
            # after deploying; an empty fal_key leaves it as a first deploy does: a secret with no value.
            value = value or self.fal_key
            arn = self.secrets.create_secret(Name=name, **({"SecretString": value} if value else {}))["ARN"]
            return {"Ref": arn, "Id": arn}
        if kind == "AWS::Events::Connection":
            arn = f"arn:aws:events:{REGION}:{ACCOUNT}:connection/{name}/{uuid.uuid4()}"
            self.connections[arn] = (props["AuthorizationType"], self._dynamic(props["AuthParameters"]))
            return {"Ref": name, "Arn": arn}
        if kind == "AWS::Events::ApiDestination":
            arn = f"arn:aws:events:{REGION}:{ACCOUNT}:api-destination/{name}/{uuid.uuid4()}"
            self.destinations[arn] = props
            return {"Ref": name, "Arn": arn}
        if kind == "AWS::Events::Rule":
            return self._rule(props, name)
        if kind == "AWS::DynamoDB::Table":
            table = props.get("TableName") or name
            self.ddb.create_table(
                TableName=table,
                BillingMode=props.get("BillingMode", "PAY_PER_REQUEST"),
                AttributeDefinitions=props["AttributeDefinitions"],
                KeySchema=props["KeySchema"],
                **({"GlobalSecondaryIndexes": props["GlobalSecondaryIndexes"]} if props.get("GlobalSecondaryIndexes") else {}),
            )
            ttl = props.get("TimeToLiveSpecification")
            if ttl and ttl.get("Enabled"):
                self.ddb.update_time_to_live(TableName=table, TimeToLiveSpecification=ttl)
            return {"Ref": table, "Arn": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{table}"}
        if kind == "AWS::SQS::Queue":
            attributes = {k: str(v) for k, v in props.items() if k in ("VisibilityTimeout", "MessageRetentionPeriod", "DelaySeconds")}
            if "RedrivePolicy" in props:
                attributes["RedrivePolicy"] = json.dumps(props["RedrivePolicy"])
            url = self.sqs.create_queue(QueueName=props.get("QueueName") or name, Attributes=attributes)["QueueUrl"]
            arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            return {"Ref": url, "Arn": arn, "QueueName": arn.rsplit(":", 1)[-1], "QueueUrl": url}
        if kind == "AWS::SQS::QueuePolicy":
            for url in props["Queues"]:
                self.sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(props["PolicyDocument"])})
            return {"Ref": name}
        if kind == "AWS::S3::Bucket":
            return self._bucket(props, name)
        if kind == "AWS::IAM::Role":
            return self._role(props, name)
        if kind == "AWS::Lambda::LayerVersion":
            source = source_logical_id(logical_id, resource)
            return {"Ref": f"arn:aws:lambda:{REGION}:{ACCOUNT}:layer:{source}:1", "SourceId": source}
        if kind == "AWS::Lambda::Function":
            function_name = props.get("FunctionName") or name
            return {"Ref": function_name, "Arn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function_name}"}
        if kind == "AWS::Lambda::Url":
            # Resolving TargetFunctionArn created the target; find it among what exists.
            target = next(
                lid
                for lid in self.function_urls
                if lid in stack.physical and props["TargetFunctionArn"] in (stack.physical[lid]["Arn"], stack.physical[lid]["Ref"])
            )
            return {"Ref": name, "FunctionUrl": self.function_urls[target].rstrip("/") + "/", "FunctionArn": props["TargetFunctionArn"]}
        raise NotImplementedError(f"the local stack cannot create {kind} ({logical_id}); add it to NOT_EMULATED with the reason")

    def _dynamic(self, value: Any) -> Any:
        """CloudFormation's ``{{resolve:secretsmanager:<arn>:SecretString:<key>}}``, read from the local secret."""
        if isinstance(value, dict):
            return {k: self._dynamic(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._dynamic(v) for v in value]
        if isinstance(value, str) and value.startswith("{{resolve:secretsmanager:") and value.endswith("}}"):
            reference = value[len("{{resolve:secretsmanager:") : -2]
            secret_id, _, key = reference.rpartition(":SecretString:")
            text = self.secrets.get_secret_value(SecretId=secret_id or reference)["SecretString"]
            return json.loads(text)[key] if key and secret_id else text
        return value

    def _rule(self, props: dict[str, Any], name: str) -> dict[str, Any]:
        bus = props.get("EventBusName", "default")
        arn = f"arn:aws:events:{REGION}:{ACCOUNT}:rule/{bus}/{name}"
        self.events.put_rule(
            Name=name, EventBusName=bus, EventPattern=json.dumps(props["EventPattern"]), State=props.get("State", "ENABLED")
        )
        targets = []
        for target in props.get("Targets", []):
            destination = self.destinations.get(target["Arn"])
            if destination is None:
                targets.append({k: v for k, v in target.items() if k in ("Id", "Arn", "InputPath", "RoleArn")})
                continue
            # moto delivers to SQS but never calls an API destination: the relay queue and relay stand in.
            url = self.sqs.create_queue(QueueName=f"{name}-{target['Id']}-relay"[-80:])["QueueUrl"]
            relay_arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
            targets.append({"Id": target["Id"], "Arn": relay_arn})
            authorization, auth = self.connections[destination["ConnectionArn"]]
            self.relays.append(
                RelaySpec(
                    rule_arn=arn,
                    target_arn=target["Arn"],
                    queue_url=url,
                    endpoint=destination["InvocationEndpoint"],
                    method=destination.get("HttpMethod", "POST"),
                    headers=connection_headers(authorization, auth),
                    input_path=target.get("InputPath"),
                    dead_letter_arn=target.get("DeadLetterConfig", {}).get("Arn"),
                )
            )
        self.events.put_targets(Rule=name, EventBusName=bus, Targets=targets)
        return {"Ref": name, "Arn": arn}

    def _bucket(self, props: dict[str, Any], name: str) -> dict[str, Any]:
        bucket = props.get("BucketName") or name.lower()
        self.s3.create_bucket(Bucket=bucket)
        if props.get("VersioningConfiguration"):
            self.s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": props["VersioningConfiguration"]["Status"]})
        encryption = props.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration")
        if encryption:
            rules = [{"ApplyServerSideEncryptionByDefault": r["ServerSideEncryptionByDefault"]} for r in encryption]
            self.s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": rules})
        queues = props.get("NotificationConfiguration", {}).get("QueueConfigurations", [])
        if queues:
            self.s3.put_bucket_notification_configuration(
                Bucket=bucket,
                NotificationConfiguration={
                    "QueueConfigurations": [
                        {
                            "QueueArn": config["Queue"],
                            "Events": [config["Event"]],
                            **({"Filter": {"Key": {"FilterRules": config["Filter"]["S3Key"]["Rules"]}}} if "Filter" in config else {}),
                        }
                        for config in queues
                    ]
                },
            )
        return {"Ref": bucket, "Arn": f"arn:aws:s3:::{bucket}", "DomainName": f"{bucket}.s3.amazonaws.com"}

    def _role(self, props: dict[str, Any], name: str) -> dict[str, Any]:
        role = props.get("RoleName") or name
        # moto cannot evaluate a service principal (lambda.amazonaws.com) when a role is assumed, so locally the
        # stack's account assumes each role for its functions, as the Lambda service does on AWS.
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": self.trusted_principal}, "Action": "sts:AssumeRole"}],
        }
        arn = self.iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        for policy in props.get("Policies", []):
            # SAM writes some generated policies (the scheduler's) without a Version; IAM defaults it, moto refuses it.
            document = {"Version": "2012-10-17", **policy["PolicyDocument"]}
            self.iam.put_role_policy(RoleName=role, PolicyName=policy["PolicyName"], PolicyDocument=json.dumps(document))
        for managed in props.get("ManagedPolicyArns", []):
            self.iam.attach_role_policy(RoleName=role, PolicyArn=managed)
        return {"Ref": role, "Arn": arn, "RoleId": role}

    def role_statements(self, role: str) -> list[dict[str, Any]]:
        """Every statement of a role's policies, inline and managed."""
        statements: list[dict[str, Any]] = []
        for policy_name in self.iam.list_role_policies(RoleName=role)["PolicyNames"]:
            document = self.iam.get_role_policy(RoleName=role, PolicyName=policy_name)["PolicyDocument"]
            statements.extend(statements_of(json.loads(document) if isinstance(document, str) else document))
        for attached in self.iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
            policy = self.iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
            version = self.iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=policy["DefaultVersionId"])
            document = version["PolicyVersion"]["Document"]
            statements.extend(statements_of(json.loads(document) if isinstance(document, str) else document))
        return statements


def _admin(endpoint: str) -> Credentials:
    """An administrator of the local account, made while moto still lets anyone in."""
    iam = aws_session().client("iam", endpoint_url=endpoint)
    user = f"local-admin-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="everything",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return Credentials(key["AccessKeyId"], key["SecretAccessKey"])


def provision(
    endpoint: str,
    *,
    fal_key: str,
    name: str | None = None,
    max_receive_count: int | None = None,
    parameters: Mapping[str, str] | None = None,
    template: Path | str = TEMPLATE,
    function_urls: Mapping[str, str] | None = None,
    credentials: Credentials = TEST_CREDENTIALS,
) -> Resources:
    """Deploy ``template`` into the moto server at ``endpoint``: every resource it declares that moto can hold."""
    name = name or f"kx{uuid.uuid4().hex[:8]}"
    session = aws_session(credentials)
    events = session.client("events", endpoint_url=endpoint)
    sqs = session.client("sqs", endpoint_url=endpoint)
    # Each local stack gets its own bus, so stacks sharing one moto server do not see each other's events.
    bus = f"{name}-bus"
    events.create_event_bus(Name=bus)
    values = {"EventBusName": bus, **(parameters or {})}
    if max_receive_count is not None:
        values["MaxReceiveCount"] = str(max_receive_count)
    cfn = translate(Path(template) if isinstance(template, str) and "\n" not in template else template, values)
    deployer = _Deployer(endpoint, credentials=credentials, fal_key=fal_key, function_urls=function_urls or {})
    stack = Stack(cfn, name=name, parameters=values, create=deployer)
    deployer.stack = stack
    functions = [logical_id for logical_id, _ in stack.of_type("AWS::Lambda::Function")]
    if not function_urls:
        deployer.function_urls = {logical_id: f"http://127.0.0.1:9/{logical_id}" for logical_id in functions}
    for logical_id in stack.resources:
        if stack.included(logical_id):
            stack.ensure(logical_id)
    # Observing the stack's events locally: a rule on its bus to a queue tests and tools read.
    events_queue_url = sqs.create_queue(QueueName=f"{name}-events")["QueueUrl"]
    events_queue_arn = sqs.get_queue_attributes(QueueUrl=events_queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.put_rule(Name=f"{name}-observe", EventBusName=bus, EventPattern=json.dumps({"source": [{"prefix": ""}]}))
    events.put_targets(Rule=f"{name}-observe", EventBusName=bus, Targets=[{"Id": "observer", "Arn": events_queue_arn}])

    def first(kind: str, where: Callable[[dict[str, Any]], bool] = lambda _: True) -> str:
        return next(lid for lid, res in stack.of_type(kind) if where(res))

    uploads = first("AWS::SQS::Queue", lambda res: "RedrivePolicy" in res.get("Properties", {}))
    dlq = "UploadsDeadLetterQueue"
    resources = Resources(
        stack=stack,
        bucket=stack.ensure(first("AWS::S3::Bucket"))["Ref"],
        table=stack.ensure(first("AWS::DynamoDB::Table"))["Ref"],
        queue_url=stack.ensure(uploads)["Ref"],
        queue_arn=stack.ensure(uploads)["Arn"],
        dlq_url=stack.ensure(dlq)["Ref"],
        secret_arn=stack.ensure("FalKeySecret")["Ref"],
        event_bus=bus,
        events_queue_url=events_queue_url,
        input_prefix=stack.parameters["InputPrefix"],
        output_prefix=stack.parameters["OutputPrefix"],
        max_receive_count=int(stack.parameters["MaxReceiveCount"]),
        admin=credentials,
    )
    for logical_id in functions:
        resources.roles[logical_id] = stack.properties(logical_id)["Role"]
    resources.__dict__["_deployer"] = deployer
    return resources


def function_environment(
    resources: Resources,
    *,
    emulator: FalEmulator,
    webhook_url: str | None = None,
    aws_endpoint: str,
    function: str | None = None,
    **parameters: str,
) -> dict[str, str]:
    """The environment the template gives a function (all functions' variables when none is named), with local parameters."""
    stack = resources.stack
    stack.parameters.update(local_parameters(emulator, **parameters))
    env: dict[str, str] = {}
    for logical_id in [function] if function else resources.function_ids():
        env.update({k: str(v) for k, v in stack.properties(logical_id).get("Environment", {}).get("Variables", {}).items()})
    if webhook_url is not None:
        env["WEBHOOK_URL"] = webhook_url
    env.update(aws_environment(aws_endpoint, resources.admin))
    return env


# -- Lambda's event sources, locally ------------------------------------------------------------


@dataclass
class LambdaContext:
    """The parts of Lambda's context object the handlers and Powertools read (for in-process invocations)."""

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
                "messageAttributes": dict(m.get("MessageAttributes", {})),
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            }
            for m in messages
        ]
    }


class SqsPoller:
    """Lambda's SQS event source mapping, locally: receive, invoke, delete what succeeded.

    ``concurrency`` pollers run at once (the mapping's ``MaximumConcurrency``), each
    receiving up to ``batch_size`` messages, waiting up to ``batching_window`` seconds
    to fill a batch. It reads the queue with the credentials it is given (the
    function's role, as Lambda's mapping does).
    """

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
        batching_window: float = 0.0,
        credentials: Credentials = TEST_CREDENTIALS,
        admin: Credentials | None = None,
    ) -> None:
        self._handler = handler
        self._sqs = aws_session(credentials).client("sqs", endpoint_url=endpoint)
        # Bringing failures back early is a local shortcut, not something Lambda's mapping (or its role) does.
        self._shortcut = aws_session(admin).client("sqs", endpoint_url=endpoint) if admin else self._sqs
        self._queue_url = queue_url
        self._queue_arn = queue_arn
        self._function_name = function_name
        self._timeout = timeout_seconds
        self._retry_delay = retry_delay_seconds
        self._batch_size = batch_size
        self._window = batching_window
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

    def _receive(self, wait_seconds: int) -> list[Any]:
        """A batch as Lambda's mapping gathers it: once a message is in hand, more are waited for until the batch is
        full or the batching window has passed (with no window, what one receive brings)."""
        messages: list[Any] = []
        window_ends = time.monotonic() + self._window
        while len(messages) < self._batch_size:
            left = window_ends - time.monotonic()
            if messages and left < 1:  # SQS waits in whole seconds
                break
            got = self._sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=self._batch_size - len(messages),
                WaitTimeSeconds=wait_seconds if not messages else min(20, int(left)),
                MessageSystemAttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            messages.extend(got)
            if not messages:
                break
        return messages

    def poll_once(self, wait_seconds: int = 0) -> int:
        messages = self._receive(wait_seconds)
        if not messages:
            return 0
        event = sqs_event(messages, self._queue_arn)
        self.invocations += 1
        try:
            response = self._handler(event, LambdaContext(self._function_name, self._timeout))
            failed = {item["itemIdentifier"] for item in (response or {}).get("batchItemFailures", [])}
        except Exception as exc:
            # A raised error (or a timeout) fails the whole batch, as in Lambda.
            self.errors.append(f"{type(exc).__name__}: {exc}")
            failed = {m["MessageId"] for m in messages}
        for message in messages:
            if message["MessageId"] in failed:
                # Lambda leaves failures to the queue's visibility timeout; locally they come back sooner.
                self._shortcut.change_message_visibility(
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
    """A Lambda Function URL, locally: HTTP in, Function URL event to the handler, its answer out.

    A throttled invocation answers 429, and a function error 502, as Lambda's URLs do.
    """

    def __init__(
        self, handler: Handler | None = None, *, function_name: str = "webhook", timeout_seconds: float = 60.0, port: int = 0
    ) -> None:
        outer = self
        self.handler = handler
        self.requests = 0
        #: Requests whose caller hung up before the answer (a webhook sender that timed out).
        self.abandoned = 0

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
                    assert outer.handler is not None, "no function behind this URL yet"
                    answer = outer.handler(event, LambdaContext(function_name, timeout_seconds))
                except Throttled:
                    answer = {"statusCode": 429, "body": json.dumps({"Message": "Rate Exceeded."})}
                except Exception as exc:  # Lambda answers 502 when the function fails
                    answer = {"statusCode": 502, "body": json.dumps({"Message": f"function error: {type(exc).__name__}"})}
                status = int(answer.get("statusCode", 200))
                payload = answer.get("body") or ""
                data = base64.b64decode(payload) if answer.get("isBase64Encoded") else str(payload).encode("utf-8")
                try:
                    self.send_response(status)
                    for name, value in (answer.get("headers") or {}).items():
                        self.send_header(name, str(value))
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    # The caller gave up waiting (fal's webhook timeout); as with Lambda, the work done stands.
                    outer.abandoned += 1

            do_GET = _invoke
            do_POST = _invoke
            do_PUT = _invoke

        self._server = QuietHTTPServer(("127.0.0.1", port), Handler)
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


def host_build_dir() -> Path:
    """The artifact built for this machine (``make build-host``)."""
    # Absolute: each function's environment mounts it from its own working directory.
    build = Path(os.environ.get("KONTEXT_BUILD_DIR") or HOST_BUILD).resolve()
    if not (build / "SharedLayer" / "python" / "kontext_s3").is_dir():
        raise RuntimeError(f"no built artifact in {build}: run `make build-host` (sam build for {platform.machine()}) first")
    return build


@dataclass
class LocalStack:
    """Everything, deployed from the template and started together: ``with LocalStack() as stack: ...``."""

    fal_key: str = "local-fal-key:local-secret"
    max_receive_count: int | None = 3
    submit_timeout_seconds: float | None = None
    webhook_attempts: int = 10
    webhook_backoff_seconds: float = 0.2
    #: The recovery function's schedule (every 5 minutes on AWS); None runs it only on demand.
    recovery_interval_seconds: float | None = 10.0
    verbose: bool = False
    template: Path | str = TEMPLATE
    #: Template parameter values beyond the local ones (``local_parameters``).
    parameters: dict[str, str] = field(default_factory=dict)
    #: What exists in the account before the stack (buckets to attach, their KMS keys): called with moto's endpoint and
    #: an administrator's credentials once moto runs, it makes them and returns parameter values that name them.
    before_deploy: Callable[[str, Credentials], dict[str, str]] | None = None
    fal_concurrency: int | None = None
    enforce_iam: bool = True
    log_dir: Path | None = None
    build_dir: Path | None = None
    #: POSTs per notification before its dead-letter queue (EventBridge's policy in the template is 185 over a day).
    notify_attempts: int = 4

    moto: MotoServer = field(init=False)
    gateway: AwsGateway = field(init=False)
    emulator: FalEmulator = field(init=False)
    resources: Resources = field(init=False)
    webhook: FunctionUrlServer = field(init=False)
    poller: SqsPoller = field(init=False)
    functions: dict[str, LocalFunction] = field(init=False)
    environment: dict[str, str] = field(init=False)
    relays: list[ApiDestinationRelay] = field(init=False, default_factory=list)

    def start(self) -> LocalStack:
        build = self.build_dir or host_build_dir()
        self.moto = MotoServer().start()
        admin = _admin(self.moto.url)
        self.gateway = AwsGateway(self.moto.url, admin=admin).start()
        self.emulator = FalEmulator(
            fal_key=self.fal_key,
            webhook_attempts=self.webhook_attempts,
            webhook_backoff_seconds=self.webhook_backoff_seconds,
            verbose=self.verbose,
            concurrency=self.fal_concurrency,
        ).start()
        self.webhook = FunctionUrlServer(timeout_seconds=60.0).start()
        cfn_preview = translate(Path(self.template) if isinstance(self.template, str) and "\n" not in self.template else self.template)
        urls = {lid: self.webhook.url for lid, res in cfn_preview["Resources"].items() if res["Type"] == "AWS::Lambda::Url"}
        url_targets = {
            _target_of(res["Properties"]["TargetFunctionArn"]): lid
            for lid, res in cfn_preview["Resources"].items()
            if res["Type"] == "AWS::Lambda::Url"
        }
        existing = self.before_deploy(self.moto.url, admin) if self.before_deploy else {}
        self.resources = provision(
            self.moto.url,
            fal_key=self.fal_key,
            max_receive_count=self.max_receive_count,
            parameters=local_parameters(self.emulator, **{**self.parameters, **existing}),
            template=self.template,
            function_urls={function: urls[url] for function, url in url_targets.items()},
            credentials=admin,
        )
        # IAM is judged by the gateway alone, with IAM's own action names: moto's authorization stays off (it maps
        # requests to actions differently from one release to the next; see aws_gateway).
        self.gateway.refuse_unknown_keys = self.enforce_iam
        self.log_dir = self.log_dir or Path(os.environ.get("KONTEXT_LOG_DIR") or (ROOT / "out" / "local-stack" / self.resources.stack.name))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        read_only = build if read_only_mounts_available() else None
        python = find_python313()
        stack = self.resources.stack
        self.functions = {}
        for logical_id, _ in stack.of_type("AWS::Lambda::Function"):
            self.functions[logical_id] = LocalFunction(
                self._spec(logical_id, build), python=python, read_only_root=read_only, echo=self.verbose
            )
        self.environment = {k: v for f in self.functions.values() for k, v in f.spec.environment.items()}
        for function in url_targets:
            self.webhook.handler = _url_invoker(self.functions[function])
        self._start_event_sources()
        return self

    def _spec(self, logical_id: str, build: Path) -> FunctionSpec:
        stack = self.resources.stack
        props = stack.properties(logical_id)
        layers = [
            str(stack.physical[lid]["SourceId"])
            for lid, _ in stack.of_type("AWS::Lambda::LayerVersion")
            if stack.ensure(lid)["Ref"] in props.get("Layers", [])
        ]
        role_arn = props["Role"]
        deployer: _Deployer = self.resources.__dict__["_deployer"]
        role_name = role_arn.rsplit("/", 1)[-1]
        statements = deployer.role_statements(role_name)
        sts = aws_session(self.resources.admin).client("sts", endpoint_url=self.gateway.url)
        name = props.get("FunctionName") or stack.ensure(logical_id)["Ref"]

        def credentials() -> dict[str, str]:
            # Each execution environment gets its own role session, as Lambda gives it.
            answer = sts.assume_role(RoleArn=role_arn, RoleSessionName=name[:64], DurationSeconds=3600)["Credentials"]
            identity = Identity(
                function=logical_id,
                principal_arn=f"arn:aws:sts::{ACCOUNT}:assumed-role/{role_name}/{name[:64]}",
                statements=statements,
                session_expires=answer["Expiration"].timestamp(),
            )
            self.gateway.add_identity(answer["AccessKeyId"], identity)
            return {
                **aws_environment(self.gateway.url, Credentials(answer["AccessKeyId"], answer["SecretAccessKey"], answer["SessionToken"])),
                "AWS_ENDPOINT_URL": self.gateway.url,
            }

        assert self.log_dir is not None
        reserved = props.get("ReservedConcurrentExecutions")
        mapping_limits = [
            int(m["ScalingConfig"]["MaximumConcurrency"])
            for lid, _ in stack.of_type("AWS::Lambda::EventSourceMapping")
            if (m := stack.properties(lid))["FunctionName"] == name and m.get("ScalingConfig")
        ]
        timeout = float(props.get("Timeout", 3))
        if logical_id == self._submit_id() and self.submit_timeout_seconds:
            timeout = self.submit_timeout_seconds
        return FunctionSpec(
            logical_id=logical_id,
            name=name,
            handler=props["Handler"],
            code_dir=build / logical_id,
            layer_dir=build / layers[0] if layers else None,
            environment={k: str(v) for k, v in props.get("Environment", {}).get("Variables", {}).items()},
            timeout_seconds=timeout,
            memory_mb=int(props.get("MemorySize", 128)),
            max_concurrency=int(reserved) if reserved else (mapping_limits[0] if mapping_limits else 10),
            credentials=credentials,
            log_path=self.log_dir / f"{logical_id}.log",
        )

    def _submit_id(self) -> str:
        stack = self.resources.stack
        for lid, _ in stack.of_type("AWS::Lambda::EventSourceMapping"):
            target = stack.properties(lid)["FunctionName"]
            for function_id, _ in stack.of_type("AWS::Lambda::Function"):
                if stack.ensure(function_id)["Ref"] == target:
                    return function_id
        return ""

    def _start_event_sources(self) -> None:
        stack = self.resources.stack
        by_name = {f.spec.name: f for f in self.functions.values()}
        by_arn = {stack.ensure(lid)["Arn"]: f for lid, f in self.functions.items()}
        for lid, _ in stack.of_type("AWS::Lambda::EventSourceMapping"):
            mapping = stack.properties(lid)
            function = by_name[mapping["FunctionName"]]
            queue = next(q for q, _ in stack.of_type("AWS::SQS::Queue") if stack.ensure(q)["Arn"] == mapping["EventSourceArn"])
            env = function.spec.credentials()  # the mapping reads the queue as the function's role
            credentials = Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN"))
            self.poller = SqsPoller(
                _invoker(function),
                endpoint=self.gateway.url,
                queue_url=stack.ensure(queue)["Ref"],
                queue_arn=mapping["EventSourceArn"],
                function_name=function.spec.name,
                timeout_seconds=function.spec.timeout_seconds,
                concurrency=function.spec.max_concurrency,
                batch_size=int(mapping.get("BatchSize", 10)),
                batching_window=float(mapping.get("MaximumBatchingWindowInSeconds", 0)),
                credentials=credentials,
                admin=self.resources.admin,
            ).start()
        deployer: _Deployer = self.resources.__dict__["_deployer"]
        sqs = aws_session(self.resources.admin).client("sqs", endpoint_url=self.moto.url)
        self.relays = [
            ApiDestinationRelay(spec, sqs, attempts=self.notify_attempts, backoff_seconds=0.2).start() for spec in deployer.relays
        ]
        self._schedule = threading.Event()
        self._recover: LocalFunction | None = None
        for lid, _ in stack.of_type("AWS::Scheduler::Schedule"):
            target = stack.properties(lid)["Target"]["Arn"]
            self._recover = by_arn[target]
        if self.recovery_interval_seconds and self._recover is not None:
            threading.Thread(target=self._recover_on_schedule, name="recovery-schedule", daemon=True).start()

    def run_recovery(self) -> dict[str, Any]:
        """Invoke the recovery function once, as its EventBridge Scheduler schedule does."""
        assert self._recover is not None, "the template has no schedule"
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
        result: dict[str, Any] = self._recover.invoke(event)
        return result

    def _recover_on_schedule(self) -> None:
        assert self.recovery_interval_seconds
        while not self._schedule.wait(self.recovery_interval_seconds):
            try:
                self.run_recovery()
            except Exception as exc:  # a failed run is retried by the next one, as with the real schedule
                print(f"warning: recovery run failed: {exc}", file=sys.stderr)

    def stop(self) -> None:
        if hasattr(self, "_schedule"):
            self._schedule.set()
        stoppers: list[Callable[[], None]] = []
        if hasattr(self, "poller"):
            stoppers.append(self.poller.stop)
        stoppers.extend(relay.stop for relay in getattr(self, "relays", []))
        stoppers.extend(f.stop for f in getattr(self, "functions", {}).values())
        for name in ("webhook", "emulator", "gateway", "moto"):
            if hasattr(self, name):
                stoppers.append(getattr(self, name).stop)
        for stopper in stoppers:
            try:
                stopper()
            except Exception as exc:  # stop the rest regardless
                print(f"warning: stopping the local stack: {exc}", file=sys.stderr)

    def cli_environment(self) -> dict[str, str]:
        """What the kontext-s3 CLI needs to work against this stack (as its administrator)."""
        return {
            **aws_environment(self.gateway.url, self.resources.admin),
            "KONTEXT_S3_BUCKET": self.resources.bucket,
            "KONTEXT_S3_TABLE": self.resources.table,
            "KONTEXT_S3_INPUT_PREFIX": self.resources.input_prefix,
            "KONTEXT_S3_OUTPUT_PREFIX": self.resources.output_prefix,
            "KONTEXT_S3_QUEUE_URL": self.resources.queue_url,
            "KONTEXT_S3_DLQ_URL": self.resources.dlq_url,
            "KONTEXT_S3_ATTACHED_BUCKETS": self.resources.stack.parameters.get("AttachedBuckets", ""),
        }

    def target(self) -> Target:
        return Target(
            bucket=self.resources.bucket,
            table=self.resources.table,
            input_prefix=self.resources.input_prefix,
            output_prefix=self.resources.output_prefix,
            endpoint_url=self.gateway.url,
            region=REGION,
            credentials=self.resources.admin,
            queue_url=self.resources.queue_url,
            dlq_url=self.resources.dlq_url,
        )

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_: object) -> None:
        self.stop()

    def client(self, service: str) -> Any:
        return aws_session(self.resources.admin).client(service, endpoint_url=self.gateway.url)  # type: ignore[call-overload]

    def accepted_requests_per_job(self) -> Counter[str]:
        """How many requests the emulator accepted (fal would bill) per job, read from their webhook URLs."""
        return Counter(r.webhook_url.rsplit("/", 1)[-1] for r in self.emulator.requests.values() if r.webhook_url)

    def jobs(self) -> JobStore:
        return JobStore(Table(self.client("dynamodb"), self.resources.table))

    def free_all_slots(self) -> int:
        """Free every admission slot: for tests that reset the emulator, after which fal holds nothing."""
        table = Table(self.client("dynamodb"), self.resources.table)
        item = table.get_item(Key=table_keys.slots()).get("Item") or {}
        table.client.delete_item(TableName=table.name, Key={table_keys.KEY: {"S": table_keys.SLOTS_ID}})
        return len(item.get("holders", ()))

    def function_log(self, logical_id: str) -> list[str]:
        return list(self.functions[logical_id].lines)

    def function_id(self, suffix: str) -> str:
        """The logical id of the function whose id starts with ``suffix`` (``submit`` -> ``SubmitFunction``)."""
        return next(lid for lid in self.functions if lid.lower().startswith(suffix.lower()))


def _target_of(reference: Any) -> str:
    """The logical id a ``Ref`` or ``Fn::GetAtt`` to a function names."""
    if "Ref" in reference:
        return str(reference["Ref"])
    return str(reference["Fn::GetAtt"][0])


def _url_invoker(function: LocalFunction) -> Handler:
    """A synchronous invocation: throttled (429 at the URL) when every environment is busy at the concurrency limit."""

    def invoke(event: dict[str, Any], context: Any) -> Any:
        return function.invoke(event, wait=False)

    return invoke


def _invoker(function: LocalFunction) -> Handler:
    def invoke(event: dict[str, Any], context: Any) -> Any:
        return function.invoke(event)

    return invoke
