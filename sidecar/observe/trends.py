"""Requests and errors per minute over the last hour, per connection, for the dashboard's
sparklines (docs/admin-api.md#health-and-trends).

A fixed ring of 60 per-minute buckets: memory does not grow with load or time, and recording a
request costs a minute computation, a compare and one or two integer adds. The time is passed
in by the caller (the status board reads its clock once per finished request already), so the
ring itself holds no clock and tests give it any time they like.
"""

from __future__ import annotations

from dataclasses import dataclass

MINUTES = 60


@dataclass(frozen=True)
class MinuteCount:
    minute: int  # minutes since the epoch (UTC): the bucket covers [minute*60, minute*60+60)
    requests: int
    errors: int


class MinuteRing:
    """Per-minute request and error counts of the last :data:`MINUTES` minutes."""

    __slots__ = ("_errors", "_minute", "_requests")

    def __init__(self) -> None:
        self._requests = [0] * MINUTES
        self._errors = [0] * MINUTES
        self._minute: int | None = None  # the newest minute written to

    def add(self, now: float, error: bool) -> None:
        """Count one finished request at ``now`` (epoch seconds); ``error``: it ended in one."""
        minute = int(now // 60)
        if minute != self._minute:
            minute = self._advance(minute)
        slot = minute % MINUTES
        self._requests[slot] += 1
        if error:
            self._errors[slot] += 1

    def series(self, now: float) -> list[MinuteCount]:
        """The last :data:`MINUTES` minutes up to and including ``now``'s, oldest first."""
        current = int(now // 60)
        newest = self._minute
        found = []
        for minute in range(current - MINUTES + 1, current + 1):
            # A bucket is valid only if it was written within the hour before its minute's
            # slot was reused: older slots hold counts from an earlier lap of the ring.
            if newest is not None and newest - MINUTES < minute <= newest:
                slot = minute % MINUTES
                found.append(MinuteCount(minute, self._requests[slot], self._errors[slot]))
            else:
                found.append(MinuteCount(minute, 0, 0))
        return found

    def _advance(self, minute: int) -> int:
        """Make ``minute`` the newest bucket, emptying the slots it passes; its minute."""
        newest = self._minute
        if newest is not None and minute < newest:
            # The wall clock went back: count into the newest bucket rather than into a slot
            # that holds a later minute.
            return newest
        if newest is None or minute - newest >= MINUTES:
            self._requests = [0] * MINUTES
            self._errors = [0] * MINUTES
        else:
            for stale in range(newest + 1, minute + 1):  # at most MINUTES - 1 slots
                self._requests[stale % MINUTES] = 0
                self._errors[stale % MINUTES] = 0
        self._minute = minute
        return minute
