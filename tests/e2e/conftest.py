"""The end-to-end tests share one local stack: moto server, fal emulator, both handlers, and a notification receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kontext_s3_tools.local_stack import LocalStack


@dataclass
class NotificationReceiver:
    """A consumer's HTTP endpoint: records each POST; can be told to answer some with an error."""

    posts: list[dict[str, Any]] = field(default_factory=list)
    #: job id -> statuses to answer, in order, before 200 (e.g. [503] fails the first try).
    answers: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> NotificationReceiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                document = json.loads(body)
                with outer.lock:
                    planned = outer.answers.get(document.get("job_id"), [])
                    status = planned.pop(0) if planned else 200
                    outer.posts.append({"body": document, "headers": dict(self.headers), "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/kontext"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def received(self, job_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for p in self.posts if p["body"].get("job_id") == job_id]


@pytest.fixture(scope="package")
def receiver() -> Iterator[NotificationReceiver]:
    server = NotificationReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def running_stack(receiver: NotificationReceiver) -> Iterator[LocalStack]:
    stack = LocalStack(
        max_receive_count=3,
        submit_timeout_seconds=8.0,
        # NotifyUrl is https-only in the template; the local stack's relay takes the local receiver as it is.
        # TagWaitSeconds: long enough to tag an upload 30 s after it, short enough to see the error record after.
        parameters={"SubmitMaxConcurrency": "2", "NotifyUrl": receiver.url, "TagWaitSeconds": "40"},
        # fal retries a webhook for a long while; here 8 attempts from 0.1 s, doubling (about 25 s in all), so a
        # delivery refused with 409 while a concurrent one finishes the job lands on a slow machine too.
        webhook_attempts=8,
        webhook_backoff_seconds=0.1,
    ).start()
    yield stack
    stack.stop()


@pytest.fixture
def stack(running_stack: LocalStack) -> LocalStack:
    running_stack.emulator.reset()
    running_stack.free_all_slots()  # fal forgot every request: none holds a slot any more
    return running_stack
