"""A front door for the moto server: every AWS call of the local stack goes through it.

It forwards each request to moto unchanged, and on the way it can

* record the call: which service and action, on which resource, by which
  credentials (the access key id of the SigV4 signature);
* answer instead of moto, when a fault rule matches (a throttled DynamoDB
  write, a failing S3 PUT), so tests can make AWS misbehave over real sockets.

The functions talk to it through ``AWS_ENDPOINT_URL`` exactly as they would
talk to AWS, so presigned URLs they make point at it too.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request")
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
    service = credential.group(3) if credential else ""
    amz_target = lowered.get("x-amz-target", "")
    if amz_target:
        action = amz_target.rsplit(".", 1)[-1]
    elif "Action" in query:
        action = query["Action"][0]
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
        access_key=credential.group(1) if credential else None,
        presigned="X-Amz-Signature" in query or "Signature" in query,
    )


class AwsGateway:
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.calls: list[Call] = []
        self.record = False
        self._faults: list[FaultRule] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=120.0, limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self._server = ThreadingHTTPServer((host, port), _handler(self))
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

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        call = parse_call(method, target, headers, body)
        with self._lock:
            faults = list(self._faults)
            if self.record:
                self.calls.append(call)
        for rule in faults:
            answer = rule(call)
            if answer is not None:
                return answer
        return self.forward(method, target, headers, body)

    def forward(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        response = self._client.request(method, self.upstream + target, headers=sent, content=body)
        dropped = _HOP_BY_HOP | {"content-encoding"} | ({"content-length"} if method != "HEAD" else set())
        out = {k: v for k, v in response.headers.items() if k.lower() not in dropped}
        return Answer(response.status_code, response.content, out)


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
