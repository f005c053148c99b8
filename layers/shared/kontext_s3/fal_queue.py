"""fal's queue API (``queue.fal.run``): submit with a webhook, status, result, cancel.

**Submits follow one rule: a request that may be at fal is never sent again.**
fal has no idempotency key, and a request it holds is billed. So
:meth:`FalQueueClient.submit` does not raise for what fal answers; it returns
what the answer proves:

* :class:`Accepted`: fal enqueued it (a readable 2xx);
* :class:`NotEnqueued`: fal certainly does not hold it: the connection never
  opened, or fal answered 408/409/429/502/503/504 (or 401/403) *without*
  ``x-fal-request-id``. Only these are retried, inside the caller's deadline,
  and only after these may a caller send the same request later;
* :class:`Refused`: a 4xx that says fal will never run it (422 validation, 404);
* :class:`Unknown`: anything else once the bytes may have left: a 2xx we cannot
  read, any answer carrying ``x-fal-request-id`` that is not a 2xx, a 500, a
  read timeout or a dropped connection. It carries the request id when fal
  named one, so the job can still be found at fal.

The idempotent calls (status, result, cancel) retry like ``fal-client``: 408,
409, 429, 5xx and transport errors, exponential backoff with jitter,
``Retry-After`` honoured (seconds or an HTTP date). Every retry stays inside
the caller's deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
#: Answers that prove the request was not enqueued, when they carry no ``x-fal-request-id``.
NOT_ENQUEUED_STATUS = frozenset({408, 409, 429, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})
REQUEST_ID_HEADER = "x-fal-request-id"
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class FalError(Exception):
    def __init__(self, message: str, *, status_code: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class FalRejected(FalError):
    """A 4xx that retrying cannot fix: bad input (422), bad key (401/403), unknown request (404)."""

    @property
    def is_auth(self) -> bool:
        return self.status_code in AUTH_STATUS


class FalUnavailable(FalError):
    """Transient faults until the deadline."""


class FalKeyMissing(RuntimeError):
    """The fal key secret exists but holds no key: a first deploy before the operator stored it, or an empty value.

    Nothing is sent; the upload is kept (retried, then a retryable error record) until the key is stored.
    """

    def __init__(self, secret: str, why: str) -> None:
        super().__init__(
            f"the fal key is not stored: the secret {secret} {why}; store it with "
            f"aws secretsmanager put-secret-value --secret-id {secret} --secret-string 'KEY_ID:KEY_SECRET'"
        )


@dataclass(frozen=True)
class QueuedRequest:
    request_id: str
    gateway_request_id: str | None
    status_url: str
    response_url: str
    cancel_url: str
    queue_position: int | None = None


@dataclass(frozen=True)
class Accepted:
    request: QueuedRequest
    attempts: int = 1


@dataclass(frozen=True)
class NotEnqueued:
    """fal certainly does not hold the request: it may be sent again later."""

    reason: str
    status_code: int | None = None
    attempts: int = 1

    @property
    def is_auth(self) -> bool:
        return self.status_code in AUTH_STATUS


@dataclass(frozen=True)
class Refused:
    """fal will never run this request (and does not bill it)."""

    reason: str
    status_code: int
    detail: Any = None
    attempts: int = 1


@dataclass(frozen=True)
class Unknown:
    """The request may be at fal. ``request_id`` is set when fal named it."""

    reason: str
    request_id: str | None = None
    status_code: int | None = None
    attempts: int = 1


SubmitOutcome = Accepted | NotEnqueued | Refused | Unknown


@dataclass
class RetryPolicy:
    base_delay: float = 0.2
    max_delay: float = 8.0
    #: Stop retrying when less than this is left before the deadline.
    reserve_seconds: float = 1.0
    #: A submit attempt starts only with this long (or the whole timeout, if shorter) left to hear its answer:
    #: a POST sent with a sliver of time turns a clean refusal into an answer we never read.
    min_attempt_seconds: float = 3.0


class FalQueueClient:
    def __init__(
        self,
        http: httpx.Client,
        *,
        base_url: str,
        key: Callable[[], str],
        timeout_seconds: float = 10.0,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._key = key
        self._timeout = timeout_seconds
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock

    def key(self) -> str:
        """The fal key (read before a submit, so that a failure to read it happens before anything is sent)."""
        return self._key()

    def request_urls(self, endpoint: str, request_id: str) -> QueuedRequest:
        """The URLs of a request fal named without answering in full, built as ``fal-client`` builds them."""
        app = "/".join(endpoint.strip("/").split("/")[:2])
        base = f"{self._base_url}/{app}/requests/{request_id}"
        return QueuedRequest(request_id, None, status_url=f"{base}/status", response_url=base, cancel_url=f"{base}/cancel")

    def submit(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        webhook_url: str,
        deadline: float,
        key: str,
        headers: Mapping[str, str] | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> SubmitOutcome:
        """Enqueue ``body`` for ``endpoint``; fal POSTs the outcome to ``webhook_url``. Never raises for fal's answer."""
        url = f"{self._base_url}/{endpoint.strip('/')}"
        request_headers = {**(headers or {}), "Authorization": f"Key {key}", "Accept": "application/json"}
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self._clock()
            if remaining < min(self._timeout, self._retry.min_attempt_seconds):
                return NotEnqueued(f"not enough time left to hear fal's answer (POST {_path(url)})", attempts=attempt - 1)
            try:
                response = self._http.post(
                    url, params={"fal_webhook": webhook_url}, json=body, headers=request_headers, timeout=min(self._timeout, remaining)
                )
            except _NOT_SENT as exc:
                outcome: SubmitOutcome = NotEnqueued(f"cannot reach fal: {type(exc).__name__}: {exc}", attempts=attempt)
                retry_after = None
            except httpx.TransportError as exc:
                return Unknown(f"fal did not answer after the request was sent: {type(exc).__name__}: {exc}", attempts=attempt)
            else:
                outcome = _submit_outcome(response, attempt)
                retry_after = _retry_after(response)
            if not isinstance(outcome, NotEnqueued) or outcome.is_auth:
                return outcome
            delay = self._backoff(attempt, retry_after)
            if self._clock() + delay > deadline - max(self._retry.reserve_seconds, min(self._timeout, self._retry.min_attempt_seconds)):
                return NotEnqueued(f"{outcome.reason} (gave up after {attempt} attempt(s))", outcome.status_code, attempts=attempt)
            if on_retry:
                on_retry(outcome.reason)
            self._sleep(delay)

    def status(self, status_url: str, *, deadline: float, logs: bool = False) -> dict[str, Any]:
        return _json(self._send("GET", status_url, params={"logs": "1" if logs else "0"}, deadline=deadline))

    def result(self, response_url: str, *, deadline: float) -> dict[str, Any]:
        return _json(self._send("GET", response_url, deadline=deadline))

    def cancel(self, cancel_url: str, *, deadline: float) -> bool:
        """True when fal cancelled it; False when it was already running or done (fal answers 400)."""
        try:
            self._send("PUT", cancel_url, deadline=deadline)
        except FalRejected as exc:
            if exc.status_code == 400:
                return False
            raise
        return True

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self._retry.max_delay, self._retry.base_delay * 2.0 ** min(attempt - 1, 20)) * random.uniform(0.5, 1.5)
        return max(delay, retry_after) if retry_after is not None else delay

    def _send(self, method: str, url: str, *, deadline: float, params: dict[str, str] | None = None) -> httpx.Response:
        """An idempotent call: retried on any transient fault until the deadline."""
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise FalUnavailable(f"no time left to call fal ({method} {_path(url)})")
            try:
                response = self._http.request(
                    method,
                    url,
                    params=params,
                    headers={"Authorization": f"Key {self._key()}", "Accept": "application/json"},
                    timeout=min(self._timeout, remaining),
                )
            except httpx.TransportError as exc:
                failure = FalUnavailable(f"fal did not answer: {type(exc).__name__}: {exc}")
                retry_after = None
            else:
                if response.is_success:
                    return response
                detail = _detail(response)
                if response.status_code not in RETRY_STATUS:
                    raise FalRejected(
                        f"fal refused {method} {_path(url)}: HTTP {response.status_code}: {summarize_detail(detail)}",
                        status_code=response.status_code,
                        detail=detail,
                    )
                failure = FalUnavailable(
                    f"fal answered HTTP {response.status_code}: {summarize_detail(detail)}", status_code=response.status_code, detail=detail
                )
                retry_after = _retry_after(response)
            delay = self._backoff(attempt, retry_after)
            if self._clock() + delay > deadline - self._retry.reserve_seconds:
                raise FalUnavailable(
                    f"{failure} (gave up after {attempt} attempt(s))", status_code=failure.status_code, detail=failure.detail
                )
            self._sleep(delay)


