"""fal's queue for one account, as fal documents it (``concurrency-limits``, ``common-parameters``).

* At most ``concurrency`` requests are ``IN_PROGRESS`` at once (fal: 2 for a new
  account, up to 40); ``None`` is unlimited. The rest wait ``IN_QUEUE`` and are
  never rejected; they start in the order they came, as slots free.
* ``queue_position`` is a request's true place in that line (0 = next).
* A request with a start deadline (``X-Fal-Request-Timeout``) that has not
  started by then ends without ever running.
* Peaks (``IN_PROGRESS``, and open = ``IN_QUEUE`` + ``IN_PROGRESS``) and a
  timeline of both are kept since the last reset, for load reports.

No thread waits per request: one scheduler thread keeps a heap of timers, and
the work of starting a request (fetching its input, editing) runs on a pool.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Slot:
    """What the scheduler knows of one request."""

    request_id: str
    submitted_at: float
    eligible_at: float
    start_deadline: float | None
    state: str = "IN_QUEUE"  # IN_QUEUE, IN_PROGRESS, DONE


@dataclass
class QueueStats:
    peak_in_progress: int = 0
    peak_open: int = 0
    #: (wall time, in progress, queued) after every change.
    timeline: list[tuple[float, int, int]] = field(default_factory=list)


class FalQueue:
    def __init__(
        self,
        *,
        concurrency: int | None,
        on_start: Callable[[str], None],
        on_start_timeout: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = concurrency
        self._on_start = on_start
        self._on_start_timeout = on_start_timeout
        self._clock = clock
        self._slots: dict[str, Slot] = {}
        self._line: deque[str] = deque()
        self._running = 0
        self._timers: list[tuple[float, int, Callable[[], Callable[[], None] | None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self.stats = QueueStats()
        self._thread = threading.Thread(target=self._loop, name="fal-emulator-queue", daemon=True)
        self._thread.start()

    # -- what the emulator calls --------------------------------------------------------

    def enqueue(self, request_id: str, *, queue_ms: int = 0, start_timeout: float | None = None) -> int:
        """Put a request in line; returns its queue position."""
        now = self._clock()
        with self._cond:
            slot = Slot(request_id, now, now + queue_ms / 1000, now + start_timeout if start_timeout else None)
            self._slots[request_id] = slot
            self._line.append(request_id)
            if slot.start_deadline is not None:
                self._at(slot.start_deadline, lambda: None)  # wake up to time it out
            self._note()
            self._cond.notify_all()
            return len(self._line) - 1

    def finish_at(self, request_id: str, when: float, then: Callable[[], None]) -> None:
        """At ``when``, the request's slot frees and ``then`` runs (off the lock)."""
        with self._cond:
            self._at(when, lambda: self._finish_locked(request_id, then))
            self._cond.notify_all()

    def cancel(self, request_id: str) -> bool:
        """Take a queued request out of the line; False when it has started (or ended)."""
        with self._cond:
            slot = self._slots.get(request_id)
            if slot is None or slot.state != "IN_QUEUE":
                return False
            self._line.remove(request_id)
            slot.state = "DONE"
            self._note()
            return True

    def position(self, request_id: str) -> int | None:
        with self._cond:
            slot = self._slots.get(request_id)
            if slot is None or slot.state != "IN_QUEUE":
                return None
            return self._line.index(request_id)

    def counts(self) -> tuple[int, int]:
        with self._cond:
            return self._running, len(self._line)

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return {
                "concurrency": self.concurrency,
                "in_progress": self._running,
                "in_queue": len(self._line),
                "peak_in_progress": self.stats.peak_in_progress,
                "peak_open": self.stats.peak_open,
            }

    def reset(self) -> None:
        with self._cond:
            self._slots.clear()
            self._line.clear()
            self._running = 0
            self._timers.clear()
            self.stats = QueueStats()

    def set_concurrency(self, concurrency: int | None) -> None:
        with self._cond:
            self.concurrency = concurrency
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # -- the scheduler ---------------------------------------------------------------------

    def _at(self, when: float, action: Callable[[], Callable[[], None] | None]) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), action))

    def _finish_locked(self, request_id: str, then: Callable[[], None]) -> Callable[[], None] | None:
        slot = self._slots.get(request_id)
        if slot is not None and slot.state == "IN_PROGRESS":
            slot.state = "DONE"
            self._running -= 1
            self._note()
        return then

    def _note(self) -> None:
        open_now = self._running + len(self._line)
        self.stats.peak_in_progress = max(self.stats.peak_in_progress, self._running)
        self.stats.peak_open = max(self.stats.peak_open, open_now)
        self.stats.timeline.append((time.time(), self._running, len(self._line)))

    def _loop(self) -> None:
        while True:
            starting: list[str] = []
            timed_out: list[str] = []
            callbacks: list[Callable[[], None]] = []
            with self._cond:
                if self._stopped:
                    return
                now = self._clock()
                while self._timers and self._timers[0][0] <= now:
                    callback = heapq.heappop(self._timers)[2]()
                    if callback is not None:
                        callbacks.append(callback)
                for request_id in [r for r in self._line if (d := self._slots[r].start_deadline) is not None and d <= now]:
                    self._line.remove(request_id)
                    self._slots[request_id].state = "DONE"
                    timed_out.append(request_id)
                while self._line and (self.concurrency is None or self._running < self.concurrency):
                    head = self._slots[self._line[0]]
                    if head.eligible_at > now:
                        self._at(head.eligible_at, lambda: None)
                        break
                    self._line.popleft()
                    head.state = "IN_PROGRESS"
                    self._running += 1
                    starting.append(head.request_id)
                if starting or timed_out:
                    self._note()
                elif not callbacks:
                    wait = (self._timers[0][0] - now) if self._timers else None
                    self._cond.wait(timeout=wait)
                    continue
            for callback in callbacks:
                callback()
            for request_id in timed_out:
                self._on_start_timeout(request_id)
            for request_id in starting:
                self._on_start(request_id)
