"""The end-to-end tests share one local stack: moto server, fal emulator, both handlers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kontext_s3_tools.local_stack import LocalStack


@pytest.fixture(scope="package")
def running_stack() -> Iterator[LocalStack]:
    stack = LocalStack(
        max_receive_count=3,
        submit_timeout_seconds=8.0,
        parameters={"SubmitMaxConcurrency": "2"},
        webhook_attempts=4,
        webhook_backoff_seconds=0.1,
    ).start()
    yield stack
    stack.stop()


@pytest.fixture
def stack(running_stack: LocalStack) -> LocalStack:
    running_stack.emulator.reset()
    running_stack.free_all_slots()  # fal forgot every request: none holds a slot any more
    return running_stack
