"""The fal queue client against the emulator, over HTTP."""

from __future__ import annotations

import time

import httpx
import pytest

from kontext_s3.fal_queue import Accepted, FalQueueClient, NotEnqueued, QueuedRequest, Refused, RetryPolicy, SubmitOutcome, Unknown
from kontext_s3_tools.emulator import FalEmulator
from kontext_s3_tools.local_stack import free_port
from tests.helpers import FAL_KEY, jpeg_bytes

ENDPOINT = "fal-ai/flux-pro/kontext/max"


class FakeClock:
    """Time that moves only when the client sleeps, so backoff is checked without waiting for it."""

    def __init__(self) -> None:
        self.now = time.monotonic()
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def client(
    emulator: FalEmulator | None, key: str = FAL_KEY, *, clock: FakeClock | None = None, timeout: float = 5.0, base_url: str | None = None
) -> FalQueueClient:
    clock = clock or FakeClock()
    return FalQueueClient(
        httpx.Client(),
        base_url=base_url or (emulator.base_url if emulator else ""),
        key=lambda: key,
        timeout_seconds=timeout,
        retry=RetryPolicy(base_delay=0.05, max_delay=1.0, reserve_seconds=0.0),
        sleep=clock.sleep,
        clock=clock,
    )


def valid_body(emulator: FalEmulator) -> dict[str, object]:
    return {"prompt": "make it night", "image_url": emulator.host_file("inputs/in.jpg", jpeg_bytes(), "image/jpeg"), "seed": 3}


def wait_completed(fal: FalQueueClient, status_url: str) -> dict[str, object]:
    for _ in range(200):
        status = fal.status(status_url, deadline=time.monotonic() + 5)
        if status["status"] == "COMPLETED":
            return status
        time.sleep(0.02)
    raise AssertionError("the request never completed")


def submit(fal: FalQueueClient, body: dict[str, object], deadline: float, key: str = FAL_KEY) -> SubmitOutcome:
    return fal.submit(ENDPOINT, body, webhook_url="http://127.0.0.1:9/hook", deadline=deadline, key=key)


def test_submit_returns_the_urls_fal_returns(emulator: FalEmulator) -> None:
    outcome = submit(client(emulator), valid_body(emulator), time.monotonic() + 5)
    assert isinstance(outcome, Accepted)
    queued = outcome.request
    # Status and result URLs use owner/alias only, not the endpoint's sub-path (as fal builds them).
    assert queued.status_url == f"{emulator.base_url}/fal-ai/flux-pro/requests/{queued.request_id}/status"
    assert queued.response_url == f"{emulator.base_url}/fal-ai/flux-pro/requests/{queued.request_id}"
    assert client(emulator).request_urls(ENDPOINT, queued.request_id) == QueuedRequest(
        queued.request_id, None, queued.status_url, queued.response_url, queued.cancel_url
    )
    assert emulator.submits()[0]["webhook_url"] == "http://127.0.0.1:9/hook"


def test_status_result_and_cancel(emulator: FalEmulator) -> None:
    fal = client(emulator)
    done = submit(fal, valid_body(emulator), time.monotonic() + 5)
    assert isinstance(done, Accepted)
    wait_completed(fal, done.request.status_url)
    assert fal.status(done.request.status_url, deadline=time.monotonic() + 5)["logs"] is None
    assert fal.status(done.request.status_url, deadline=time.monotonic() + 5, logs=True)["logs"]
    result = fal.result(done.request.response_url, deadline=time.monotonic() + 5)
    assert result["seed"] == 3 and len(result["images"]) == 1
    assert fal.cancel(done.request.cancel_url, deadline=time.monotonic() + 5) is False  # already completed
    emulator.set_faults(queue_ms=2000)
    queued = submit(fal, valid_body(emulator), time.monotonic() + 5)
    assert isinstance(queued, Accepted)
    assert fal.status(queued.request.status_url, deadline=time.monotonic() + 5)["status"] == "IN_QUEUE"
    assert fal.cancel(queued.request.cancel_url, deadline=time.monotonic() + 5) is True


def test_a_422_is_refused_with_fals_detail_and_not_retried(emulator: FalEmulator) -> None:
    clock = FakeClock()
    outcome = submit(client(emulator, clock=clock), {"prompt": "x", "image_url": "u", "num_images": 9}, clock() + 5)
    assert isinstance(outcome, Refused) and outcome.status_code == 422
    assert outcome.detail[0]["loc"] == ["body", "num_images"]
    assert "body.num_images" in outcome.reason
    assert clock.sleeps == [] and len(emulator.submits()) == 1


def test_a_wrong_key_is_not_enqueued_and_not_retried(emulator: FalEmulator) -> None:
    clock = FakeClock()
    outcome = submit(client(emulator, clock=clock), valid_body(emulator), clock() + 5, key="nope")
    assert isinstance(outcome, NotEnqueued) and outcome.is_auth
    assert clock.sleeps == []


def test_429s_are_retried_with_growing_backoff(emulator: FalEmulator) -> None:
    emulator.set_faults(submit_429=3)
    clock = FakeClock()
    outcome = submit(client(emulator, clock=clock), valid_body(emulator), clock() + 30)
    assert isinstance(outcome, Accepted) and outcome.request.request_id in emulator.requests
    assert outcome.attempts == 4
    assert len(clock.sleeps) == 3 and clock.sleeps[0] < clock.sleeps[2]
    assert len(emulator.submits()) == 4


def test_503_until_the_deadline_gives_up_without_an_accepted_request(emulator: FalEmulator) -> None:
    emulator.set_faults(submit_5xx=1000)
    clock = FakeClock()
    start = clock()
    outcome = submit(client(emulator, clock=clock), valid_body(emulator), start + 4)
    assert isinstance(outcome, NotEnqueued) and "503" in outcome.reason
    # It kept trying, and stopped before the deadline instead of sleeping past it.
    assert len(clock.sleeps) >= 3
    assert clock() <= start + 4
    assert emulator.requests == {}


def test_connection_refused_is_retried_then_not_enqueued() -> None:
    clock = FakeClock()
    fal = client(None, clock=clock, base_url=f"http://127.0.0.1:{free_port()}")
    outcome = submit(fal, {}, clock() + 5)
    assert isinstance(outcome, NotEnqueued) and "cannot reach fal" in outcome.reason
    assert len(clock.sleeps) >= 2


def test_no_answer_after_sending_is_unknown_and_not_resent(emulator: FalEmulator) -> None:
    emulator.set_faults(submit_delay_ms=800)
    outcome = submit(client(emulator, timeout=0.2), valid_body(emulator), time.monotonic() + 10)
    assert isinstance(outcome, Unknown) and outcome.request_id is None
    assert len(emulator.submits()) == 1


@pytest.mark.parametrize("fault", ["submit_500_enqueued", "submit_garbage_2xx"])
def test_an_answer_that_names_a_request_is_unknown_with_its_id_and_not_resent(emulator: FalEmulator, fault: str) -> None:
    emulator.set_faults(**{fault: 1})
    clock = FakeClock()
    outcome = submit(client(emulator, clock=clock), valid_body(emulator), clock() + 10)
    assert isinstance(outcome, Unknown)
    assert outcome.request_id in emulator.requests  # fal holds it
    assert len(emulator.submits()) == 1 and clock.sleeps == []


def test_retry_after_as_an_http_date_is_honoured() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from kontext_s3.fal_queue import _retry_after

    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    response = httpx.Response(429, headers={"Retry-After": format_datetime(now + timedelta(seconds=7), usegmt=True)})
    assert _retry_after(response, now=lambda: now) == 7.0
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "3"})) == 3.0
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
