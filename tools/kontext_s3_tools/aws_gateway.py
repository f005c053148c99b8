"""A front door for the moto server: every AWS call of the local stack goes through it.

It forwards each request to moto, and on the way it

* answers instead of moto when a fault rule matches (a throttled DynamoDB
  write, a failing S3 PUT), so tests can make AWS misbehave over real sockets;
* judges the calls of each function's own credentials where moto cannot
  (moto enforces IAM per resource for S3 and SQS only, and judges DynamoDB,
  Secrets Manager, EventBridge and CloudWatch against ``*``): the action and
  resource ARN of each call are checked against that function's role policy,
  a refusal is answered as AWS answers it (``AccessDeniedException`` naming
  the action and resource), and every judgement is recorded;
* refuses a presigned URL past its expiry, or past the expiry of the session
  that signed it, as S3 does (moto checks neither).

What it lets through to moto for a judged service it signs again with the
stack's admin credentials, since moto would refuse any resource-scoped policy.
The functions talk to it through ``AWS_ENDPOINT_URL`` exactly as they would
talk to AWS, so presigned URLs they make point at it too.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import httpx
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from kontext_s3_tools.http_server import QuietHTTPServer
from kontext_s3_tools.iam_policy import Decision, evaluate
from kontext_s3_tools.template_model import ACCOUNT, REGION

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request")
#: Services whose calls the gateway judges itself (moto judges them against "*").
JUDGED_SERVICES = frozenset({"dynamodb", "secretsmanager", "events", "monitoring", "logs"})
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization", "proxy-authenticate"}


@dataclass(frozen=True)
class Call:
    """One AWS request, as the gateway understood it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    service: str
    action: str
    access_key: str | None
    presigned: bool

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            return None


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


FaultRule = Callable[[Call], Answer | None]


@dataclass(frozen=True)
class Identity:
    """A function's credentials, as the gateway knows them."""

    function: str
    principal_arn: str
    statements: list[dict[str, Any]]
    session_expires: float


@dataclass(frozen=True)
class Judgement:
    function: str
    action: str
    resource: str
    allowed: bool
    reason: str


