"""What the dashboard draws from the views: relative times, sparklines and the token bar
(docs/admin-api.md#health-and-trends).

Plain functions from numbers and ISO 8601 times to words and SVG coordinates, so the templates
only place them and tests can check the arithmetic. Nothing here reads the clock: ``now`` is
always given.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# The sparkline's drawing area: one minute every SPARK_STEP px, counts from SPARK_BASE (zero)
# up to SPARK_TOP (the busiest minute of the hour).
SPARK_STEP = 2
SPARK_HEIGHT = 30
SPARK_BASE = SPARK_HEIGHT - 1
SPARK_TOP = 1
BAR_WIDTH = 100
BAR_HEIGHT = 8


@dataclass(frozen=True)
class When:
    """A moment as the dashboard shows it: relative words, the exact UTC time on hover."""

    iso: str  # for <time datetime="...">
    exact: str  # "2026-11-29 00:22:27 UTC"
    relative: str  # "3 h ago", "in 4 min", "just now"


def parse_iso(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(dt.UTC)


def when(iso: str, now: float) -> When:
    moment = parse_iso(iso)
    return When(iso=iso, exact=moment.strftime("%Y-%m-%d %H:%M:%S UTC"),
                relative=relative(moment.timestamp() - now))


def relative(seconds: float) -> str:
    """``seconds`` from now in words: negative is past ("3 h ago"), positive future ("in 4 min").

    Rounded down to the largest unit that fits (s, min, h, days), so a token valid for 59 more
    seconds never reads as "in 1 min".
    """
    size = abs(seconds)
    if size < 5:
        return "just now"
    if size < 60:
        amount = f"{int(size)} s"
    elif size < 3600:
        amount = f"{int(size // 60)} min"
    elif size < 48 * 3600:
        amount = f"{int(size // 3600)} h"
    else:
        amount = f"{int(size // 86400)} days"
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


@dataclass(frozen=True)
class Sparkline:
    width: int
    height: int
    peak: int  # the busiest minute's requests: the top of the drawing (at least 1)
    requests: str  # SVG polyline points, oldest minute first
    errors: str
    total_requests: int
    total_errors: int


def sparkline(requests: Sequence[int], errors: Sequence[int]) -> Sparkline:
    """Both series on the scale of the busiest minute's requests (errors are requests too)."""
    peak = max(1, *requests) if requests else 1
    return Sparkline(width=max(1, (len(requests) - 1) * SPARK_STEP + 1), height=SPARK_HEIGHT,
                     peak=peak, requests=_points(requests, peak), errors=_points(errors, peak),
                     total_requests=sum(requests), total_errors=sum(errors))


def spark_y(count: int, peak: int) -> float:
    return round(SPARK_BASE - (SPARK_BASE - SPARK_TOP) * count / peak, 2)


def _points(counts: Sequence[int], peak: int) -> str:
    return " ".join(f"{i * SPARK_STEP},{spark_y(c, peak):g}" for i, c in enumerate(counts))


@dataclass(frozen=True)
class Bar:
    width: int
    height: int
    filled: float  # px of ``width``
    percent: int


def token_bar(token: dict[str, Any]) -> Bar | None:
    """The token's remaining lifetime as a share of its whole lifetime; None without one."""
    left, lifetime = token.get("seconds_left"), token.get("lifetime_seconds")
    if left is None or not lifetime:
        return None
    share = min(1.0, max(0.0, left / lifetime))
    return Bar(BAR_WIDTH, BAR_HEIGHT, round(share * BAR_WIDTH, 1), int(share * 100))


_WORST_FIRST = {"red": 0, "amber": 1, "green": 2}


def broken_first(connections: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Connection views with red rows first, then amber, then green; by name within each."""
    return sorted(connections, key=lambda c: (_WORST_FIRST.get(c["health"]["light"], 0),
                                              c["name"]))


def light_summary(connections: Iterable[dict[str, Any]]) -> str:
    """How many connections are red, amber and green: "1 red, 2 amber, 5 green"."""
    lights = [c["health"]["light"] for c in connections]
    return ", ".join(f"{lights.count(light)} {light}" for light in _WORST_FIRST)
