"""A fal emulator: fal's queue API for FLUX.1 Kontext [max], over real HTTP(S).

Speaks the contract in ``../shared/reference/fal-queue-and-webhooks.md``:

* ``POST /{endpoint_id}[?fal_webhook=URL]`` with ``Authorization: Key ...``:
  ``request_id``, ``gateway_request_id``, ``response_url``, ``status_url``,
  ``cancel_url``, ``queue_position``; 422 with a ``detail`` list for bad input.
* ``GET /{owner}/{alias}/requests/{id}/status`` (``IN_QUEUE``/``IN_PROGRESS``/``COMPLETED``),
  ``GET .../requests/{id}`` (the result), ``PUT .../requests/{id}/cancel``.
* the webhook, POSTed when a request ends, signed with Ed25519 as fal signs,
  retried with backoff when it does not get a 2xx;
* ``GET /.well-known/jwks.json``: the public key; ``GET /files/...``: outputs.

fal as it is, not as it is convenient (see ``scheduler``): at most
``concurrency`` requests run at once and the rest wait in line with a true
``queue_position``; the runner fetches ``image_url`` when the request *starts*
(so a presigned URL must outlive the wait); ``X-Fal-Request-Timeout`` ends a
request that could not start in time with an ERROR webhook, and it never runs;
a submit answered with ``x-fal-request-id`` exists even when the answer is a 5xx.

Faults are counters that each submit/request consumes (``submit_429=3``: the
next three submits get 429), set at start or with ``POST /_emulator/faults``.
``GET /_emulator/state`` shows what was received and delivered, and the peak
``IN_PROGRESS`` and open counts since the last reset.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import ssl
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from kontext_s3_tools.emulator.editing import describe, edit
from kontext_s3_tools.emulator.input_check import check_input
from kontext_s3_tools.emulator.scheduler import FalQueue
from kontext_s3_tools.emulator.signing import WebhookSigner
from kontext_s3_tools.http_server import QuietHTTPServer

ENDPOINTS = ("fal-ai/flux-pro/kontext/max",)


@dataclass
class Faults:
    """Each counter is consumed by the next submit/request it applies to."""

    submit_429: int = 0
    submit_5xx: int = 0
    #: fal enqueues the request, then answers 500 with ``x-fal-request-id`` (it holds and bills the request).
    submit_500_enqueued: int = 0
    #: fal enqueues the request, then answers 200 with a body that is not JSON.
    submit_garbage_2xx: int = 0
    status_5xx: int = 0
    lose_webhook: int = 0
    duplicate_webhook: int = 0
    error_result: int = 0
    fail_webhook_attempts: int = 0
    #: Standing delays (not consumed): slow submit answers, slow file host, time in queue and in progress.
    submit_delay_ms: int = 0
    file_delay_ms: int = 0
    queue_ms: int = 0
    processing_ms: int = 0

    @classmethod
    def parse(cls, items: list[str]) -> dict[str, int]:
        names = {f.name for f in fields(cls)}
        parsed: dict[str, int] = {}
        for item in items:
            name, _, value = item.partition("=")
            if name not in names:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(names))}")
            parsed[name] = int(value or "1")
        return parsed


@dataclass
class QueueRequest:
    request_id: str
    endpoint: str
    app: str
    input: dict[str, Any]
    webhook_url: str | None
    status: str = "IN_QUEUE"
    result: dict[str, Any] | None = None
    error: str | None = None
    error_payload: Any = None
    cancelled: bool = False
    logs: list[dict[str, Any]] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    inference_time: float | None = None
    error_type: str | None = None
    #: How long the runner takes once started (the standing ``processing_ms`` fault when it was submitted).
    processing_ms: int = 0
    #: The input the runner fetched when the request started: width, height, format, EXIF orientation.
    fetched: dict[str, Any] | None = None


class FalEmulator:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        fal_key: str = "local-fal-key",
        user_id: str = "emulator-user",
        tls: tuple[Path, Path] | None = None,
        public_url: str | None = None,
        webhook_attempts: int = 10,
        webhook_backoff_seconds: float = 0.25,
        workers: int = 8,
        signer: WebhookSigner | None = None,
        faults: dict[str, int] | None = None,
        verbose: bool = False,
        concurrency: int | None = None,
    ) -> None:
        self.fal_key = fal_key
        self.user_id = user_id
        self.signer = signer or WebhookSigner()
        self.webhook_attempts = webhook_attempts
        self.webhook_backoff_seconds = webhook_backoff_seconds
        self.verbose = verbose
        self.faults = Faults(**(faults or {}))
        self.requests: dict[str, QueueRequest] = {}
        self.received: list[dict[str, Any]] = []
        self.deliveries: list[dict[str, Any]] = []
        self.files: dict[str, tuple[bytes, str]] = {}
        #: How many times each hosted file was fetched.
        self.file_fetches: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fal-emulator")
        self._webhook_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fal-emulator-webhook")
        self.queue = FalQueue(concurrency=concurrency, on_start=self._started, on_start_timeout=self._start_timed_out)
        trust = ssl.create_default_context()
        if tls:
            # Its own file host may be the image_url it is asked to fetch.
            trust.load_verify_locations(str(tls[0]))
        self._http = httpx.Client(timeout=30.0, verify=trust)
        self._server = QuietHTTPServer((host, port), _make_handler(self))
        self._server.daemon_threads = True
        scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            scheme = "https"
        bound_host, bound_port = str(self._server.server_address[0]), int(self._server.server_address[1])
        self.base_url = (public_url or f"{scheme}://{bound_host}:{bound_port}").rstrip("/")
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> FalEmulator:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fal-emulator-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.queue.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._webhook_pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> FalEmulator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def jwks_url(self) -> str:
        return f"{self.base_url}/.well-known/jwks.json"

    @property
    def files_url(self) -> str:
        return f"{self.base_url}/files/"

    # -- control -------------------------------------------------------------------

    def set_faults(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                if not hasattr(self.faults, name):
                    raise ValueError(f"unknown fault {name!r}")
                setattr(self.faults, name, int(value))

    def reset(self) -> None:
        with self._lock:
            self.faults = Faults()
            self.received.clear()
            self.deliveries.clear()
            self.requests.clear()
            self.files.clear()
            self.file_fetches.clear()
        self.queue.reset()

    def host_file(self, name: str, data: bytes, content_type: str) -> str:
        """Serve ``data`` from the file host (tests and benchmarks use it for large outputs)."""
        with self._lock:
            self.files[name] = (data, content_type)
        return f"{self.files_url}{name}"

    def submits(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.received]

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "faults": asdict(self.faults),
                "received": list(self.received),
                "deliveries": list(self.deliveries),
                "requests": {rid: {"status": r.status, "error": r.error, "cancelled": r.cancelled} for rid, r in self.requests.items()},
                "queue": self.queue.snapshot(),
            }

    def _take(self, name: str) -> bool:
        with self._lock:
            left = getattr(self.faults, name)
            if left > 0:
                setattr(self.faults, name, left - 1)
                return True
            return False

    def _log(self, message: str) -> None:
        if self.verbose:
            print(f"[fal-emulator] {message}", flush=True)

    # -- queue API ----------------------------------------------------------------------

    def submit(
        self, endpoint: str, query: dict[str, list[str]], raw_body: bytes, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        webhook_url = query.get("fal_webhook", [None])[0]
        try:
            body = json.loads(raw_body or b"null")
        except ValueError:
            body = None
        with self._lock:
            self.received.append(
                {
                    "endpoint": endpoint,
                    "webhook_url": webhook_url,
                    "body": body,
                    "headers": {k: v for k, v in headers.items() if k.lower() != "authorization"},
                    "at": time.time(),
                }
            )
            delay = self.faults.submit_delay_ms
        if delay:
            time.sleep(delay / 1000)
        if self._take("submit_429"):
            return 429, {"detail": "Too many requests (emulator fault)"}, {"Retry-After": "0"}
        if self._take("submit_5xx"):
            return 503, {"detail": "Service unavailable (emulator fault)"}, {}
        problems = check_input(body)
        if problems:
            return 422, {"detail": problems}, {}
        assert isinstance(body, dict)
        request_id = str(uuid.uuid4())
        app = "/".join(endpoint.split("/")[:2])
        request = QueueRequest(request_id=request_id, endpoint=endpoint, app=app, input=body, webhook_url=webhook_url)
        with self._lock:
            self.requests[request_id] = request
            queue_ms = self.faults.queue_ms
            request.processing_ms = self.faults.processing_ms
        position = self.queue.enqueue(request_id, queue_ms=queue_ms, start_timeout=_start_timeout(headers))
        self._log(f"submitted {request_id} webhook={webhook_url}")
        if self._take("submit_500_enqueued"):
            return 500, {"detail": "Internal server error (emulator fault, request enqueued)"}, {"x-fal-request-id": request_id}
        if self._take("submit_garbage_2xx"):
            return 200, {"__raw__": "<html>upstream said ok</html>"}, {"x-fal-request-id": request_id}
        return (
            200,
            {"request_id": request_id, "gateway_request_id": request_id, **self._urls(request), "queue_position": position},
            {"x-fal-request-id": request_id},
        )

    def _urls(self, request: QueueRequest) -> dict[str, str]:
        base = f"{self.base_url}/{request.app}/requests/{request.request_id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    def status(self, request_id: str, *, logs: bool = False) -> tuple[int, dict[str, Any]]:
        request = self.requests.get(request_id)
        if request is None:
            return 404, {"detail": "Request not found"}
        if self._take("status_5xx"):
            return 503, {"detail": "Service unavailable (emulator fault)"}
        answer: dict[str, Any] = {"status": request.status, "request_id": request_id, **self._urls(request)}
        if request.status == "IN_QUEUE":
            answer["queue_position"] = self.queue.position(request_id) or 0
        else:  # fal sends the logs only when asked (?logs=1; fal-client asks ?logs=true), and null otherwise
            answer["logs"] = list(request.logs) if logs else None
        if request.status == "COMPLETED":
            answer["metrics"] = {"inference_time": request.inference_time} if request.inference_time is not None else {}
            if request.error:
                answer["error"] = request.error
                answer["error_type"] = request.error_type or "request_error"
        return 200, answer

    def result(self, request_id: str) -> tuple[int, Any]:
        request = self.requests.get(request_id)
        if request is None:
            return 404, {"detail": "Request not found"}
        if request.status != "COMPLETED":
            return 400, {"detail": "Request is still in progress"}
        if request.error:
            detail = request.error_payload.get("detail") if isinstance(request.error_payload, dict) else request.error
            return (422 if isinstance(detail, list) else 500), {"detail": detail or request.error}
        return 200, request.result

    def cancel(self, request_id: str) -> tuple[int, dict[str, Any]]:
        request = self.requests.get(request_id)
        if request is None:
            return 404, {"status": "NOT_FOUND"}
        if not self.queue.cancel(request_id):
            return 400, {"status": "ALREADY_COMPLETED"}
        with self._lock:
            request.cancelled = True
            request.status = "COMPLETED"
            request.error = "Request was cancelled"
            request.error_type = "client_cancelled"
            request.ended_at = time.time()
        return 202, {"status": "CANCELLATION_REQUESTED"}

    # -- processing ---------------------------------------------------------------------

    def _started(self, request_id: str) -> None:
        """The scheduler gave the request a runner: fetch its input and edit it, off the scheduler's thread."""
        request = self.requests.get(request_id)
        if request is None:
            return
        with self._lock:
            request.status = "IN_PROGRESS"
            request.started_at = time.time()
        request.logs.append({"message": "emulator: editing", "level": "INFO", "timestamp": time.time()})
        with contextlib.suppress(RuntimeError):  # stopping: the pool takes no more work
            self._pool.submit(self._run, request, time.monotonic() + request.processing_ms / 1000)

    def _run(self, request: QueueRequest, done_at: float) -> None:
        started = time.monotonic()
        if self._take("error_result"):
            self._finish_error(request, "Internal server error (emulator fault)", {"detail": "the emulator was told to fail this request"})
        else:
            try:
                self._edit(request)
            except _InputFetchError as exc:
                self._finish_error(
                    request,
                    "Invalid status code: 422",
                    {
                        "detail": [
                            {"loc": ["body", "image_url"], "msg": f"Failed to download the file: {exc}", "type": "file_download_error"}
                        ]
                    },
                )
            except Exception as exc:
                self._finish_error(request, f"Internal server error: {type(exc).__name__}", {"detail": str(exc)})
        request.inference_time = round(max(done_at, time.monotonic()) - started, 4)
        # The runner is busy until then, and the result is not out before.
        self.queue.finish_at(request.request_id, done_at, then=lambda: self._complete(request))

    def _complete(self, request: QueueRequest) -> None:
        with self._lock:
            request.status = "COMPLETED"
            request.ended_at = time.time()
        with contextlib.suppress(RuntimeError):
            self._webhook_pool.submit(self._deliver, request)

    def _start_timed_out(self, request_id: str) -> None:
        """No runner started it before its X-Fal-Request-Timeout: it ends without running (and is not billed)."""
        request = self.requests.get(request_id)
        if request is None:
            return
        with self._lock:
            request.error = "Request timed out before it could start (X-Fal-Request-Timeout)"
            request.error_type = "request_timeout"
            request.error_payload = {"detail": request.error, "error_type": "request_timeout"}
            request.status = "COMPLETED"
            request.ended_at = time.time()
        with contextlib.suppress(RuntimeError):
            self._webhook_pool.submit(self._deliver, request)

    def _edit(self, request: QueueRequest) -> None:
        body = request.input
        source = self._fetch_input(body["image_url"])
        request.fetched = describe(source)
        seed = body.get("seed")
        if seed is None:
            seed = random.randrange(0, 2**31)
        images = edit(
            source,
            prompt=body["prompt"],
            seed=seed,
            num_images=body.get("num_images", 1),
            output_format=body.get("output_format", "jpeg"),
            aspect_ratio=body.get("aspect_ratio"),
        )
        described = []
        for image in images:
            if body.get("sync_mode"):
                url = f"data:{image.content_type};base64,{base64.b64encode(image.data).decode('ascii')}"
            else:
                url = self.host_file(f"{request.request_id}/{image.file_name}", image.data, image.content_type)
            described.append(
                {
                    "url": url,
                    "content_type": image.content_type,
                    "file_name": image.file_name,
                    "file_size": len(image.data),
                    "width": image.width,
                    "height": image.height,
                }
            )
        with self._lock:
            request.result = {
                "images": described,
                "timings": {"inference": round(time.monotonic() % 1 + 0.5, 3)},
                "seed": seed,
                "has_nsfw_concepts": [False] * len(described),
                "prompt": ("(enhanced) " if body.get("enhance_prompt") else "") + body["prompt"],
            }

    def _fetch_input(self, url: str) -> bytes:
        if url.startswith("data:"):
            return base64.b64decode(url.split(",", 1)[1])
        parts = urlsplit(url)
        if (parts.hostname or "").endswith(".fal.media"):
            # fal's own media store (the model page's examples use it): what fal would find there is what was hosted.
            with self._lock:
                found = self.files.get(parts.path.lstrip("/"))
            if found is None:
                raise _InputFetchError("HTTP 404")
            return found[0]
        try:
            response = self._http.get(url)
        except httpx.HTTPError as exc:
            raise _InputFetchError(str(exc)) from exc
        if response.status_code != 200:
            raise _InputFetchError(f"HTTP {response.status_code}")
        return response.content

    def _finish_error(self, request: QueueRequest, message: str, payload: Any) -> None:
        with self._lock:
            request.error = message
            request.error_payload = payload

    # -- webhooks ------------------------------------------------------------------------

    def _deliver(self, request: QueueRequest) -> None:
        if not request.webhook_url:
            return
        if self._take("lose_webhook"):
            self._log(f"losing the webhook of {request.request_id} (fault)")
            with self._lock:
                self.deliveries.append({"request_id": request.request_id, "lost": True, "at": time.time()})
            return
        if request.error:
            document: dict[str, Any] = {
                "request_id": request.request_id,
                "gateway_request_id": request.request_id,
                "status": "ERROR",
                "error": request.error,
                "payload": request.error_payload,
            }
            if request.error_type:
                document["error_type"] = request.error_type
        else:
            document = {
                "request_id": request.request_id,
                "gateway_request_id": request.request_id,
                "status": "OK",
                "payload": request.result,
            }
        body = json.dumps(document).encode("utf-8")
        copies = 2 if self._take("duplicate_webhook") else 1
        threads = [threading.Thread(target=self._post_webhook, args=(request, body), daemon=True) for _ in range(copies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _post_webhook(self, request: QueueRequest, body: bytes) -> None:
        assert request.webhook_url
        for attempt in range(1, self.webhook_attempts + 1):
            outcome: dict[str, Any] = {"request_id": request.request_id, "attempt": attempt, "at": time.time()}
            if self._take("fail_webhook_attempts"):
                outcome["status_code"] = None
                outcome["error"] = "attempt dropped (emulator fault)"
            else:
                headers = {"Content-Type": "application/json", **self.signer.headers(request.request_id, self.user_id, body)}
                try:
                    response = self._http.post(request.webhook_url, content=body, headers=headers, timeout=15.0)
                    outcome["status_code"] = response.status_code
                    outcome["answer"] = response.text[:500]
                except httpx.HTTPError as exc:
                    outcome["status_code"] = None
                    outcome["error"] = f"{type(exc).__name__}: {exc}"
                except RuntimeError:
                    return  # the emulator is stopping (its client is closed): nobody is left to deliver to
            with self._lock:
                self.deliveries.append(outcome)
            self._log(f"webhook {request.request_id} attempt {attempt}: {outcome.get('status_code')}")
            if outcome.get("status_code") and 200 <= outcome["status_code"] < 300:
                return
            time.sleep(min(60.0, self.webhook_backoff_seconds * 2 ** (attempt - 1)))


class _InputFetchError(Exception):
    pass


def _start_timeout(headers: dict[str, str]) -> float | None:
    """``X-Fal-Request-Timeout`` in seconds (a time-to-start deadline), if the submit set one."""
    for name, value in headers.items():
        if name.lower() == "x-fal-request-timeout":
            try:
                seconds = float(value)
            except ValueError:
                return None
            return seconds if seconds > 0 else None
    return None


def _make_handler(emulator: FalEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "fal-emulator"

        def log_message(self, format: str, *args: Any) -> None:
            if emulator.verbose:
                super().log_message(format, *args)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(
            self,
            status: int,
            payload: Any,
            headers: dict[str, str] | None = None,
            raw: bytes | None = None,
            content_type: str = "application/json",
        ) -> None:
            if isinstance(payload, dict) and "__raw__" in payload:  # a body that is not JSON (a fault)
                raw, content_type = str(payload["__raw__"]).encode("utf-8"), "text/html"
            data = raw if raw is not None else json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Key {emulator.fal_key}":
                return True
            self._send(401, {"detail": "No user found for Key ID and Secret"})
            return False

        def _route(self, method: str) -> None:
            url = urlsplit(self.path)
            path = url.path.strip("/")
            parts = path.split("/")
            body = self._body() if method in ("POST", "PUT") else b""
            if method == "GET" and path == ".well-known/jwks.json":
                return self._send(200, {"keys": [emulator.signer.jwk()]})
            if method == "GET" and parts[0] == "files":
                name = "/".join(parts[1:])
                with emulator._lock:
                    found = emulator.files.get(name)
                    delay = emulator.faults.file_delay_ms
                    emulator.file_fetches[name] += 1
                if delay:
                    time.sleep(delay / 1000)
                if found is None:
                    return self._send(404, {"detail": "File not found"})
                return self._send(200, None, raw=found[0], content_type=found[1])
            if parts[0] == "_emulator":
                if method == "GET" and parts[1:] == ["state"]:
                    return self._send(200, emulator.state())
                if method == "POST" and parts[1:] == ["faults"]:
                    try:
                        emulator.set_faults(**json.loads(body or b"{}"))
                    except (ValueError, TypeError) as exc:
                        return self._send(400, {"detail": str(exc)})
                    return self._send(200, asdict(emulator.faults))
                if method == "POST" and parts[1:] == ["concurrency"]:
                    limit = json.loads(body or b"{}").get("concurrency")
                    emulator.queue.set_concurrency(int(limit) if limit else None)
                    return self._send(200, emulator.queue.snapshot())
                if method == "POST" and parts[1:] == ["reset"]:
                    emulator.reset()
                    return self._send(200, {"reset": True})
                return self._send(404, {"detail": "unknown emulator control"})
            if not self._authorized():
                return None
            if "requests" in parts:
                index = parts.index("requests")
                tail = parts[index + 1 :]
                if method == "GET" and len(tail) == 2 and tail[1] == "status":
                    logs = parse_qs(url.query).get("logs", ["0"])[0].lower() in ("1", "true")
                    return self._send(*emulator.status(tail[0], logs=logs))
                if method == "GET" and len(tail) == 1:
                    status, payload = emulator.result(tail[0])
                    return self._send(status, payload)
                if method == "PUT" and len(tail) == 2 and tail[1] == "cancel":
                    return self._send(*emulator.cancel(tail[0]))
                return self._send(405, {"detail": "Method not allowed"})
            if method == "POST":
                if path not in ENDPOINTS:
                    return self._send(404, {"detail": f"Application {path!r} not found"})
                status, payload, headers = emulator.submit(path, parse_qs(url.query), body, dict(self.headers.items()))
                return self._send(status, payload, headers)
            return self._send(405, {"detail": "Method not allowed"})

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_PUT(self) -> None:
            self._route("PUT")

    return Handler
