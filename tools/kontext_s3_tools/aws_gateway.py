"""A front door for the moto server: every AWS call of the local stack goes through it.

It forwards each request to moto, and on the way it

* answers instead of moto when a fault rule matches (a throttled DynamoDB
  write, a failing S3 PUT), so tests can make AWS misbehave over real sockets;
* is the only judge of IAM: the calls of each function's own credentials are
  checked, action and resource ARN, against that function's role policy, with
  IAM's own action names (a HEAD of an object is ``s3:GetObject``; a tagging
  read of a version, ``s3:GetObjectVersionTagging``); a refusal is answered as
  the service answers it, and every judgement is recorded. moto runs with its
  own authorization off: its mapping of requests to actions changes between
  releases (5.2.6 asks IAM for ``s3:HeadObject``, which IAM does not have), and
  it judges DynamoDB, Secrets Manager, EventBridge and CloudWatch against ``*``;
* refuses credentials it does not know, as AWS refuses a key it never issued;
* refuses a presigned URL past its expiry, or past the expiry of the session
  that signed it, as S3 does (moto checks neither).

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
#: Services whose calls the gateway judges against the caller's role (every service the functions call).
JUDGED_SERVICES = frozenset({"s3", "sqs", "dynamodb", "secretsmanager", "events", "monitoring", "logs"})
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
    #: When it was judged (epoch seconds).
    at: float = field(default_factory=time.time)


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
        #: Refuse keys that are neither the administrator's nor a function's (the local stack turns it on).
        self.refuse_unknown_keys = False
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
        if identity is None and self.refuse_unknown_keys and not self._is_admin(call.access_key):
            return unknown_key(call)
        if identity is not None and call.service in JUDGED_SERVICES:
            for action, resource, context in judged_targets(call):
                decision = self._judge(identity, action, resource, context)
                if not decision.allowed:
                    return access_denied(identity, call, action, resource, decision)
        # moto authorizes nothing (see above): what the gateway let through goes on as it came.
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

    def _is_admin(self, access_key: str | None) -> bool:
        return self.admin is not None and access_key == self.admin.access_key

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


Target = tuple[str, str, dict[str, str]]


def judged_targets(call: Call) -> list[Target]:
    """The (IAM action, resource ARN, condition context) each call needs, as the service's authorization reads them."""
    body = call.json() or {}
    service, op = call.service, call.action
    if service == "s3":
        return s3_targets(call)
    if service == "sqs":
        return sqs_targets(call)
    if service == "dynamodb":
        if op in ("TransactWriteItems", "TransactGetItems"):
            return [
                (f"dynamodb:{_TRANSACT[kind]}", _arn("dynamodb", "table/", spec["TableName"]), {})
                for item in body.get("TransactItems", [])
                for kind, spec in item.items()
            ]
        if op in ("BatchGetItem", "BatchWriteItem"):
            actions = ["GetItem"] if op == "BatchGetItem" else ["PutItem", "DeleteItem"]
            return [(f"dynamodb:{a}", _arn("dynamodb", "table/", table), {}) for table in body.get("RequestItems", {}) for a in actions]
        table = _arn("dynamodb", "table/", str(body.get("TableName", "*")))
        if body.get("IndexName"):
            table += f"/index/{body['IndexName']}"
        return [(f"dynamodb:{op}", table, {})]
    if service == "secretsmanager":
        return [(f"secretsmanager:{op}", _arn("secretsmanager", "secret:", str(body.get("SecretId", "*"))), {})]
    if service == "events" and op == "PutEvents":
        buses = {str(entry.get("EventBusName") or "default") for entry in body.get("Entries", [])}
        return [("events:PutEvents", _arn("events", "event-bus/", bus), {}) for bus in sorted(buses)]
    if service == "logs":
        return [(f"logs:{op}", _arn("logs", "log-group:", str(body.get("logGroupName", "*"))), {})]
    return [(f"{service}:{op}", "*", {})]


#: Object sub-resources and the IAM action each method needs on them (``Version`` is inserted for a versionId).
_S3_OBJECT_SUBRESOURCES = {
    "tagging": {"GET": "GetObjectTagging", "PUT": "PutObjectTagging", "DELETE": "DeleteObjectTagging"},
    "acl": {"GET": "GetObjectAcl", "PUT": "PutObjectAcl"},
    "attributes": {"GET": "GetObjectAttributes"},
    "retention": {"GET": "GetObjectRetention", "PUT": "PutObjectRetention"},
    "legal-hold": {"GET": "GetObjectLegalHold", "PUT": "PutObjectLegalHold"},
    "restore": {"POST": "RestoreObject"},
}
#: Bucket sub-resources: ``?versions`` lists versions, ``?notification`` reads or writes the notification configuration...
_S3_BUCKET_SUBRESOURCES = {
    "versions": {"GET": "ListBucketVersions"},
    "uploads": {"GET": "ListBucketMultipartUploads"},
    "location": {"GET": "GetBucketLocation"},
    "notification": {"GET": "GetBucketNotification", "PUT": "PutBucketNotification"},
    "versioning": {"GET": "GetBucketVersioning", "PUT": "PutBucketVersioning"},
    "tagging": {"GET": "GetBucketTagging", "PUT": "PutBucketTagging", "DELETE": "PutBucketTagging"},
    "policy": {"GET": "GetBucketPolicy", "PUT": "PutBucketPolicy", "DELETE": "DeleteBucketPolicy"},
    "encryption": {"GET": "GetEncryptionConfiguration", "PUT": "PutEncryptionConfiguration"},
    "lifecycle": {"GET": "GetLifecycleConfiguration", "PUT": "PutLifecycleConfiguration"},
    "cors": {"GET": "GetBucketCORS", "PUT": "PutBucketCORS"},
    "acl": {"GET": "GetBucketAcl", "PUT": "PutBucketAcl"},
}


