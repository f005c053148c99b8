"""Lambda's execution environments, locally: the built artifact, on the deployed runtime, read-only, one role each.

Each execution environment is a python3.13 process (the runtime the template
deploys) started from the build (``sam build``'s layout), with the function's
folder and the layer mounted read-only when this machine allows it (a mount
namespace, as root), the template's environment, and credentials of the
function's own role. It speaks Lambda's Runtime API to a server of its own
(:mod:`kontext_s3_tools.lambda_bootstrap` is its runtime client), so the
handler runs exactly as on Lambda: imported once (the init phase), then
invoked one event at a time.

A :class:`LocalFunction` keeps a pool of environments: an invocation takes an
idle one, or starts a new one while under the function's concurrency limit
(reserved concurrency, or the event source's maximum); beyond it a
synchronous invocation is throttled, as Lambda throttles it. An invocation
past the function's timeout kills its environment. What the functions print
(their JSON logs and metrics) goes to a log file per function.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, TextIO

from kontext_s3_tools.http_server import QuietHTTPServer
from kontext_s3_tools.template_model import ACCOUNT, REGION

BOOTSTRAP = Path(__file__).resolve().parent / "lambda_bootstrap.py"


class Throttled(RuntimeError):
    """No execution environment is free and the function is at its concurrency limit."""


class FunctionError(RuntimeError):
    """The handler raised, timed out, or its environment died."""

    def __init__(self, message: str, error_type: str = "Unhandled") -> None:
        super().__init__(message)
        self.error_type = error_type


def find_python313() -> str:
    """The python3.13 interpreter (the runtime the template deploys): on PATH, or pyenv's."""
    found = shutil.which("python3.13")
    if found and not found.endswith("/shims/python3.13"):
        return found
    pyenv = shutil.which("pyenv")
    if pyenv:
        answer = subprocess.run(
            [pyenv, "which", "python3.13"], env={**os.environ, "PYENV_VERSION": "3.13.0"}, capture_output=True, text=True, check=False
        )
        if answer.returncode == 0 and answer.stdout.strip():
            return answer.stdout.strip()
    if found:
        return found
    raise RuntimeError("python3.13 not found: the functions run on the runtime the template deploys (pyenv install 3.13)")


