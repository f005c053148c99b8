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
* judges, as S3 does, the KMS key behind an object: a judged caller that
  reads an object stored with SSE-KMS under a customer managed key (GET or
  HEAD, a presigned GET, the source of a copy or of a part copy) also needs
  ``kms:Decrypt`` on that key, and one that writes an object S3 encrypts under
  such a key (PUT, a presigned PUT, a copy's destination, CreateMultipartUpload:
  the key the request names in ``x-amz-server-side-encryption-aws-kms-key-id``,
  else the bucket's default encryption) needs ``kms:GenerateDataKey`` on it, and
  ``kms:Decrypt`` for each part (UploadPart, UploadPartCopy). The refusal is S3's
  403 ``AccessDenied`` naming the KMS action and the key's ARN (a HEAD, a bare
  403). Objects under SSE-S3 or the AWS managed key (``aws/s3``, whose key
  policy lets the account's S3 callers use it) ask nothing of KMS. A read is
  judged on the key moto's answer names (no extra request); a copy's source is
  looked up with a HEAD first, and a write reads the bucket's default
  encryption (``GET ?encryption``, kept a couple of seconds per bucket, and
  forgotten when a call through the gateway changes it). Key ids and aliases are
  judged as their key's ARN. moto's KMS keys are not consulted otherwise: a key
  policy that refuses, or a disabled key, is not modelled;
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
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

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
#: The reason :func:`evaluate` gives when nothing allows a call (said as IAM says it, naming the action).
NO_ALLOW = "no identity-based policy allows it"
#: How long the gateway trusts what it read of a bucket's default encryption (calls straight to moto can change it).
BUCKET_ENCRYPTION_SECONDS = 2.0
_SSE = "x-amz-server-side-encryption"
_SSE_KEY = "x-amz-server-side-encryption-aws-kms-key-id"
_SIGV4_FOR_KMS = "Requests specifying Server Side Encryption with AWS KMS managed keys require AWS Signature Version 4."
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
        #: bucket -> (until, its default customer managed KMS key's ARN or None); alias -> (until, key ARN).
        self._bucket_keys: dict[str, tuple[float, str | None]] = {}
        self._aliases: dict[str, tuple[float, str]] = {}
        #: Multipart uploads created through the gateway -> the KMS key their parts are encrypted under.
        self._upload_keys: dict[str, str | None] = {}
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
        upload_key: str | None = None
        if identity is not None and call.service in JUDGED_SERVICES:
            for action, resource, context in judged_targets(call):
                decision = self._judge(identity, action, resource, context)
                if not decision.allowed:
                    return access_denied(identity, call, action, resource, decision)
            if call.service == "s3":
                refusal, upload_key = self._judge_kms_before(call, identity)
                if refusal is not None:
                    return refusal
        if call.service == "s3" and "encryption" in call.query and method in ("PUT", "DELETE"):
            self._forget_bucket_key(call)
        # moto authorizes nothing (see above): what the gateway let through goes on as it came.
        answer = self.forward(method, target, headers, body)
        if call.service == "s3" and "encryption" in call.query and method in ("PUT", "DELETE"):
            self._forget_bucket_key(call)
        if identity is not None and call.service == "s3":
            if answer.status == 404 and method in ("GET", "HEAD"):
                return self._hide_absence(call, identity, answer)
            if _reads_object(call):
                refusal = self._judge_kms_read(call, identity, answer)
                if refusal is not None:
                    return refusal
            if method == "POST" and "uploads" in call.query and answer.status == 200:
                self._remember_upload(answer, upload_key)
        if "uploadId" in call.query and method in ("POST", "DELETE") and answer.status in (200, 204):
            with self._lock:  # completed or aborted: no more parts
                self._upload_keys.pop(call.query["uploadId"][0], None)
        return answer

    # -- KMS, as S3 asks it of the caller ----------------------------------------------------------

    def _judge_kms_before(self, call: Call, identity: Identity) -> tuple[Answer | None, str | None]:
        """The KMS permissions a write or copy needs, judged before moto does it; and a new upload's key."""
        bucket, _, key = unquote(call.path.lstrip("/")).partition("/")
        if not key or any(name in call.query for name in _S3_OBJECT_SUBRESOURCES):
            return None, None
        needs: list[tuple[str, str]] = []
        upload_key = None
        if call.method == "POST" and "uploads" in call.query:  # CreateMultipartUpload
            upload_key = self._write_key(bucket, call.headers)
            needs.append(("kms:GenerateDataKey", upload_key or ""))
        elif call.method == "PUT" and "uploadId" in call.query:  # UploadPart, UploadPartCopy
            upload_id = call.query["uploadId"][0]
            with self._lock:
                known = upload_id in self._upload_keys
                part_key = self._upload_keys.get(upload_id)
            needs.append(("kms:Decrypt", (part_key if known else self._bucket_key(bucket)) or ""))
        elif call.method == "PUT":  # PutObject, or CopyObject's destination
            needs.append(("kms:GenerateDataKey", self._write_key(bucket, call.headers) or ""))
        source = _copy_source(call)
        if source is not None and call.method == "PUT":
            needs.append(("kms:Decrypt", self._object_key(*source) or ""))
        for action, key_arn in needs:
            if key_arn:
                refusal = self._judge_kms(call, identity, action, key_arn, f"arn:aws:s3:::{bucket}/{key}")
                if refusal is not None:
                    return refusal, None
        return None, upload_key

    def _judge_kms_read(self, call: Call, identity: Identity | None, answer: Answer) -> Answer | None:
        """A read of an SSE-KMS object, judged on the key moto's answer names (the object is read, not changed)."""
        if answer.status not in (200, 206):
            return None
        sent = {k.lower(): v for k, v in answer.headers.items()}
        if not sent.get(_SSE, "").startswith("aws:kms"):
            return None
        if call.presigned and "X-Amz-Date" not in call.query:  # SigV2: S3 refuses it for any SSE-KMS object, whoever signed
            if call.method == "HEAD":
                return Answer(400, b"", {"Content-Type": "application/xml"})
            return s3_error(400, "InvalidArgument", _SIGV4_FOR_KMS, {"ArgumentName": "Authorization", "ArgumentValue": "null"})
        key_id = sent.get(_SSE_KEY)
        if identity is None or not key_id or self._is_aws_managed(key_id):
            return None
        resource = "arn:aws:s3:::" + unquote(call.path.lstrip("/"))
        return self._judge_kms(call, identity, "kms:Decrypt", self._key_arn(key_id), resource)

    def _judge_kms(self, call: Call, identity: Identity, action: str, key_arn: str, object_arn: str) -> Answer | None:
        context = {
            "kms:ViaService": f"s3.{REGION}.amazonaws.com",
            "kms:CallerAccount": ACCOUNT,
            "kms:EncryptionContext:aws:s3:arn": object_arn,
        }
        decision = self._judge(identity, action, key_arn, context)
        if decision.allowed:
            return None
        return access_denied(identity, call, action, key_arn, decision)

    def _write_key(self, bucket: str, headers: dict[str, str]) -> str | None:
        """The customer managed key S3 encrypts a new object under: the request's, else the bucket default's."""
        sent = {k.lower(): v for k, v in headers.items()}
        if "x-amz-server-side-encryption-customer-algorithm" in sent:
            return None  # SSE-C: the caller's own key
        algorithm = sent.get(_SSE)
        if algorithm is not None and not algorithm.startswith("aws:kms"):
            return None  # AES256 asked for, whatever the bucket's default
        key_id = sent.get(_SSE_KEY)
        if key_id:
            return None if self._is_aws_managed(key_id) else self._key_arn(key_id)
        # No key named: the bucket default's key (which moto stores, and reads are judged on), if it has one.
        return self._bucket_key(bucket)

    def _bucket_key(self, bucket: str) -> str | None:
        now = time.monotonic()
        with self._lock:
            cached = self._bucket_keys.get(bucket)
        if cached is not None and cached[0] > now:
            return cached[1]
        answer = self._signed_forward("GET", f"/{quote(bucket)}?encryption=", {}, b"", "s3")
        key_arn = None
        if answer.status == 200:
            text = answer.body.decode("utf-8", "replace")
            algorithm = re.search(r"<SSEAlgorithm>([^<]+)</SSEAlgorithm>", text)
            key_id = re.search(r"<KMSMasterKeyID>([^<]+)</KMSMasterKeyID>", text)
            if algorithm and algorithm.group(1).startswith("aws:kms") and key_id and not self._is_aws_managed(key_id.group(1)):
                key_arn = self._key_arn(key_id.group(1))
        with self._lock:
            self._bucket_keys[bucket] = (now + BUCKET_ENCRYPTION_SECONDS, key_arn)
        return key_arn

    def _forget_bucket_key(self, call: Call) -> None:
        with self._lock:
            self._bucket_keys.pop(unquote(call.path.lstrip("/")).partition("/")[0], None)

    def _object_key(self, bucket: str, key: str, version: str) -> str | None:
        """The customer managed key an object is stored under, from a HEAD of it (``None``: not SSE-KMS, or gone)."""
        target = f"/{quote(bucket)}/{quote(key, safe='/~')}" + (f"?versionId={quote(version)}" if version else "")
        answer = self._signed_forward("HEAD", target, {}, b"", "s3")
        sent = {k.lower(): v for k, v in answer.headers.items()}
        key_id = sent.get(_SSE_KEY)
        if answer.status != 200 or not sent.get(_SSE, "").startswith("aws:kms") or not key_id or self._is_aws_managed(key_id):
            return None
        return self._key_arn(key_id)

    def _remember_upload(self, answer: Answer, key_arn: str | None) -> None:
        found = re.search(rb"<UploadId>([^<]+)</UploadId>", answer.body)
        if found:
            with self._lock:
                self._upload_keys[found.group(1).decode()] = key_arn

    @staticmethod
    def _is_aws_managed(key_id: str) -> bool:
        return key_id == "alias/aws/s3" or key_id.endswith(":alias/aws/s3")

    def _key_arn(self, key_id: str) -> str:
        """A key id, key ARN, alias or alias ARN as the ARN of its key (what IAM judges KMS calls on)."""
        if key_id.startswith("arn:") and ":key/" in key_id:
            return key_id
        if key_id.startswith("alias/") or ":alias/" in key_id:
            return self._alias_target(key_id)
        return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"

    def _alias_target(self, alias: str) -> str:
        now = time.monotonic()
        with self._lock:
            cached = self._aliases.get(alias)
        if cached is not None and cached[0] > now:
            return cached[1]
        body = json.dumps({"KeyId": alias}).encode()
        headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.DescribeKey"}
        answer = self._signed_forward("POST", "/", headers, body, "kms")
        try:
            key_arn = str(json.loads(answer.body)["KeyMetadata"]["Arn"])
        except (ValueError, KeyError, TypeError):  # no such alias: judged on the alias's own ARN
            key_arn = alias if alias.startswith("arn:") else f"arn:aws:kms:{REGION}:{ACCOUNT}:{alias}"
        with self._lock:
            self._aliases[alias] = (now + BUCKET_ENCRYPTION_SECONDS, key_arn)
        return key_arn

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
            if call.method == "PUT":
                refusal, _ = self._judge_kms_before(call, identity)
                if refusal is not None:
                    return refusal
        kept = {
            k: v for k, v in query.items() if not k.lower().startswith("x-amz-") and k not in ("AWSAccessKeyId", "Signature", "Expires")
        }
        target = call.path + (f"?{urlencode(kept)}" if kept else "")
        answer = self._signed_forward(call.method, target, {}, b"", "s3")
        if _reads_object(call):
            refusal = self._judge_kms_read(call, identity, answer)
            if refusal is not None:
                return refusal
        return answer

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
            source = _copy_source(call)
            if source:  # a copy also reads its source
                source_bucket, source_key, version = source
                action = "s3:GetObjectVersion" if version else "s3:GetObject"
                targets.append((action, f"arn:aws:s3:::{source_bucket}/{source_key}", {}))
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


def _copy_source(call: Call) -> tuple[str, str, str] | None:
    """A copy's (or part copy's) source: bucket, key and version (``""`` for the current one)."""
    source = _header(call, "x-amz-copy-source")
    if not source:
        return None
    path, _, version = unquote(source).lstrip("/").partition("?versionId=")
    bucket, _, key = path.partition("/")
    return bucket, key, version


def _reads_object(call: Call) -> bool:
    """A GET or HEAD of an object's content (not of its tags, ACL, attributes ... nor a multipart listing)."""
    _, _, key = call.path.lstrip("/").partition("/")
    if not key or call.method not in ("GET", "HEAD"):
        return False
    return not any(name in call.query for name in (*_S3_OBJECT_SUBRESOURCES, "uploadId", "uploads"))


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
    reason = f"no identity-based policy allows the {action} action" if decision.reason == NO_ALLOW else decision.reason
    message = f"User: {identity.principal_arn} is not authorized to perform: {action} on resource: {resource} because {reason}"
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
