"""Waiting for Ctrl-C or SIGTERM, for the commands that keep servers running."""

from __future__ import annotations

import contextlib
import signal
import threading


def wait_until_stopped() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
