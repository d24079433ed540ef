"""Bounds on what an app connection and a slow upstream may cost: two small addons.

``ClientLimits`` applies the config's ``limits``: a request head larger than
``max_request_header_bytes`` is answered with 431 and never forwarded; a head must be complete
within ``client_header_timeout_seconds`` of its first byte; a connection that carries no request
for ``client_idle_timeout_seconds`` is closed. ``UpstreamReadTimeout`` aborts the app's
connection when an upstream falls silent for ``read_timeout_seconds`` while sending a response
body. Each timer reads the settings of the snapshot current when it starts, so a reload applies
from the next request (or the next idle period) on.

mitmproxy's own ``tcp_timeout`` is no substitute: it counts any silence on a connection (also a
request waiting for its upstream), is read once when a connection is accepted, and never sees
a head dribbled byte by byte. It is kept as a backstop above every timeout of the config.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from mitmproxy import connection, ctx, http
from mitmproxy.addonmanager import Loader

from sidecar.config.models import LimitsSettings
from sidecar.proxy import mitm_compat
from sidecar.proxy.error_answers import error_bytes
from sidecar.proxy.flow_state import new_request_id, state_of
from sidecar.report.logs import log_event
from sidecar.request.errors import ErrorKind, SidecarError
from sidecar.runtime.snapshot import Snapshot

DEFAULT_LIMITS = LimitsSettings()
MITMPROXY_TCP_TIMEOUT = 600  # mitmproxy's default, kept as the least backstop
BACKSTOP_MARGIN_SECONDS = 30


def tcp_timeout_for(snapshot: Snapshot) -> int:
    """mitmproxy's ``tcp_timeout`` for ``snapshot``: longer than any wait the config allows.

    mitmproxy closes a connection on which nothing at all happened for that long, without an
    answer, even while a request is waiting for its upstream.
    """
    limits = snapshot.config.limits
    longest = max([limits.client_header_timeout_seconds, limits.client_idle_timeout_seconds,
                   *(c.timeout_seconds for c in snapshot.connections.values()),
                   *(c.read_timeout_seconds for c in snapshot.connections.values())])
    return max(MITMPROXY_TCP_TIMEOUT, math.ceil(longest) + BACKSTOP_MARGIN_SECONDS)


class _Phase(Enum):
    IDLE = "idle"  # waiting for the first byte of a request
    HEAD = "head"  # a request head has begun and must be completed


@dataclass
class _Deadline:
    phase: _Phase
    handle: asyncio.TimerHandle


class ClientLimits:
    """Header size and header/idle deadlines for app connections (``limits`` in the config)."""

    def __init__(self, snapshot: Callable[[], Snapshot | None]):
        self._snapshot = snapshot
        self._deadlines: dict[str, _Deadline] = {}
        self._backstop_for: Snapshot | None = None
        mitm_compat.guard_request_heads(self)

    def _limits(self) -> LimitsSettings:
        current = self._snapshot()
        return current.config.limits if current is not None else DEFAULT_LIMITS

    # -- hooks -------------------------------------------------------------------------------

    def running(self) -> None:
        self._update_backstop()

    def client_connected(self, client: connection.Client) -> None:
        # The connection after a reload gets the new backstop; this one has read it already.
        self._update_backstop()
        self._arm(client, _Phase.IDLE)

    def client_disconnected(self, client: connection.Client) -> None:
        deadline = self._deadlines.pop(client.id, None)
        if deadline is not None:
            deadline.handle.cancel()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # A request is being handled: its own timeouts apply until it is answered.
        self._disarm(flow.client_conn)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # A CONNECT head never reaches ``requestheaders``; the tunnel's first request must
        # begin within the idle timeout.
        self._arm(flow.client_conn, _Phase.IDLE)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.status_code == 101:
            return  # a protocol switch: no more HTTP requests on this connection
        self._arm(flow.client_conn, _Phase.IDLE)

    def error(self, flow: http.HTTPFlow) -> None:
        self._arm(flow.client_conn, _Phase.IDLE)

    # -- mitm_compat.RequestHeadGuard --------------------------------------------------------

    def max_head_bytes(self) -> int:
        return self._limits().max_request_header_bytes

    def head_bytes_arrived(self, client: connection.Client) -> None:
        deadline = self._deadlines.get(client.id)
        if deadline is None or deadline.phase is _Phase.IDLE:
            self._arm(client, _Phase.HEAD)

    def head_too_large(self, client: connection.Client, limit: int) -> bytes:
        log_event("request_header_too_large", logging.WARNING,
                  f"a request head from {_peer(client)} exceeded {limit} bytes "
                  "(limits.max_request_header_bytes): answered 431, nothing sent upstream")
        problem = SidecarError(
            ErrorKind.HEADER_TOO_LARGE,
            f"the request line and headers exceed {limit} bytes "
            "(limits.max_request_header_bytes); nothing was sent upstream")
        return error_bytes(problem, new_request_id())

    # -- deadlines ---------------------------------------------------------------------------

    def _update_backstop(self) -> None:
        current = self._snapshot()
        if current is None or current is self._backstop_for:
            return
        self._backstop_for = current
        wanted = tcp_timeout_for(current)
        if ctx.options.tcp_timeout != wanted:
            ctx.options.update(tcp_timeout=wanted)

    def _arm(self, client: connection.Client, phase: _Phase) -> None:
        self._disarm(client)
        limits = self._limits()
        seconds = (limits.client_idle_timeout_seconds if phase is _Phase.IDLE
                   else limits.client_header_timeout_seconds)
        handle = asyncio.get_running_loop().call_later(seconds, self._expired, client, phase,
                                                      seconds)
        self._deadlines[client.id] = _Deadline(phase, handle)

    def _disarm(self, client: connection.Client) -> None:
        deadline = self._deadlines.pop(client.id, None)
        if deadline is not None:
            deadline.handle.cancel()

    def _expired(self, client: connection.Client, phase: _Phase, seconds: float) -> None:
        self._deadlines.pop(client.id, None)
        if not mitm_compat.close_client(client):
            return
        if phase is _Phase.HEAD:
            log_event("client_header_timeout", logging.INFO,
                      f"closed the connection from {_peer(client)}: its request head was not "
                      f"complete within {seconds:g} s (limits.client_header_timeout_seconds)")
        else:
            log_event("client_idle_timeout", logging.DEBUG,
                      f"closed the connection from {_peer(client)}: no request for "
                      f"{seconds:g} s (limits.client_idle_timeout_seconds)")


class UpstreamReadTimeout:
    """Aborts the app's connection when the upstream stalls in the middle of a response body.

    ``timeout_seconds`` ends when the response headers arrive; from then on the body must keep
    coming: at most ``read_timeout_seconds`` of silence. A response cut short must not look
    complete to the app, so its connection is reset, and the request is logged and counted
    as ``upstream-timeout``.
    """

    def __init__(self) -> None:
        self._timers: weakref.WeakKeyDictionary[http.HTTPFlow, asyncio.TimerHandle] = (
            weakref.WeakKeyDictionary())

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or state.connection is None or state.error is not None:
            return
        self._schedule(flow, state.connection.read_timeout_seconds)

    def response(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._cancel(flow)

    def _schedule(self, flow: http.HTTPFlow, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers[flow] = loop.call_later(delay, self._check, flow)

    def _cancel(self, flow: http.HTTPFlow) -> None:
        timer = self._timers.pop(flow, None)
        if timer is not None:
            timer.cancel()

    def _check(self, flow: http.HTTPFlow) -> None:
        self._timers.pop(flow, None)
        state = state_of(flow)
        last = mitm_compat.last_activity(flow.client_conn)
        if state is None or state.connection is None or last is None:
            return
        limit = state.connection.read_timeout_seconds
        silent = time.time() - last
        if silent < limit:
            self._schedule(flow, limit - silent)
            return
        state.error = ErrorKind.UPSTREAM_TIMEOUT.value
        name = state.connection.name
        log_event("upstream_stalled", logging.WARNING,
                  f"connection '{name}': {state.connection.upstream.host_header} sent no part "
                  f"of the response body for {limit:g} s (read_timeout_seconds); the app's "
                  "connection was aborted", connection=name, request_id=state.request_id,
                  error=state.error)
        mitm_compat.close_client(flow.client_conn, reset=True)


class UpstreamDeadline:
    """``timeout_seconds``: from sending the request until the response headers arrive.

    mitmproxy has no per-request upstream deadline: the timer starts when the request is about
    to be sent; response headers (or an error) stop it. When it fires, the upstream connection
    is closed, and the request fails through the usual error path as ``upstream-timeout``.

    A request with ``Expect: 100-continue`` and a body has its upstream connection opened
    before the app is told to continue (``mitm_compat.continue_only_when_connected``): that
    opening is bounded by the same deadline, stopped once the connection is open, and the
    deadline starts again when the request is sent.
    """

    def load(self, loader: Loader) -> None:
        mitm_compat.continue_only_when_connected(self.continuing)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.headers.get("expect", "").lower() == "100-continue":
            self._start(flow)

    def continuing(self, flow: http.HTTPFlow) -> None:
        _stop(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        _stop(flow)
        self._start(flow)

    def _start(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow)
        if state is None or state.connection is None or flow.response is not None:
            return
        loop = asyncio.get_running_loop()
        state.timer = loop.call_later(state.connection.timeout_seconds, _timed_out, flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        _stop(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        _stop(flow)


def _stop(flow: http.HTTPFlow) -> None:
    state = state_of(flow)
    if state is not None and state.timer is not None:
        state.timer.cancel()
        state.timer = None


def _timed_out(flow: http.HTTPFlow) -> None:
    state = state_of(flow)
    assert state is not None and state.connection is not None
    state.timed_out = True
    upstream = state.connection.upstream
    mitm_compat.close_upstream(flow.client_conn, (upstream.host, upstream.port),
                               state.connection)


def _peer(client: connection.Client) -> str:
    host, port, *_ = client.peername or ("?", 0)
    return f"{host}:{port}"
