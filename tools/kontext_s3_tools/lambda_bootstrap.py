"""The runtime client inside one local execution environment: Lambda's Runtime API, as the python3.13 runtime speaks it.

Run by :mod:`kontext_s3_tools.lambda_runtime` with the interpreter of the
deployed runtime (python3.13), from outside the function's artifact, like
Lambda's ``/var/runtime/bootstrap``. Standard library only. It puts the task
root and the layer on ``sys.path`` in Lambda's order, imports the handler (the
init phase), then loops: ``GET /runtime/invocation/next``, call the handler,
``POST`` its response or error. An import failure is ``POST /runtime/init/error``.
"""

import importlib
import json
import os
import sys
import time
import traceback
import urllib.request

_BASE = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"


class LambdaContext:
    """The context object the handler gets (the attributes Powertools and the handlers read)."""

    def __init__(self, request_id: str, deadline_ms: int, function_arn: str) -> None:
        self.aws_request_id = request_id
        self.invoked_function_arn = function_arn
        self.function_name = os.environ["AWS_LAMBDA_FUNCTION_NAME"]
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = int(os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"))
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))


def _post(path: str, payload: object) -> None:
    data = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(f"{_BASE}{path}", data=data, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        answer.read()


def _error(exc: BaseException) -> dict[str, object]:
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "stackTrace": traceback.format_exception(type(exc), exc, exc.__traceback__),
    }


def main() -> None:
    task_root = os.environ["LAMBDA_TASK_ROOT"]
    layer = os.environ.get("KONTEXT_LAYER_ROOT", "")
    # Lambda's order: the function's own code, then the layer (/opt/python), then the runtime.
    sys.path[:0] = [task_root, *([os.path.join(layer, "python")] if layer else [])]
    module_name, _, function_name = os.environ["_HANDLER"].rpartition(".")
    started = time.perf_counter()
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
    except Exception as exc:
        traceback.print_exc()
        _post("/init/error", _error(exc))
        sys.exit(1)
    print(f"INIT_REPORT Init Duration: {(time.perf_counter() - started) * 1000:.2f} ms", flush=True)
    while True:
        with urllib.request.urlopen(f"{_BASE}/invocation/next") as answer:
            request_id = answer.headers["Lambda-Runtime-Aws-Request-Id"]
            deadline_ms = int(answer.headers["Lambda-Runtime-Deadline-Ms"])
            function_arn = answer.headers["Lambda-Runtime-Invoked-Function-Arn"]
            event = json.loads(answer.read())
        print(f"START RequestId: {request_id}", flush=True)
        began = time.perf_counter()
        try:
            result = handler(event, LambdaContext(request_id, deadline_ms, function_arn))
        except Exception as exc:
            traceback.print_exc()
            _post(f"/invocation/{request_id}/error", _error(exc))
        else:
            _post(f"/invocation/{request_id}/response", result)
        print(f"REPORT RequestId: {request_id}\tDuration: {(time.perf_counter() - began) * 1000:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
