"""The fal queue client against the emulator, over HTTP."""

from __future__ import annotations

import time

import httpx
import pytest

from kontext_s3.fal_queue import FalOutcomeUnknown, FalQueueClient, FalRejected, FalUnavailable, RetryPolicy
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


def test_submit_returns_the_urls_fal_returns(emulator: FalEmulator) -> None:
    queued = client(emulator).submit(ENDPOINT, valid_body(emulator), webhook_url="http://127.0.0.1:9/hook", deadline=time.monotonic() + 5)
    # Status and result URLs use owner/alias only, not the endpoint's sub-path (as fal builds them).
    assert queued.status_url == f"{emulator.base_url}/fal-ai/flux-pro/requests/{queued.request_id}/status"
    assert queued.response_url == f"{emulator.base_url}/fal-ai/flux-pro/requests/{queued.request_id}"
    assert emulator.submits()[0]["webhook_url"] == "http://127.0.0.1:9/hook"


def test_status_result_and_cancel(emulator: FalEmulator) -> None:
    fal = client(emulator)
    done = fal.submit(ENDPOINT, valid_body(emulator), webhook_url="http://127.0.0.1:9/hook", deadline=time.monotonic() + 5)
    wait_completed(fal, done.status_url)
    result = fal.result(done.response_url, deadline=time.monotonic() + 5)
    assert result["seed"] == 3 and len(result["images"]) == 1
    assert fal.cancel(done.cancel_url, deadline=time.monotonic() + 5) is False  # already completed
    emulator.set_faults(queue_ms=2000)
    queued = fal.submit(ENDPOINT, valid_body(emulator), webhook_url="http://127.0.0.1:9/hook", deadline=time.monotonic() + 5)
    assert fal.status(queued.status_url, deadline=time.monotonic() + 5)["status"] == "IN_QUEUE"
    assert fal.cancel(queued.cancel_url, deadline=time.monotonic() + 5) is True


def test_a_422_carries_fals_detail_and_is_not_retried(emulator: FalEmulator) -> None:
    clock = FakeClock()
    with pytest.raises(FalRejected) as info:
        client(emulator, clock=clock).submit(
            ENDPOINT, {"prompt": "x", "image_url": "u", "num_images": 9}, webhook_url="http://h/", deadline=clock() + 5
        )
    assert info.value.status_code == 422
    assert info.value.detail[0]["loc"] == ["body", "num_images"]
    assert "body.num_images" in str(info.value)
    assert clock.sleeps == [] and len(emulator.submits()) == 1


def test_a_wrong_key_is_an_auth_refusal(emulator: FalEmulator) -> None:
    with pytest.raises(FalRejected) as info:
        client(emulator, key="nope").submit(ENDPOINT, valid_body(emulator), webhook_url="http://h/", deadline=time.monotonic() + 5)
    assert info.value.is_auth


def test_429s_are_retried_with_growing_backoff(emulator: FalEmulator) -> None:
    emulator.set_faults(submit_429=3)
    clock = FakeClock()
    queued = client(emulator, clock=clock).submit(ENDPOINT, valid_body(emulator), webhook_url="http://h/", deadline=clock() + 30)
    assert queued.request_id in emulator.requests
    assert len(clock.sleeps) == 3 and clock.sleeps[0] < clock.sleeps[2]
    assert len(emulator.submits()) == 4


def test_5xx_until_the_deadline_gives_up_without_an_accepted_request(emulator: FalEmulator) -> None:
    emulator.set_faults(submit_5xx=1000)
    clock = FakeClock()
    start = clock()
    with pytest.raises(FalUnavailable, match="503"):
        client(emulator, clock=clock).submit(ENDPOINT, valid_body(emulator), webhook_url="http://h/", deadline=start + 4)
    # It kept trying, and stopped before the deadline instead of sleeping past it.
    assert len(clock.sleeps) >= 3
    assert clock() <= start + 4
    assert emulator.requests == {}


def test_connection_refused_is_retried_then_unavailable() -> None:
    clock = FakeClock()
    fal = client(None, clock=clock, base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(FalUnavailable, match="cannot reach fal"):
        fal.submit(ENDPOINT, {}, webhook_url="http://h/", deadline=clock() + 2)
    assert len(clock.sleeps) >= 2


def test_no_answer_after_sending_is_unknown_and_not_resent(emulator: FalEmulator) -> None:
    emulator.set_faults(submit_delay_ms=800)
    with pytest.raises(FalOutcomeUnknown):
        client(emulator, timeout=0.2).submit(ENDPOINT, valid_body(emulator), webhook_url="http://h/", deadline=time.monotonic() + 10)
    assert len(emulator.submits()) == 1
