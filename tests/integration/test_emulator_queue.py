"""The emulator models fal's queue as fal documents it: a concurrency limit, a line, fetch at start, time-to-start."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from kontext_s3.fal_queue import Accepted, FalQueueClient
from kontext_s3_tools.emulator import FalEmulator
from tests.helpers import FAL_KEY, RecordingServer, jpeg_bytes

ENDPOINT = "fal-ai/flux-pro/kontext/max"


@pytest.fixture
def limited() -> Iterator[FalEmulator]:
    emulator = FalEmulator(fal_key=FAL_KEY, concurrency=2, webhook_attempts=1).start()
    yield emulator
    emulator.stop()


def submit(emulator: FalEmulator, image_url: str, webhook: str, headers: dict[str, str] | None = None) -> str:
    fal = FalQueueClient(httpx.Client(), base_url=emulator.base_url, key=lambda: FAL_KEY)
    outcome = fal.submit(
        ENDPOINT, {"prompt": "x", "image_url": image_url}, webhook_url=webhook, deadline=time.monotonic() + 10, key=FAL_KEY, headers=headers
    )
    assert isinstance(outcome, Accepted)
    return outcome.request.request_id


def until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_at_most_the_limit_run_and_the_rest_wait_in_order_with_their_true_position(limited: FalEmulator) -> None:
    limited.set_faults(processing_ms=400)
    hook = RecordingServer()
    try:
        url = limited.host_file("in.jpg", jpeg_bytes(), "image/jpeg")
        ids = [submit(limited, url, hook.url) for _ in range(5)]
        time.sleep(0.1)
        statuses = [limited.status(rid)[1] for rid in ids]
        assert [s["status"] for s in statuses] == ["IN_PROGRESS", "IN_PROGRESS", "IN_QUEUE", "IN_QUEUE", "IN_QUEUE"]
        assert [s.get("queue_position") for s in statuses[2:]] == [0, 1, 2]
        until(lambda: all(limited.requests[r].status == "COMPLETED" for r in ids))
        started = [limited.requests[r].started_at or 0.0 for r in ids]
        assert started == sorted(started)  # dispatched in the order they came
        snapshot = limited.state()["queue"]
        assert snapshot["peak_in_progress"] == 2 and snapshot["peak_open"] == 5
        limited.reset()
        assert limited.state()["queue"]["peak_open"] == 0
    finally:
        hook.stop()


def test_the_runner_fetches_the_input_when_the_request_starts_not_at_submit(limited: FalEmulator) -> None:
    limited.set_faults(processing_ms=500)
    hook = RecordingServer()
    try:
        url = limited.host_file("busy.jpg", jpeg_bytes(), "image/jpeg")
        for _ in range(2):
            submit(limited, url, hook.url)  # both slots busy
        late = f"{limited.files_url}late.jpg"
        waiting = submit(limited, late, hook.url)
        assert limited.file_fetches["late.jpg"] == 0
        limited.host_file("late.jpg", jpeg_bytes(), "image/jpeg")  # exists only by the time it starts
        gone = submit(limited, f"{limited.files_url}gone.jpg", hook.url)
        until(lambda: limited.requests[gone].status == "COMPLETED")
        assert limited.requests[waiting].error is None and limited.requests[waiting].fetched is not None
        assert "Failed to download" in str(limited.requests[gone].error_payload)
    finally:
        hook.stop()


def test_a_request_that_cannot_start_before_its_timeout_never_runs_and_ends_with_an_error_webhook(limited: FalEmulator) -> None:
    limited.set_faults(processing_ms=1500)
    hook = RecordingServer()
    try:
        url = limited.host_file("in.jpg", jpeg_bytes(), "image/jpeg")
        for _ in range(2):
            submit(limited, url, hook.url)
        starved = submit(limited, url, hook.url, headers={"X-Fal-Request-Timeout": "0.5"})
        until(lambda: limited.requests[starved].status == "COMPLETED")
        request = limited.requests[starved]
        assert request.started_at is None and request.error_type == "request_timeout"
        until(lambda: any(d.get("request_id") == starved for d in limited.deliveries))
        status = limited.status(starved)[1]
        assert status["error_type"] == "request_timeout"
    finally:
        hook.stop()