def _submit_outcome(response: httpx.Response, attempt: int) -> SubmitOutcome:
    """What one answer to a submit proves (see the module's rule)."""
    header_id = response.headers.get(REQUEST_ID_HEADER) or None
    status = response.status_code
    if response.is_success:
        try:
            data = response.json()
            return Accepted(
                QueuedRequest(
                    request_id=str(data["request_id"]),
                    gateway_request_id=data.get("gateway_request_id"),
                    status_url=str(data["status_url"]),
                    response_url=str(data["response_url"]),
                    cancel_url=str(data["cancel_url"]),
                    queue_position=data.get("queue_position") if isinstance(data.get("queue_position"), int) else None,
                ),
                attempts=attempt,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            body_id = _request_id_in(response)
            return Unknown(f"fal answered HTTP {status} with a body we cannot read", header_id or body_id, status, attempt)
    detail = _detail(response)
    text = f"fal answered HTTP {status}: {summarize_detail(detail)}"
    if header_id:
        return Unknown(f"{text} (but fal holds it as request {header_id})", header_id, status, attempt)
    if status in NOT_ENQUEUED_STATUS or status in AUTH_STATUS:
        return NotEnqueued(text, status, attempt)
    if 400 <= status < 500:
        return Refused(text, status, detail, attempt)
    return Unknown(text, None, status, attempt)


def _request_id_in(response: httpx.Response) -> str | None:
    try:
        data = response.json()
    except ValueError:
        return None
    value = data.get("request_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise FalError(f"fal answered HTTP {response.status_code} with a body that is not JSON", status_code=response.status_code) from exc
    if not isinstance(data, dict):
        raise FalError("fal answered with JSON that is not an object", status_code=response.status_code)
    return data


def _detail(response: httpx.Response) -> Any:
    try:
        data = response.json()
    except ValueError:
        return response.text[:2000]
    return data.get("detail", data) if isinstance(data, dict) else data


def summarize_detail(detail: Any) -> str:
    """fal's 422 ``detail`` list as one line: ``body.num_images: must be <= 4; ...``."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []))
                parts.append(f"{loc}: {item.get('msg', '')}".strip(": "))
            else:
                parts.append(str(item))
        return "; ".join(parts)[:2000]
    return str(detail)[:2000]


def _retry_after(response: httpx.Response, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> float | None:
    """``Retry-After`` in seconds: a number, or an HTTP date (RFC 9110 allows both)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now()).total_seconds())


def _path(url: str) -> str:
    """A URL without its query: the webhook URL in the query is not secret, but it is noise."""
    return url.split("?", 1)[0]
