"""Shared fixtures: a moto server process, fresh resources per test, the fal emulator, handlers."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Callable, Iterator
from types import ModuleType

import boto3
import pytest

from kontext_s3_tools.emulator import FalEmulator
from kontext_s3_tools.local_stack import ROOT, MotoServer, function_environment, provision
from tests.helpers import FAL_KEY, Aws


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[FalEmulator]:
    emulator = FalEmulator(fal_key=FAL_KEY, webhook_attempts=3, webhook_backoff_seconds=0.1).start()
    yield emulator
    emulator.stop()


@pytest.fixture
def emulator(emulator_server: FalEmulator) -> FalEmulator:
    emulator_server.reset()
    return emulator_server


@pytest.fixture
def aws(moto_server: MotoServer) -> Aws:
    return Aws(endpoint=moto_server.url, resources=provision(moto_server.url, fal_key=FAL_KEY, max_receive_count=2))


@pytest.fixture
def load_handler(monkeypatch: pytest.MonkeyPatch) -> Callable[..., ModuleType]:
    """Import a fresh copy of ``functions/<name>/app.py`` with the given environment, as a cold start would."""

    def load(name: str, environment: dict[str, str]) -> ModuleType:
        for key, value in environment.items():
            monkeypatch.setenv(key, value)
        # A cold start is a new process: boto3's default session (and the configuration it resolved) starts afresh.
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
        module_name = f"kontext_test_{name}_{uuid.uuid4().hex[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "functions" / name / "app.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def function_env(aws: Aws, emulator: FalEmulator) -> Callable[..., dict[str, str]]:
    """The environment the template gives a function, pointed at this test's resources."""

    def build(webhook_url: str = "http://127.0.0.1:9/unused", **overrides: str) -> dict[str, str]:
        env = function_environment(aws.resources, emulator=emulator, webhook_url=webhook_url, aws_endpoint=aws.endpoint)
        env.update(overrides)
        return env

    return build