def dynamodb_error(code: str, message: str, status: int = 400) -> Answer:
    """An error as DynamoDB's JSON protocol answers it."""
    body = json.dumps({"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message}).encode()
    return Answer(status, body, {"Content-Type": "application/x-amz-json-1.0", "x-amzn-ErrorType": code})


def parse_call(method: str, target: str, headers: dict[str, str], body: bytes) -> Call:
    url = urlsplit(target)
    query = parse_qs(url.query, keep_blank_values=True)
    lowered = {k.lower(): v for k, v in headers.items()}
    credential = _CREDENTIAL.search(lowered.get("authorization", "")) or _CREDENTIAL.search(
        "Credential=" + unquote(query.get("X-Amz-Credential", [""])[0])
    )
    service = credential.group(4) if credential else ""
    amz_target = lowered.get("x-amz-target", "")
    form = parse_qs(body.decode("utf-8", "replace")) if "x-www-form-urlencoded" in lowered.get("content-type", "") else {}
    if amz_target:
        action = amz_target.rsplit(".", 1)[-1]
    elif "Action" in query:
        action = query["Action"][0]
    elif "Action" in form:
        action = form["Action"][0]
    else:
        action = f"{method} {url.path}"
    return Call(
        method=method,
        path=url.path,
        query=query,
        headers=headers,
        body=body,
        service=service or ("s3" if not amz_target else ""),
        action=action,
        access_key=credential.group(1) if credential else (query.get("AWSAccessKeyId", [None])[0]),
        presigned="X-Amz-Signature" in query or "Signature" in query,
    )


class AwsGateway:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0, admin: Credentials | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.admin = admin
        self.identities: dict[str, Identity] = {}
        self.judgements: list[Judgement] = []
        self.calls: list[Call] = []
        self.record = False
        self._faults: list[FaultRule] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=120.0, limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self._server = QuietHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._server.request_queue_size = 128
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="aws-gateway", daemon=True)

    def start(self) -> AwsGateway:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def add_fault(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self._faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def recorded(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def add_identity(self, access_key: str, identity: Identity) -> None:
        with self._lock:
            self.identities[access_key] = identity

    def recorded_judgements(self) -> list[Judgement]:
        with self._lock:
            return list(self.judgements)

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        call = parse_call(method, target, headers, body)
        with self._lock:
            faults = list(self._faults)
            if self.record:
                self.calls.append(call)
            identity = self.identities.get(call.access_key or "")
        for rule in faults:
            answer = rule(call)
            if answer is not None:
                return answer
        if call.presigned:
            return self._presigned(call, identity)
        if identity is not None and call.service in JUDGED_SERVICES:
            for action, resource in judged_targets(call):
                decision = self._judge(identity, action, resource)
                if not decision.allowed:
                    return access_denied(identity, action, resource, decision)
            return self._forward_as_admin(call)
        answer = self.forward(method, target, headers, body)
        if identity is not None and call.service == "s3" and answer.status == 404 and method in ("GET", "HEAD"):
            return self._hide_absence(call, identity, answer)
        return answer

    def _hide_absence(self, call: Call, identity: Identity, answer: Answer) -> Answer:
        """S3 tells "no such key" (404) only to a caller allowed ``s3:ListBucket`` on the bucket; others get 403.

        moto always answers 404, so a role that lacks ListBucket would pass here and fail on AWS
        at the first key that does not exist (a folder with no recipe, say).
        """
        bucket, _, key = unquote(call.path.lstrip("/")).partition("/")
        if not key:
            return answer
        if self._judge(identity, "s3:ListBucket", f"arn:aws:s3:::{bucket}").allowed:
            return answer
        if call.method == "HEAD":
            return Answer(403, b"", {"Content-Type": "application/xml"})
        return s3_error(403, "AccessDenied", "Access Denied", {})

    def _judge(self, identity: Identity, action: str, resource: str, context: dict[str, str] | None = None) -> Decision:
        decision = evaluate(identity.statements, action, resource, context)
        with self._lock:
            self.judgements.append(Judgement(identity.function, action, resource, decision.allowed, decision.reason))
        return decision

    def _presigned(self, call: Call, identity: Identity | None) -> Answer:
        """A presigned S3 URL: refused past its own expiry or its session's, judged, then passed on (moto cannot read them)."""
        query = {k: v[0] for k, v in call.query.items()}
        now = time.time()
        if "X-Amz-Date" in query:  # SigV4: signed at X-Amz-Date, for X-Amz-Expires seconds
            signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
            expires = signed + int(query.get("X-Amz-Expires", "604800"))
            extra = {"X-Amz-Expires": query.get("X-Amz-Expires", ""), "Expires": _iso(expires), "ServerTime": _iso(now)}
        else:  # SigV2: Expires is the epoch second it ends
            expires = float(query.get("Expires", "inf"))
            extra = {"Expires": _iso(expires) if expires != float("inf") else "", "ServerTime": _iso(now)}
        if now > expires:
            return s3_error(403, "AccessDenied", "Request has expired", extra)
        if identity is not None:
            if now > identity.session_expires:
                return s3_error(400, "ExpiredToken", "The provided token has expired.", {})
            bucket, _, key = unquote(call.path.lstrip("/")).partition("/")
            action = "s3:GetObjectVersion" if "versionId" in query else "s3:GetObject"
            decision = self._judge(identity, action, f"arn:aws:s3:::{bucket}/{key}")
            if not decision.allowed:
                return s3_error(403, "AccessDenied", "Access Denied", {})
        kept = {
            k: v for k, v in query.items() if not k.lower().startswith("x-amz-") and k not in ("AWSAccessKeyId", "Signature", "Expires")
        }
        target = call.path + (f"?{urlencode(kept)}" if kept else "")
        return self._signed_forward(call.method, target, {}, b"", "s3")

    def _forward_as_admin(self, call: Call) -> Answer:
        target = call.path + (f"?{urlencode(call.query, doseq=True)}" if call.query else "")
        keep = {k: v for k, v in call.headers.items() if k.lower() in ("content-type", "x-amz-target", "accept", "x-amz-json-1.0")}
        return self._signed_forward(call.method, target, keep, call.body, call.service)

    def _signed_forward(self, method: str, target: str, headers: dict[str, str], body: bytes, service: str) -> Answer:
        if self.admin is None:
            raise RuntimeError("the gateway has no admin credentials to pass a judged call on with")
        request = AWSRequest(method=method, url=self.upstream + target, data=body, headers=headers)
        (S3SigV4Auth if service == "s3" else SigV4Auth)(self.admin, service, REGION).add_auth(request)
        return self.forward(method, target, dict(request.headers.items()), body)

    def forward(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        response = self._client.request(method, self.upstream + target, headers=sent, content=body)
        dropped = _HOP_BY_HOP | {"content-encoding"} | ({"content-length"} if method != "HEAD" else set())
        out = {k: v for k, v in response.headers.items() if k.lower() not in dropped}
        return Answer(response.status_code, response.content, out)


def _arn(service: str, kind: str, name: str) -> str:
    return name if name.startswith("arn:") else f"arn:aws:{service}:{REGION}:{ACCOUNT}:{kind}{name}"


_TRANSACT = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem", "ConditionCheck": "ConditionCheckItem", "Get": "GetItem"}


def judged_targets(call: Call) -> list[tuple[str, str]]:
    """The (IAM action, resource ARN) pairs one call needs, as the service's authorization reads them."""
    body = call.json() or {}
    service, op = call.service, call.action
    if service == "dynamodb":
        if op in ("TransactWriteItems", "TransactGetItems"):
            return [
                (f"dynamodb:{_TRANSACT[kind]}", _arn("dynamodb", "table/", spec["TableName"]))
                for item in body.get("TransactItems", [])
                for kind, spec in item.items()
            ]
        if op in ("BatchGetItem", "BatchWriteItem"):
            actions = ["GetItem"] if op == "BatchGetItem" else ["PutItem", "DeleteItem"]
            return [(f"dynamodb:{a}", _arn("dynamodb", "table/", table)) for table in body.get("RequestItems", {}) for a in actions]
        table = _arn("dynamodb", "table/", str(body.get("TableName", "*")))
        if body.get("IndexName"):
            table += f"/index/{body['IndexName']}"
        return [(f"dynamodb:{op}", table)]
    if service == "secretsmanager":
        return [(f"secretsmanager:{op}", _arn("secretsmanager", "secret:", str(body.get("SecretId", "*"))))]
    if service == "events" and op == "PutEvents":
        buses = {str(entry.get("EventBusName") or "default") for entry in body.get("Entries", [])}
        return [("events:PutEvents", _arn("events", "event-bus/", bus)) for bus in sorted(buses)]
    if service == "logs":
        return [(f"logs:{op}", _arn("logs", "log-group:", str(body.get("logGroupName", "*"))))]
    return [(f"{service}:{op}", "*")]


def access_denied(identity: Identity, action: str, resource: str, decision: Decision) -> Answer:
    """The refusal AWS's JSON-protocol services answer."""
    message = f"User: {identity.principal_arn} is not authorized to perform: {action} on resource: {resource} because {decision.reason}"
    body = json.dumps({"__type": "AccessDeniedException", "message": message, "Message": message}).encode()
    return Answer(400, body, {"Content-Type": "application/x-amz-json-1.0", "x-amzn-ErrorType": "AccessDeniedException"})


def s3_error(status: int, code: str, message: str, extra: dict[str, str]) -> Answer:
    fields = "".join(f"<{k}>{v}</{k}>" for k, v in extra.items())
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>{fields}'
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    ).encode()
    return Answer(status, body, {"Content-Type": "application/xml"})


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _handler(gateway: AwsGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                answer = gateway.handle(self.command, self.path, dict(self.headers.items()), body)
            except httpx.HTTPError as exc:
                answer = Answer(502, f"gateway: moto unreachable: {exc}".encode())
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            if self.command != "HEAD" or "content-length" not in {k.lower() for k in answer.headers}:
                self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)

        do_GET = _serve
        do_PUT = _serve
        do_POST = _serve
        do_DELETE = _serve
        do_HEAD = _serve

    return Handler