@functools.cache
def read_only_mounts_available() -> bool:
    """Whether this machine lets us mount the artifact read-only in a private mount namespace."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "-m", "true"], capture_output=True, check=False) if unshare else None
    return probe is not None and probe.returncode == 0


@dataclass
class FunctionSpec:
    logical_id: str
    name: str
    handler: str
    code_dir: Path
    layer_dir: Path | None
    environment: dict[str, str]
    timeout_seconds: float
    memory_mb: int
    max_concurrency: int
    #: Fresh credentials of the function's role, for each new environment.
    credentials: Callable[[], dict[str, str]]
    log_path: Path | None = None


@dataclass
class _Invocation:
    request_id: str
    event: Any
    deadline_ms: int
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: dict[str, Any] | None = None


class ExecutionEnvironment:
    def __init__(self, spec: FunctionSpec, *, python: str, read_only_root: Path | None, log: Callable[[str], None]) -> None:
        self.spec = spec
        self.id = uuid.uuid4().hex[:8]
        self._log = log
        self._next: queue.Queue[_Invocation | None] = queue.Queue()
        self._pending: dict[str, _Invocation] = {}
        self._ready = threading.Event()
        self._init_error: dict[str, Any] | None = None
        self.init_ms: float | None = None
        self._server = QuietHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name=f"runtime-api-{self.id}", daemon=True).start()
        api = f"127.0.0.1:{self._server.server_address[1]}"
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            **spec.environment,
            **spec.credentials(),
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.13",
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": f"local/[$LATEST]{self.id}",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_LAMBDA_RUNTIME_API": api,
            "LAMBDA_TASK_ROOT": str(spec.code_dir),
            "KONTEXT_LAYER_ROOT": str(spec.layer_dir or ""),
            "_HANDLER": spec.handler,
        }
        command = [python, "-s", str(BOOTSTRAP)]
        if read_only_root is not None:
            # A private mount namespace where the whole build is read-only, as /var/task and /opt are on Lambda.
            command = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(read_only_root), *command]
        self.started = time.monotonic()
        self._process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, cwd="/"
        )
        threading.Thread(target=self._pump, args=(self._process.stdout,), daemon=True).start()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._init_error is not None:
                raise FunctionError(f"{self.spec.logical_id} failed to start: {self._init_error.get('errorMessage')}", "InitError")
            if self._process.poll() is not None:
                raise FunctionError(
                    f"{self.spec.logical_id}'s runtime exited with code {self._process.returncode} during init", "InitError"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise FunctionError(f"{self.spec.logical_id} did not finish its init within {timeout} s", "InitTimeout")

    def invoke(self, event: Any) -> Any:
        deadline_ms = int((time.time() + self.spec.timeout_seconds) * 1000)
        invocation = _Invocation(str(uuid.uuid4()), event, deadline_ms)
        self._pending[invocation.request_id] = invocation
        self._next.put(invocation)
        finished = invocation.done.wait(self.spec.timeout_seconds + 1.0)
        self._pending.pop(invocation.request_id, None)
        if not finished:
            self.stop()  # Lambda ends an environment whose invocation timed out
            raise FunctionError(f"Task timed out after {self.spec.timeout_seconds:.2f} seconds", "Sandbox.Timedout")
        if invocation.error is not None:
            raise FunctionError(str(invocation.error.get("errorMessage")), str(invocation.error.get("errorType", "Unhandled")))
        return invocation.result

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._next.put(None)
        self._server.shutdown()
        self._server.server_close()

    def _pump(self, stream: TextIO | None) -> None:
        assert stream is not None
        for line in stream:
            if line.startswith("INIT_REPORT Init Duration:"):
                self.init_ms = float(line.split(":", 1)[1].strip().split()[0])
            self._log(f"{self.id} {line.rstrip()}")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        environment = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the runtime process has exited (the stack is stopping): nobody is left to answer

            def do_GET(self) -> None:
                if not self.path.endswith("/runtime/invocation/next"):
                    return self._answer(404)
                environment._ready.set()
                invocation = environment._next.get()
                if invocation is None:  # stopping
                    return self._answer(410)
                return self._answer(
                    200,
                    json.dumps(invocation.event).encode("utf-8"),
                    {
                        "Content-Type": "application/json",
                        "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                        "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
                        "Lambda-Runtime-Invoked-Function-Arn": f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{environment.spec.name}",
                        "Lambda-Runtime-Trace-Id": f"Root=1-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:24]};Sampled=0",
                    },
                )

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = json.loads(self.rfile.read(length) or b"null")
                parts = self.path.split("/")
                if self.path.endswith("/runtime/init/error"):
                    environment._init_error = payload or {}
                    return self._answer(202)
                if "invocation" in parts and len(parts) >= 2:
                    invocation = environment._pending.get(parts[-2])
                    if invocation is not None:
                        if parts[-1] == "response":
                            invocation.result = payload
                        else:
                            invocation.error = payload or {"errorMessage": "unknown error"}
                        invocation.done.set()
                    return self._answer(202)
                return self._answer(404)

        return Handler


class LocalFunction:
    """One function: its spec and its pool of execution environments."""

    def __init__(self, spec: FunctionSpec, *, python: str | None = None, read_only_root: Path | None = None, echo: bool = False) -> None:
        self.spec = spec
        self._python = python or find_python313()
        self._read_only_root = read_only_root
        self._echo = echo
        self._idle: deque[ExecutionEnvironment] = deque()
        self._all: list[ExecutionEnvironment] = []
        self._lock = threading.Condition()
        self._log_lock = threading.Lock()
        self._log_file = spec.log_path.open("a", encoding="utf-8") if spec.log_path else None
        self.lines: deque[str] = deque(maxlen=5000)
        self.invocations = 0
        self.throttles = 0
        self.cold_starts = 0

    def log(self, line: str) -> None:
        with self._log_lock:
            self.lines.append(line)
            if self._log_file:
                self._log_file.write(line + "\n")
                self._log_file.flush()
            if self._echo:
                print(f"[{self.spec.logical_id}] {line}", file=sys.stderr, flush=True)

    def _environment(self, wait: bool) -> ExecutionEnvironment:
        with self._lock:
            while True:
                while self._idle:
                    environment = self._idle.pop()
                    if environment.alive:
                        return environment
                    self._all.remove(environment)
                if len(self._all) < self.spec.max_concurrency:
                    break
                if not wait:
                    self.throttles += 1
                    raise Throttled(f"{self.spec.logical_id} is at its concurrency limit ({self.spec.max_concurrency})")
                self._lock.wait()
            placeholder = ExecutionEnvironment.__new__(ExecutionEnvironment)
            self._all.append(placeholder)  # hold the place while it starts
        try:
            environment = ExecutionEnvironment(self.spec, python=self._python, read_only_root=self._read_only_root, log=self.log)
            environment.wait_ready()
        except BaseException:
            with self._lock:
                self._all.remove(placeholder)
                self._lock.notify()
            raise
        with self._lock:
            self._all[self._all.index(placeholder)] = environment
            self.cold_starts += 1
        return environment

    def invoke(self, event: Any, *, wait: bool = True) -> Any:
        """Run one event in an execution environment; :class:`Throttled` when ``wait`` is false and none is free."""
        environment = self._environment(wait)
        try:
            self.invocations += 1
            return environment.invoke(event)
        finally:
            with self._lock:
                if environment.alive:
                    self._idle.append(environment)
                else:
                    self._all.remove(environment)
                self._lock.notify()

    def warm(self) -> None:
        """Start one environment now (its init phase), so the first event does not wait for it."""
        environment = self._environment(wait=True)
        with self._lock:
            self._idle.append(environment)
            self._lock.notify()

    def pids(self) -> list[int]:
        """The process ids of this function's running execution environments."""
        with self._lock:
            return [e._process.pid for e in self._all if isinstance(getattr(e, "_process", None), subprocess.Popen) and e.alive]

    def stop(self) -> None:
        with self._lock:
            environments, self._all, self._idle = list(self._all), [], deque()
        for environment in environments:
            if isinstance(getattr(environment, "_process", None), subprocess.Popen):
                environment.stop()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
