"""Helpers the tests share: AWS access to the moto server, test images, invoking handlers."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import ModuleType
from typing import Any

from PIL import Image

from kontext_s3.admission import DISPATCH
from kontext_s3.dynamo import Table
from kontext_s3_tools.local_stack import LambdaContext, Resources, aws_session, sqs_event

FAL_KEY = "test-key-id:test-key-secret"


@dataclass
class Aws:
    endpoint: str
    resources: Resources

    def client(self, service: str) -> Any:
        return aws_session().client(service, endpoint_url=self.endpoint)  # type: ignore[call-overload]

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    def table(self) -> Any:
        # The same plain-value table the functions use (kontext_s3.dynamo), over the low-level client.
        return Table(self.client("dynamodb"), self.resources.table)

    def receive(self, queue_url: str | None = None, wait: int = 2, visibility: int | None = None) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "QueueUrl": queue_url or self.resources.queue_url,
            "MaxNumberOfMessages": 10,
            "WaitTimeSeconds": wait,
            "MessageSystemAttributeNames": ["All"],
        }
        if visibility is not None:
            kwargs["VisibilityTimeout"] = visibility
        return list(self.sqs.receive_message(**kwargs).get("Messages", []))

    def drain_test_event(self, timeout: float = 5.0) -> None:
        """Delete the s3:TestEvent S3 sent when the notification was configured."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.receive(wait=1):
                if json.loads(message["Body"]).get("Event") == "s3:TestEvent":
                    self.sqs.delete_message(QueueUrl=self.resources.queue_url, ReceiptHandle=message["ReceiptHandle"])
                    return
                self.sqs.change_message_visibility(
                    QueueUrl=self.resources.queue_url, ReceiptHandle=message["ReceiptHandle"], VisibilityTimeout=0
                )
        raise AssertionError("S3 sent no s3:TestEvent")

    def upload_events(self, expected: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Receive the messages S3 sent for ``expected`` uploads."""
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            found.extend(self.receive(wait=1))
        assert len(found) == expected, f"expected {expected} S3 event(s), got {len(found)}"
        return found

    def job_events(self) -> list[dict[str, Any]]:
        """The EventBridge job events the stack published (the test rule sends them to a queue)."""
        found: list[dict[str, Any]] = []
        for _ in range(3):
            batch = self.receive(self.resources.events_queue_url, wait=1)
            found.extend(json.loads(m["Body"]) for m in batch)
            if not batch and found:
                break
        return found

    def get_json(self, key: str) -> Any:
        return json.loads(self.s3.get_object(Bucket=self.resources.bucket, Key=key)["Body"].read())

    def keys(self, prefix: str) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=self.resources.bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))


def eventually(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """``check()``'s first truthy value, polled until ``timeout``; an AssertionError naming ``what`` after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def dispatch_signal() -> dict[str, Any]:
    """The uploads queue's message that tells the submit function a slot is free (as the webhook sends it)."""
    return {"MessageId": "dispatch", "ReceiptHandle": "r", "Body": json.dumps(DISPATCH), "Attributes": {"ApproximateReceiveCount": "1"}}


def jpeg_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (20, 120, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def invoke_sqs(module: ModuleType, messages: list[dict[str, Any]], queue_arn: str, timeout: float = 20.0) -> dict[str, Any]:
    response = module.lambda_handler(sqs_event(messages, queue_arn), LambdaContext("submit", timeout))
    assert isinstance(response, dict)
    return response


class RecordingServer:
    """An HTTP server that answers 200 to anything and remembers every request (to prove none came)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.paths: list[str] = []
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.paths.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    outer.bodies.append(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def s3_error_endpoint(status: int, code: str, message: str) -> Iterator[str]:
    """An endpoint that answers every request as S3 answers with this error (an expired token, a refused call)."""
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>1</RequestId></Error>'

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        do_PUT = do_GET = do_POST = do_HEAD = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
