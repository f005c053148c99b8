"""The local stand-ins for Lambda keep Lambda's rules, or the tests that use them mean little."""

from __future__ import annotations

import threading
import time
from typing import Any

from kontext_s3_tools.local_stack import ExecutionEnvironments, function_url_event


def test_concurrent_invocations_never_share_an_execution_environment() -> None:
    overlaps: list[int] = []

    def new_environment() -> Any:
        busy = threading.Lock()

        def handler(event: dict[str, Any], context: Any) -> int:
            if not busy.acquire(blocking=False):
                overlaps.append(1)  # two invocations inside one environment at once
                return 0
            try:
                time.sleep(0.05)
                return 1
            finally:
                busy.release()

        return handler

    environments = ExecutionEnvironments(new_environment)
    threads = [threading.Thread(target=environments.invoke, args=({}, None)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert environments.started == 6
    for _ in range(3):  # one at a time: the warm environments are reused, none started
        environments.invoke({}, None)
    assert environments.started == 6


def test_function_url_events_carry_json_as_text_and_binary_as_base64() -> None:
    text = function_url_event("POST", "/fal/x", "a=1", {"content-type": "application/json"}, b'{"k": "\xc3\xa9"}', "h", "1.2.3.4")
    assert text["isBase64Encoded"] is False and text["body"] == '{"k": "é"}'
    assert text["queryStringParameters"] == {"a": "1"} and text["requestContext"]["http"]["method"] == "POST"
    binary = function_url_event("POST", "/fal/x", "", {"content-type": "application/octet-stream"}, b"\x00\x01", "h", "1.2.3.4")
    assert binary["isBase64Encoded"] is True and binary["body"] == "AAE="