def s3_targets(call: Call) -> list[Target]:
    """S3's REST calls as IAM names them (the Service Authorization Reference's "Actions defined by Amazon S3").

    Path-style addresses only (what a client with an endpoint URL of ``http://127.0.0.1:port`` sends).
    """
    bucket, _, key = unquote(call.path.lstrip("/")).partition("/")
    query, method = call.query, call.method
    if not bucket:
        return [("s3:ListAllMyBuckets", "*", {})]
    bucket_arn = f"arn:aws:s3:::{bucket}"
    if key:
        resource = f"{bucket_arn}/{key}"
        versioned = "versionId" in query
        for name, actions in _S3_OBJECT_SUBRESOURCES.items():
            if name in query:
                action = actions.get(method, f"{method}Object{name.title()}")
                return [("s3:" + (action.replace("Object", "ObjectVersion", 1) if versioned else action), resource, {})]
        if "uploadId" in query or "uploads" in query:  # multipart: each step is s3:PutObject, except these two
            action = {"DELETE": "AbortMultipartUpload", "GET": "ListMultipartUploadParts"}.get(method, "PutObject")
            return [(f"s3:{action}", resource, {})]
        if method in ("GET", "HEAD"):
            return [("s3:GetObjectVersion" if versioned else "s3:GetObject", resource, {})]
        if method == "DELETE":
            return [("s3:DeleteObjectVersion" if versioned else "s3:DeleteObject", resource, {})]
        if method == "PUT":
            targets: list[Target] = [("s3:PutObject", resource, {})]
            source = next((v for k, v in call.headers.items() if k.lower() == "x-amz-copy-source"), None)
            if source:  # a copy also reads its source
                path, _, version = unquote(source).lstrip("/").partition("?versionId=")
                targets.append(("s3:GetObjectVersion" if version else "s3:GetObject", f"arn:aws:s3:::{path}", {}))
            return targets
        return [(f"s3:{method}Object", resource, {})]
    for name, actions in _S3_BUCKET_SUBRESOURCES.items():
        if name in query:
            return [("s3:" + actions.get(method, f"{method}Bucket{name.title()}"), bucket_arn, _listing_context(query))]
    if "delete" in query and method == "POST":  # DeleteObjects: each key is a DeleteObject (judged on the bucket's objects)
        return [("s3:DeleteObject", f"{bucket_arn}/*", {})]
    if method in ("GET", "HEAD"):
        return [("s3:ListBucket", bucket_arn, _listing_context(query))]
    return [({"PUT": "s3:CreateBucket", "DELETE": "s3:DeleteBucket"}.get(method, f"s3:{method}Bucket"), bucket_arn, {})]


def _listing_context(query: dict[str, list[str]]) -> dict[str, str]:
    return {"s3:prefix": query.get("prefix", [""])[0]}


#: SQS's batch calls are authorized as the single call they batch.
_SQS_ACTIONS = {
    "SendMessageBatch": "SendMessage",
    "DeleteMessageBatch": "DeleteMessage",
    "ChangeMessageVisibilityBatch": "ChangeMessageVisibility",
}


def sqs_targets(call: Call) -> list[Target]:
    """SQS calls (JSON or query protocol) on the queue they name."""
    body = call.json() if call.headers and "json" in _header(call, "content-type") else None
    fields: dict[str, Any] = (
        body if isinstance(body, dict) else {k: v[0] for k, v in parse_qs(call.body.decode("utf-8", "replace")).items()}
    )
    url = str(fields.get("QueueUrl") or call.path)
    name = str(fields.get("QueueName") or url.rstrip("/").rsplit("/", 1)[-1] or "*")
    return [(f"sqs:{_SQS_ACTIONS.get(call.action, call.action)}", _arn("sqs", "", name), {})]


def _header(call: Call, name: str) -> str:
    return next((v for k, v in call.headers.items() if k.lower() == name), "")


def access_denied(identity: Identity, call: Call, action: str, resource: str, decision: Decision) -> Answer:
    """The refusal as the service answers it: S3's XML ``AccessDenied`` (a HEAD, bare 403), or the JSON protocol's."""
    message = f"User: {identity.principal_arn} is not authorized to perform: {action} on resource: {resource} because {decision.reason}"
    if call.service == "s3":
        if call.method == "HEAD":
            return Answer(403, b"", {"Content-Type": "application/xml"})
        return s3_error(403, "AccessDenied", _xml_text(message), {})
    if call.service == "sqs" and "json" not in _header(call, "content-type"):
        body = (
            '<?xml version="1.0"?><ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>'
            f"<Message>{_xml_text(message)}</Message></Error><RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
        ).encode()
        return Answer(403, body, {"Content-Type": "text/xml"})
    body = json.dumps({"__type": "AccessDeniedException", "message": message, "Message": message}).encode()
    headers = {"Content-Type": "application/x-amz-json-1.0", "x-amzn-ErrorType": "AccessDeniedException"}
    if call.service == "sqs":  # SQS's JSON protocol names the query protocol's code too
        headers["x-amzn-query-error"] = "AccessDenied;Sender"
    return Answer(400, body, headers)


def unknown_key(call: Call) -> Answer:
    """A key this account never issued, as each protocol says so."""
    if call.service == "s3":
        return s3_error(403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.", {})
    message = "The security token included in the request is invalid."
    body = json.dumps({"__type": "UnrecognizedClientException", "message": message}).encode()
    return Answer(400, body, {"Content-Type": "application/x-amz-json-1.0", "x-amzn-ErrorType": "UnrecognizedClientException"})


def _xml_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
