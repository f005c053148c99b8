"""The local execution environments keep Lambda's rules, or the tests that run on them mean little."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kontext_s3_tools.lambda_runtime import FunctionError, FunctionSpec, LocalFunction, Throttled, read_only_mounts_available

HANDLER = """
import os, sys, time
STARTED = time.time()

def lambda_handler(event, context):
    if event.get("raise"):
        raise ValueError("the handler says no")
    if event.get("sleep"):
        time.sleep(event["sleep"])
    if event.get("write"):
        try:
            open(os.path.join(os.environ["LAMBDA_TASK_ROOT"], "scribble.txt"), "w").write("x")
            wrote = "yes"
        except OSError as exc:
            wrote = type(exc).__name__ + ": " + str(exc)
        return {"wrote": wrote}
    return {
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "path0": sys.path[0],
        "remaining_ms": context.get_remaining_time_in_millis(),
        "request_id": context.aws_request_id,
        "probe": os.environ.get("PROBE"),
    }
"""


@pytest.fixture
def function(tmp_path: Path) -> Iterator[LocalFunction]:
    code = tmp_path / "build" / "ProbeFunction"
    code.mkdir(parents=True)
    (code / "app.py").write_text(HANDLER)
    spec = FunctionSpec(
        logical_id="ProbeFunction",
        name="probe",
        handler="app.lambda_handler",
        code_dir=code,
        layer_dir=None,
        environment={"PROBE": "from the template"},
        timeout_seconds=3.0,
        memory_mb=256,
        max_concurrency=1,
        credentials=lambda: {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
        log_path=tmp_path / "probe.log",
    )
    read_only = tmp_path / "build" if read_only_mounts_available() else None
    local = LocalFunction(spec, read_only_root=read_only)
    yield local
    local.stop()


def test_a_handler_runs_on_python_313_with_its_environment_and_a_deadline(function: LocalFunction) -> None:
    answer = function.invoke({})
    assert answer["python"].startswith("3.13")
    assert answer["probe"] == "from the template"
    assert answer["path0"].endswith("ProbeFunction")  # the task root comes first, as on Lambda
    assert 0 < answer["remaining_ms"] <= 3000
    again = function.invoke({})
    assert again["pid"] == answer["pid"] and again["request_id"] != answer["request_id"]  # warm: the same environment
    assert function.cold_starts == 1


def test_an_error_surfaces_with_its_type_and_the_environment_survives(function: LocalFunction) -> None:
    with pytest.raises(FunctionError, match="the handler says no") as info:
        function.invoke({"raise": True})
    assert info.value.error_type == "ValueError"
    assert function.invoke({})["probe"] == "from the template"
    assert any("ValueError" in line for line in function.lines)  # the traceback is in the function's log


def test_an_invocation_past_the_timeout_ends_its_environment(function: LocalFunction) -> None:
    first = function.invoke({})["pid"]
    with pytest.raises(FunctionError, match="timed out"):
        function.invoke({"sleep": 10})
    assert function.invoke({})["pid"] != first  # a new environment: a cold start
    assert function.cold_starts == 2


def test_beyond_the_concurrency_limit_a_synchronous_invocation_is_throttled(function: LocalFunction) -> None:
    function.invoke({})  # one environment, warm
    busy = threading.Thread(target=function.invoke, args=({"sleep": 1.0},))
    busy.start()
    time.sleep(0.3)
    with pytest.raises(Throttled):
        function.invoke({}, wait=False)
    busy.join()
    assert function.throttles == 1


@pytest.mark.skipif(not read_only_mounts_available(), reason="needs a private mount namespace (root)")
def test_the_artifact_is_read_only_as_on_lambda(function: LocalFunction) -> None:
    assert "Read-only file system" in function.invoke({"write": True})["wrote"]
