"""fal's queue API (``queue.fal.run``): submit with a webhook, status, result, cancel.

Retries follow ``fal-client`` (408, 409, 429, 5xx, transport errors; exponential
backoff with jitter, ``Retry-After`` honoured) with one difference on submit:
fal has no idempotency key, so a submit whose request may have reached fal
(read timeout, connection dropped after sending) is not sent again but reported
as :class:`FalOutcomeUnknown`. Only faults that certainly did not enqueue a
request (connection refused, connect timeout, an HTTP error status) are retried.
Every retry stays inside the caller's deadline.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class FalError(Exception):
    def __init__(self, message: str, *, status_code: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class FalRejected(FalError):
    """A 4xx that retrying cannot fix: bad input (422), bad key (401/403), unknown endpoint (404)."""

    @property
    def is_auth(self) -> bool:
        return self.status_code in (401, 403)


class FalUnavailable(FalError):
    """Transient faults until the deadline; the request certainly was not accepted."""


class FalOutcomeUnknown(FalError):
    """The request may or may not have been accepted (sent, but no answer)."""


@dataclass(frozen=True)
class QueuedRequest:
    request_id: str
    gateway_request_id: str | None
    status_url: str
    response_url: str
    cancel_url: str
    queue_position: int | None = None


@dataclass
class RetryPolicy:
    base_delay: float = 0.2
    max_delay: float = 8.0
    #: Stop retrying when less than this is left before the deadline.
    reserve_seconds: float = 1.0


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
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._key = key
        self._timeout = timeout_seconds
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._clock = clock
        self._on_retry = on_retry

    def submit(self, endpoint: str, body: dict[str, Any], *, webhook_url: str, deadline: float) -> QueuedRequest:
        """Enqueue ``body`` for ``endpoint``; fal POSTs the outcome to ``webhook_url``."""
        response = self._send(
            "POST",
            f"{self._base_url}/{endpoint.strip('/')}",
            params={"fal_webhook": webhook_url},
            json=body,
            deadline=deadline,
            resend_after_send=False,
        )
        data = _json(response)
        try:
            return QueuedRequest(
                request_id=str(data["request_id"]),
                gateway_request_id=data.get("gateway_request_id"),
                status_url=str(data["status_url"]),
                response_url=str(data["response_url"]),
                cancel_url=str(data["cancel_url"]),
                queue_position=data.get("queue_position"),
            )
        except (KeyError, TypeError) as exc:
            # fal answered 2xx, so the request was probably enqueued: do not send it again.
            raise FalOutcomeUnknown(f"fal accepted the submit but its answer lacks {exc}", status_code=response.status_code) from exc

    def status(self, status_url: str, *, deadline: float) -> dict[str, Any]:
        return _json(self._send("GET", status_url, params={"logs": "0"}, deadline=deadline))

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

    def _send(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        params: dict[str, str] | None = None,
        json: Any = None,
        resend_after_send: bool = True,
    ) -> httpx.Response:
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
                    json=json,
                    headers={"Authorization": f"Key {self._key()}", "Accept": "application/json"},
                    timeout=min(self._timeout, remaining),
                )
            except _NOT_SENT as exc:
                failure: FalError = FalUnavailable(f"cannot reach fal: {type(exc).__name__}: {exc}")
                retry_after = None
            except httpx.TransportError as exc:
                if not resend_after_send:
                    raise FalOutcomeUnknown(f"fal did not answer after the request was sent: {type(exc).__name__}: {exc}") from exc
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
                    f"fal answered HTTP {response.status_code}: {summarize_detail(detail)}",
                    status_code=response.status_code,
                    detail=detail,
                )
                retry_after = _retry_after(response)
            delay = min(self._retry.max_delay, self._retry.base_delay * 2 ** min(attempt - 1, 20)) * random.uniform(0.5, 1.5)
            if retry_after is not None:
                delay = max(delay, retry_after)
            if self._clock() + delay > deadline - self._retry.reserve_seconds:
                raise FalUnavailable(
                    f"{failure} (gave up after {attempt} attempt(s))", status_code=failure.status_code, detail=failure.detail
                )
            if self._on_retry:
                self._on_retry(str(failure))
            self._sleep(delay)


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


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _path(url: str) -> str:
    """A URL without its query: the webhook URL in the query is not secret, but it is noise."""
    return url.split("?", 1)[0]
