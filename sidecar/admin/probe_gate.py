"""How often a connection or OAuth definition may be tested: one test at a time each, and at
most one start per second, so that the Test button cannot be used to hammer an upstream or a
token endpoint (docs/admin-api.md#testing-a-connection)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable

MIN_INTERVAL_SECONDS = 1.0
_MAX_REMEMBERED = 10_000  # names come from the config; this only bounds a pathological one


class ProbeBusy(Exception):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ProbeGate:
    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 interval: float = MIN_INTERVAL_SECONDS):
        self._clock = clock
        self._interval = interval
        self._running: set[Hashable] = set()
        self._started: dict[Hashable, float] = {}

    def enter(self, key: Hashable, what: str) -> None:
        """Admit a test of ``key`` (``what`` names it for the refusal) or raise ProbeBusy."""
        if key in self._running:
            raise ProbeBusy(f"a test of {what} is running; wait for its result", 1)
        now = self._clock()
        last = self._started.get(key)
        if last is not None and now - last < self._interval:
            wait = self._interval - (now - last)
            raise ProbeBusy(f"{what} was tested less than {self._interval:g} s ago; try again "
                            f"in {wait:.1f} s", max(1, math.ceil(wait)))
        if len(self._started) >= _MAX_REMEMBERED:
            self._started = {k: t for k, t in self._started.items()
                             if now - t < self._interval}
        self._started[key] = now
        self._running.add(key)

    def leave(self, key: Hashable) -> None:
        self._running.discard(key)
