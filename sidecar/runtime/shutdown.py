"""Stopping without dropping requests: the timings of a graceful stop and their order.

After SIGTERM a Kubernetes endpoint stays in Services and load balancers until the removal has
propagated (a few seconds). Closing the listeners at once would refuse every connection sent
in that window, so the stop runs in three phases:

1. *delay*: ``/readyz`` answers 503 at once, the listeners keep accepting for
   ``shutdown.delay_seconds``; every response carries ``Connection: close`` so clients with
   kept-alive connections reconnect (to a pod that stays).
2. *drain*: the listeners close; requests in flight get up to ``shutdown.drain_seconds``.
3. *stop*: whatever is still running is cut off; the process exits 0.

A second SIGTERM or SIGINT during the delay skips the rest of the delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.config.models import SidecarConfig
from sidecar.report.logs import log_event

# How long the proxy may take to close its listening sockets before the drain starts anyway.
CLOSE_LISTENERS_DEADLINE_SECONDS = 5.0
POLL_SECONDS = 0.05
DEPRECATED_DRAIN_ENV = "FHIR_SIDECAR_DRAIN_SECONDS"


@dataclass(frozen=True)
class ShutdownTimings:
    delay_seconds: float
    drain_seconds: float

    @property
    def grace_seconds(self) -> int:
        """The shortest ``terminationGracePeriodSeconds`` that never kills a drain (5 s spare)."""
        return math.ceil(self.delay_seconds + self.drain_seconds) + 5


def shutdown_timings(config: SidecarConfig, env_drain_seconds: float | None
                     ) -> tuple[ShutdownTimings, str | None]:
    """The timings to use, and a deprecation warning when the old environment variable counts.

    ``FHIR_SIDECAR_DRAIN_SECONDS`` is the deprecated spelling of ``shutdown.drain_seconds``: it
    applies only while the config file does not set that key itself.
    """
    settings = config.shutdown
    drain = settings.drain_seconds
    warning = None
    if env_drain_seconds is not None:
        in_file = "shutdown" in config.model_fields_set and \
            "drain_seconds" in settings.model_fields_set
        if in_file:
            warning = (f"{DEPRECATED_DRAIN_ENV} is deprecated and ignored: the config file sets "
                       f"shutdown.drain_seconds ({drain:g})")
        else:
            drain = max(0.0, env_drain_seconds)
            warning = (f"{DEPRECATED_DRAIN_ENV} is deprecated: set shutdown.drain_seconds in "
                       f"the config file instead (using {drain:g})")
    return ShutdownTimings(settings.delay_seconds, drain), warning


@dataclass
class GracefulStop:
    """Runs the phases above against the proxy, through four small callables.

    ``begin_draining()`` makes ``/readyz`` answer 503 and responses close their connections;
    ``close_listeners()`` stops accepting; ``listening()`` says whether any listener is still
    bound; ``in_flight()`` counts requests not finished yet.
    """

    begin_draining: Callable[[], None]
    close_listeners: Callable[[], None]
    listening: Callable[[], bool]
    in_flight: Callable[[], int]
    clock: Callable[[], float] = time.monotonic

    async def run(self, timings: ShutdownTimings, cut_short: asyncio.Event) -> int:
        """Returns how many requests were still in flight when the drain time ran out."""
        self.begin_draining()
        log_event("draining", delay_seconds=timings.delay_seconds,
                  drain_seconds=timings.drain_seconds, in_flight=self.in_flight())
        if timings.delay_seconds > 0 and not cut_short.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cut_short.wait(), timings.delay_seconds)
        self.close_listeners()
        deadline = self.clock() + CLOSE_LISTENERS_DEADLINE_SECONDS
        while self.listening() and self.clock() < deadline:
            await asyncio.sleep(POLL_SECONDS / 2)
        log_event("listeners_closed", in_flight=self.in_flight())
        deadline = self.clock() + timings.drain_seconds
        while self.in_flight() > 0 and self.clock() < deadline:
            await asyncio.sleep(POLL_SECONDS)
        left = self.in_flight()
        if left > 0:
            log_event("drain_timeout", logging.WARNING,
                      f"{left} requests still in flight after shutdown.drain_seconds "
                      f"({timings.drain_seconds:g} s) are cut off", in_flight=left)
        return left
