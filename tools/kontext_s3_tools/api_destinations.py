"""A stand-in for EventBridge API destinations, which moto stores but never calls.

The local stack gives a rule's API-destination target a relay queue instead
(moto delivers matching events to SQS), and :class:`ApiDestinationRelay` does
what EventBridge does with each event: applies the target's ``InputPath``,
POSTs it with the connection's credential (API key header or basic auth) and a
5 s timeout, retries what EventBridge retries (timeouts, connection errors,
401, 407, 409, 429 and 5xx) with backoff, and puts what it could not deliver
in the target's dead-letter queue with ``ERROR_CODE`` / ``ERROR_MESSAGE``
attributes. Retries are fewer and faster than the template's policy (185
attempts over a day), so a test sees the dead-letter queue in seconds.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

#: Statuses EventBridge retries for an API destination; any other non-2xx goes to the dead-letter queue at once.
RETRIED = {401, 407, 409, 429}
TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class RelaySpec:
    rule_arn: str
    target_arn: str
    queue_url: str
    endpoint: str
    method: str
    headers: dict[str, str]
    input_path: str | None
    dead_letter_arn: str | None


def connection_headers(authorization_type: str, auth: dict[str, Any]) -> dict[str, str]:
    """The header(s) a connection adds to each call."""
    if authorization_type == "API_KEY":
        params = auth["ApiKeyAuthParameters"]
        return {params["ApiKeyName"]: params["ApiKeyValue"]}
    if authorization_type == "BASIC":
        params = auth["BasicAuthParameters"]
        token = base64.b64encode(f"{params['Username']}:{params['Password']}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    raise NotImplementedError(f"connection authorization {authorization_type} is not emulated")


def apply_input_path(event: dict[str, Any], path: str | None) -> Any:
    """``$`` or ``$.a.b``: the JSONPath forms the template uses."""
    if not path or path == "$":
        return event
    value: Any = event
    for part in path.removeprefix("$.").split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


@dataclass
class ApiDestinationRelay:
    spec: RelaySpec
    sqs: Any
    attempts: int = 4
    backoff_seconds: float = 0.2
    #: Each POST made: (status or error, body) - for tests and tools.
    posts: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ApiDestinationRelay:
        self._thread = threading.Thread(target=self._loop, name="api-destination", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False) as http:
            while not self._stop.is_set():
                try:
                    messages = self.sqs.receive_message(QueueUrl=self.spec.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
                except Exception:  # the moto server is stopping
                    time.sleep(0.2)
                    continue
                for message in messages.get("Messages", []):
                    try:
                        self._deliver(http, json.loads(message["Body"]))
                        self.sqs.delete_message(QueueUrl=self.spec.queue_url, ReceiptHandle=message["ReceiptHandle"])
                    except Exception as exc:  # one bad message must not stop the relay; SQS brings it back
                        print(f"warning: notification relay: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _deliver(self, http: httpx.Client, event: dict[str, Any]) -> None:
        body = json.dumps(apply_input_path(event, self.spec.input_path))
        headers = {"Content-Type": "application/json; charset=utf-8", **self.spec.headers}
        code, message, attempt = "", "", 0
        for attempt in range(max(1, self.attempts)):
            try:
                response = http.request(self.spec.method, self.spec.endpoint, content=body, headers=headers)
            except httpx.HTTPError as exc:
                code, message = "SDK_CLIENT_ERROR", f"{type(exc).__name__}: {exc}"
                self.posts.append({"error": message, "body": body})
            else:
                self.posts.append({"status": response.status_code, "body": body})
                if 200 <= response.status_code < 300:
                    return
                code, message = f"{response.status_code}", response.text[:256]
                if response.status_code not in RETRIED and response.status_code < 500:
                    break
            if attempt + 1 < self.attempts:
                time.sleep(self.backoff_seconds * 2**attempt)
        self._dead_letter(event, code, message, attempt + 1)

    def _dead_letter(self, event: dict[str, Any], code: str, message: str, attempts: int) -> None:
        if not self.spec.dead_letter_arn:
            return  # as on AWS: without a dead-letter queue the event is dropped
        queue_name = self.spec.dead_letter_arn.rsplit(":", 1)[-1]
        url = self.sqs.get_queue_url(QueueName=queue_name)["QueueUrl"]

        def attribute(value: str) -> dict[str, str]:
            return {"DataType": "String", "StringValue": value or "-"}

        self.sqs.send_message(
            QueueUrl=url,
            MessageBody=json.dumps(event),
            MessageAttributes={
                "ERROR_CODE": attribute(code),
                "ERROR_MESSAGE": attribute(message),
                "RETRY_ATTEMPTS": attribute(str(attempts - 1)),
                "RULE_ARN": attribute(self.spec.rule_arn),
                "TARGET_ARN": attribute(self.spec.target_arn),
            },
        )
