"""Every use of a mitmproxy internal for correctness lives here, each in one function.

Speed tweaks are not here: they belong to the embedded master only (``speedups.py``).

``tests/test_mitm_compat.py`` checks that these internals still exist with the expected
shape, so a mitmproxy upgrade that changes them fails loudly instead of silently. Every private
mitmproxy name used here is listed in ``sidecar/proxy/mitm_private.py`` (what breaks without
it, the releases it was checked on); ``tests/test_mitm_fence.py`` fails on one it does not list,
and on one used outside this module and ``speedups.py``.

The range ``pyproject.toml`` allows is tested at both ends: CI's Python 3.12 run installs the
oldest mitmproxy exactly (``.ci/oldest-deps.txt``), the 3.13 run requirements.lock's, and each
prints the version it used (docs/testing.md#ci-time). Each function here works on both; one
that needs a newer release raises the floor in ``pyproject.toml``, with the reason.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import struct
import sys
import time
import weakref
from collections.abc import Callable, Generator
from typing import Any, Protocol

import h11
from mitmproxy import connection, ctx, http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tls as tls_layers
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpEvent,
    ResponseHeaders,
    ResponseProtocolError,
    _http1,
)
from OpenSSL import SSL

from sidecar.proxy import failures

ErrorPage = Callable[[int, str], http.Response]
_fallback: ErrorPage | None = None
# The answer that replaces mitmproxy's page for a failed flow, until its page is written.
_failed_flow_answers: weakref.WeakKeyDictionary[http.HTTPFlow, http.Response] = (
    weakref.WeakKeyDictionary())


class _AnsweredProtocolError(ResponseProtocolError):
    """A failure on its way to the app's connection, with the flow's own answer attached."""

    def __init__(self, failure: ResponseProtocolError, answer: http.Response):
        super().__init__(failure.stream_id, failure.message, failure.code)
        self.answer = answer


def install_error_pages(fallback: ErrorPage) -> None:
    """Answer with ``fallback(status, message)`` wherever mitmproxy would write an HTML page.

    mitmproxy answers some requests by itself with ``text/html`` pages
    (``_http1.make_error_response``): a malformed request line or header (400, before any
    addon sees a flow), a request that fails its own header validation, an upstream that
    cannot be reached (502). An addon cannot set a response for these, so the page renderer is
    replaced; ``answer_failed_flow`` gives one flow its own, more specific answer, which
    travels with the failure event from the flow's stream to the app's connection.
    """
    global _fallback
    first = _fallback is None
    _fallback = fallback
    if not first:
        return

    @functools.wraps(_http1.make_error_response)
    def make_error_response(status_code: int, message: str = "") -> bytes:
        assert _fallback is not None
        return bytes(assemble_response(_fallback(status_code, message)))

    _http1.make_error_response = make_error_response
    original_send = _http1.Http1Server.send

    @functools.wraps(original_send)
    def send(self: _http1.Http1Server, event: HttpEvent
             ) -> Generator[commands.Command, Any, None]:
        if isinstance(event, ResponseProtocolError) and _interim(self.response):
            # A "100 Continue" is no answer: mitmproxy would write nothing after it and close,
            # leaving an app that sent its body with no final status at all.
            self.response = None
        if isinstance(event, _AnsweredProtocolError):
            # mitmproxy's own handling of this event, with the flow's answer as the page.
            if not self.conn.state & connection.ConnectionState.CAN_WRITE:
                return
            if not self.response and event.code.http_status_code() is not None:
                yield commands.SendData(self.conn, bytes(assemble_response(event.answer)))
            yield commands.CloseConnection(self.conn)
            return
        yield from original_send(self, event)

    _http1.Http1Server.send = send  # type: ignore[method-assign]
    original_stream_event = http_layers.HttpStream.handle_event

    @functools.wraps(original_stream_event)
    def handle_event(self: http_layers.HttpStream, event: events.Event
                     ) -> Generator[commands.Command, Any, None]:
        for command in original_stream_event(self, event):
            client = self.context.client
            if (isinstance(command, http_layers.SendHttp)
                    and type(command.event) is ResponseProtocolError
                    and command.connection is client):
                failure: ResponseProtocolError = command.event
                answer = _failed_flow_answers.pop(self.flow, None)
                if client in _malformed_bodies:
                    # The broken body arrived while a hook ran: mitmproxy counts the flow
                    # as killed by the app and would answer nothing.
                    _malformed_bodies.discard(client)
                    command = _malformed_body_answer(self, answer)
                elif answer is not None:
                    command = http_layers.SendHttp(_AnsweredProtocolError(failure, answer), client)
            elif isinstance(command, http_layers.DropStream) and client in _malformed_bodies:
                # The app's request body could not be framed (answer_malformed_request_bodies):
                # mitmproxy sends nothing to the app for a request-side error; the flow's
                # answer goes out now, then the connection closes.
                _malformed_bodies.discard(client)
                yield _malformed_body_answer(self, _failed_flow_answers.pop(self.flow, None))
            yield command

    http_layers.HttpStream.handle_event = handle_event  # type: ignore[method-assign,assignment]


def answer_failed_flow(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer the flow's client with ``response`` where mitmproxy would write its own page.

    For failures mitmproxy reports through the ``error`` hook: it renders their page after
    the hook, ignoring any response an addon sets there. Needs ``install_error_pages``.
    """
    _failed_flow_answers[flow] = response


def failed_flow_answer(flow: http.HTTPFlow) -> http.Response | None:
    """The answer ``answer_failed_flow`` set for the flow, until it is written."""
    return _failed_flow_answers.get(flow)


def _interim(response: http.Response | None) -> bool:
    return response is not None and response.status_code < 200


# -- a request body whose framing is broken -----------------------------------------------------

# App connections whose request body could not be framed, until the flow's answer is written.
_malformed_bodies: weakref.WeakSet[connection.Client] = weakref.WeakSet()
_malformed_bodies_answered = False


def answer_malformed_request_bodies() -> None:
    """Answer a request whose chunked body cannot be framed (an invalid chunk size, a chunk
    without its CRLF) instead of closing the connection without a word.

    mitmproxy's HTTP/1 server (``Http1Connection.read_body``) closes the app's connection at
    once when h11 refuses the body, then reports a request protocol error to the flow, for
    which it never writes an answer. Here the close is held back: the flow's ``error`` hook
    runs as usual (``request_body_malformed`` tells it why) and may set an answer with
    ``answer_failed_flow``; ``install_error_pages``' stream wrapper then writes that answer
    and closes the connection. Bytes the app sends after the broken chunk are discarded.
    Needs ``install_error_pages``.
    """
    global _malformed_bodies_answered
    if _malformed_bodies_answered:
        return
    _malformed_bodies_answered = True
    original = _http1.Http1Connection.read_body

    @functools.wraps(original)
    def read_body(self: _http1.Http1Server, event: events.Event
                  ) -> Generator[commands.Command, Any, None]:
        if not isinstance(event, events.DataReceived):
            yield from original(self, event)
            return
        for command in original(self, event):
            # Inside read_body, the app's connection is closed only for a refused body (a
            # close after a complete exchange comes with a final response in place).
            if (isinstance(command, commands.CloseConnection) and command.connection is self.conn
                    and (self.response is None or _interim(self.response))):
                _malformed_bodies.add(self.context.client)
                _discard_rest(self)
                continue
            yield command

    _http1.Http1Server.read_body = read_body  # type: ignore[method-assign,assignment]


def request_body_malformed(flow: http.HTTPFlow) -> bool:
    """Whether the flow failed because its app's request body could not be framed."""
    return flow.client_conn in _malformed_bodies


def _malformed_body_answer(stream: http_layers.HttpStream, answer: http.Response | None
                           ) -> commands.Command:
    client = stream.context.client
    if answer is None:
        return commands.CloseConnection(client)
    failure = ResponseProtocolError(stream.stream_id, "malformed request body",
                                    ErrorCode.GENERIC_CLIENT_ERROR)
    return http_layers.SendHttp(_AnsweredProtocolError(failure, answer), client)


# -- Expect: 100-continue ----------------------------------------------------------------------

_continuing: Callable[[http.HTTPFlow], None] | None = None


def continue_only_when_connected(continuing: Callable[[http.HTTPFlow], None]) -> None:
    """Send ``100 Continue`` only once the upstream connection is open, and never for a
    request that already has its answer.

    mitmproxy (``HttpStream.state_wait_for_request_headers``) answers ``Expect:
    100-continue`` right after the ``requestheaders`` hooks, before it knows whether the
    request can go anywhere. When connecting, TLS or the token then failed, the app had sent
    its body and got no final status at all. RFC 9110 §10.1.1 asks a proxy either to answer
    with the final status at once or to forward the request first. So, where mitmproxy
    would send the ``100``:

    - a request the sidecar has answered already (refused, no route, no token) gets that
      answer now, marked ``Connection: close``; its body is not waited for;
    - a request with no body gets no ``100`` (there is nothing to continue);
    - otherwise the upstream connection is opened first (TCP, egress tunnel, TLS), through
      mitmproxy's own ``make_server_connection``; when that fails, the flow's error hook
      answers with the final status, and no ``100`` is ever sent. When it succeeds,
      ``continuing(flow)`` is called, the ``100`` goes out, and the request later reuses
      that connection.
    """
    global _continuing
    first = _continuing is None
    _continuing = continuing
    if not first:
        return
    original = http_layers.HttpStream.state_wait_for_request_headers

    @functools.wraps(original)
    def state_wait_for_request_headers(self: http_layers.HttpStream, event: HttpEvent
                                       ) -> Generator[commands.Command, Any, None]:
        inner = original(self, event)
        reply: Any = None
        while True:
            try:
                command = inner.send(reply)
            except StopIteration:
                return
            if _is_continue(self, command):
                if getattr(event, "end_stream", False):
                    reply = None
                    continue
                if self.flow.response is not None:
                    inner.close()
                    yield from _answer_before_body(self)
                    return
                connected = yield from self.make_server_connection()
                if not connected:
                    inner.close()
                    self.client_state = self.state_errored
                    return
                if _continuing is not None:
                    _continuing(self.flow)
            reply = yield command

    http_layers.HttpStream.state_wait_for_request_headers = (  # type: ignore[method-assign]
        state_wait_for_request_headers)


def _is_continue(stream: http_layers.HttpStream, command: commands.Command) -> bool:
    return (isinstance(command, http_layers.SendHttp)
            and command.connection is stream.context.client
            and isinstance(command.event, ResponseHeaders)
            and command.event.response.status_code == 100)


def _answer_before_body(stream: http_layers.HttpStream
                        ) -> Generator[commands.Command, Any, None]:
    """What mitmproxy does for a response an addon set, without waiting for the body first;
    then the connection is half-closed: the body the app may still send is read and
    dropped, never parsed as a request."""
    response = stream.flow.response
    assert response is not None
    stream.flow.request.headers.pop("expect", None)
    response.headers["Connection"] = "close"
    response.timestamp_start = time.time()
    stream.client_state = stream.state_done
    yield http_layers.HttpResponseHeadersHook(stream.flow)
    yield from stream.send_response()
    yield commands.CloseTcpConnection(stream.context.client, half_close=True)


# -- what mitmproxy reports only in words ------------------------------------------------------

def connect_exception() -> OSError | None:
    """The ``OSError`` that stopped mitmproxy opening a server connection.

    Only inside a ``server_connect_error`` hook: mitmproxy keeps just the error's text
    (``server.error``), but runs that hook within the ``except`` clause that caught the error
    (``ConnectionHandler.open_connection``), so it is still the exception being handled.
    """
    exc = sys.exception()
    return exc if isinstance(exc, OSError) else None


# mitmproxy's words (``_upstream_proxy.HttpUpstreamProxy.receive_handshake_data``) when an
# egress proxy answers a CONNECT with anything but 2xx.
_TUNNEL_REFUSED = re.compile(r"refused HTTP CONNECT request: (?P<status_line>.*)$")
# Its words when the upstream, or the tunnel to it, closes before a response arrives
# (``_http1.Http1Client``, ``tunnel.TunnelLayer``, ``tls``, ``_http2``).
_CLOSED_WITHOUT_ANSWER = frozenset({"server closed connection", "connection closed",
                                    "connection closed early", "peer closed connection"})


def read_flow_failure(message: str) -> failures.FlowFailure:
    """What mitmproxy's ``flow.error.msg`` for a failed upstream request says happened."""
    refused = _TUNNEL_REFUSED.search(message)
    if refused is not None:
        return failures.TunnelRefused(refused.group("status_line"))
    if message in _CLOSED_WITHOUT_ANSWER:
        return failures.ClosedWithoutAnswer()
    return failures.OtherFailure(message)


# What mitmproxy's messages for the requests it refuses by itself mean, by a word each
# contains (``http1.read_request_head``, ``http1.expected_http_body_size``,
# ``validate_request_form``, ``body_size_limit``).
_REQUEST_FAULT_WORDS = (
    ("request line", failures.RequestFault.REQUEST_LINE),
    ("header line", failures.RequestFault.HEADER_LINE),
    ("invalid headers", failures.RequestFault.HEADER_LINE),
    ("header name", failures.RequestFault.HEADER_NAME),
    ("transfer-encoding", failures.RequestFault.TRANSFER_ENCODING),
    ("content-length", failures.RequestFault.CONTENT_LENGTH),
    ("host header", failures.RequestFault.NO_HOST),
    ("body_size_limit", failures.RequestFault.BODY_TOO_LARGE),
    ("scheme", failures.RequestFault.SCHEME),
)


def read_request_fault(message: str) -> failures.RequestFault:
    """What is wrong with a request, from the message mitmproxy renders its error page with."""
    lowered = message.lower()
    return next((fault for word, fault in _REQUEST_FAULT_WORDS if word in lowered),
                failures.RequestFault.OTHER)


def close_upstream(client: connection.Client, address: tuple[str, int], owner: object) -> bool:
    """Close (or abort connecting) the client's server connections to ``address`` that
    ``owner`` opened (see :func:`bind_upstream_connections`).

    mitmproxy has no per-request upstream timeout; closing the server connection makes the
    pending request fail through the normal error path. Returns whether one was found.
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(client.id) if proxyserver else None
    if handler is None:
        return False
    found = False
    for conn in list(handler.transports):
        if (isinstance(conn, connection.Server) and conn.address == address
                and _opened_by.get(conn) is owner):
            handler.close_connection(conn)
            found = True
    return found


# Who each upstream (server) connection was opened for; see bind_upstream_connections.
_opened_by: weakref.WeakKeyDictionary[connection.Server, object] = weakref.WeakKeyDictionary()
_owner_of: Callable[[http.HTTPFlow], object | None] | None = None


def bind_upstream_connections(owner_of: Callable[[http.HTTPFlow], object | None]) -> None:
    """Reuse an upstream connection only for requests of the owner it was opened for.

    Within one client connection mitmproxy reuses any open server connection to the same
    address (``HttpLayer.get_connection`` → ``GetHttpConnection.connection_spec_matches``),
    whatever the TLS it was opened with and whoever's credentials it carried. Here each new
    server connection is tagged with ``owner_of(flow)`` of the request that opened it, and a
    request reuses a connection only when its own owner is the same object (``is``). A
    request whose owner is ``None`` never reuses one. :func:`opened_for` reads the tag.
    """
    global _owner_of
    _owner_of = owner_of
    if getattr(http_layers.HttpLayer.get_connection, "_sidecar_bound", False):
        return
    original = http_layers.HttpLayer.get_connection

    def get_connection(self: http_layers.HttpLayer, event: http_layers.GetHttpConnection, *,
                       reuse: bool = True) -> Generator[commands.Command, object, None]:
        stream = self.command_sources.get(event)
        flow_ = getattr(stream, "flow", None)
        owner = _owner_of(flow_) if _owner_of is not None and flow_ is not None else None
        spec_matches = event.connection_spec_matches

        def owned_and_matching(conn: connection.Connection) -> bool:
            return (owner is not None and isinstance(conn, connection.Server)
                    and _opened_by.get(conn) is owner and spec_matches(conn))

        # An instance attribute shadows the method for this one command: both the reuse scan
        # and the check of the layer's initial server connection go through it.
        event.connection_spec_matches = owned_and_matching  # type: ignore[method-assign,assignment]
        before = set(self.connections)
        yield from original(self, event, reuse=reuse)
        # mitmproxy opens the new connection in a task, so the tag is in place before its
        # TLS hook (tls_start_server) can run; an untagged connection gets no TLS policy.
        for conn in self.connections.keys() - before:
            if isinstance(conn, connection.Server):
                _opened_by[conn] = owner

    get_connection._sidecar_bound = True  # type: ignore[attr-defined]
    get_connection.__wrapped__ = original  # type: ignore[attr-defined]
    http_layers.HttpLayer.get_connection = get_connection  # type: ignore[method-assign]


def opened_for(server: connection.Server) -> object | None:
    """The owner the upstream connection ``server`` was opened for, if any."""
    return _opened_by.get(server)


def app_connections() -> list[connection.Client]:
    """Every app (client) connection the proxy holds open now."""
    proxyserver = ctx.master.addons.get("proxyserver")
    if proxyserver is None:
        return []
    return [handler.client for handler in list(proxyserver.connections.values())]


def close_upstreams_of(client: connection.Client,
                       retired: Callable[[object | None], bool]) -> int:
    """Close the app connection's upstream connections whose owner ``retired(owner)`` says
    is retired; returns how many were closed.

    Why this matters: mitmproxy lets one app connection hold at most five server connections
    to one address (``ConnectionHandler.max_conns``, a semaphore held for a connection's whole
    life). An upstream connection kept open after a reload retired its owner is never reused
    (``bind_upstream_connections``), so after five reloads a keep-alive app connection would
    wait for ever to open a sixth. Only call this for an app connection with no request in
    flight: its upstream connections are then idle.
    """
    handler = _connection_handler(client)
    if handler is None:
        return 0
    closed = 0
    for conn in list(handler.transports):
        # Half-closed ones too: mitmproxy keeps a connection the upstream closed its side of
        # (its slot included) until our side is closed.
        if isinstance(conn, connection.Server) and retired(_opened_by.get(conn)):
            handler.close_connection(conn)
            closed += 1
    return closed


_tls_close_fixed = False


def install_tls_close_fix() -> None:
    """Turn a fatal TLS alert from an upstream into a closed connection the HTTP layer sees.

    A TLS 1.3 server that rejects the client certificate does so with an alert *after* the
    client considers the handshake done. mitmproxy only logs that alert; its TLS session is
    then marked "shutdown received", so the close that follows is assumed to have been passed
    on already and is dropped, and the request waits forever. mitmproxy itself passes a close
    on after clearing the connection's CAN_READ state; an alert leaves CAN_READ set, which is
    how the wrapper below recognises it and passes the close on at once.
    """
    global _tls_close_fixed
    if _tls_close_fixed:
        return
    _tls_close_fixed = True
    original = tls_layers.ServerTLSLayer.receive_data

    def receive_data(self: tls_layers.ServerTLSLayer,
                     data: bytes) -> Generator[commands.Command, Any, None]:
        yield from original(self, data)
        alerted = (self.tls is not None and self.tls.get_shutdown() & SSL.RECEIVED_SHUTDOWN
                   and self.conn.state & connection.ConnectionState.CAN_READ)
        if alerted:
            self.conn.state &= ~connection.ConnectionState.CAN_READ
            yield from self.event_to_child(events.ConnectionClosed(self.conn))

    tls_layers.ServerTLSLayer.receive_data = receive_data  # type: ignore[method-assign,assignment]


# -- the request form the app used ---------------------------------------------------------------

# Requests that arrived in origin-form (``GET /path``), before mitmproxy rewrote them.
_origin_form: weakref.WeakSet[http.Request] = weakref.WeakSet()


def track_request_forms() -> None:
    """Remember which requests arrived in origin-form, for :func:`arrived_in_origin_form`.

    On the forward proxy, mitmproxy takes an origin-form request's destination from its
    ``Host`` header, and turns every HTTP/1 request into origin-form before any addon runs
    (``HttpStream.state_wait_for_request_headers``), so by then an absolute-form request
    (``GET http://host/path``) looks the same. The Host rule applies to the first kind only
    (docs/callers.md), so the form is read as the request arrives.
    """
    original = http_layers.HttpStream.state_wait_for_request_headers
    if getattr(original, "_sidecar_forms", False):
        return

    @functools.wraps(original)
    def state_wait_for_request_headers(self: http_layers.HttpStream, event: events.Event
                                       ) -> Generator[commands.Command, Any, None]:
        if (isinstance(event, http_layers.RequestHeaders)
                and event.request.first_line_format == "relative"):
            _origin_form.add(event.request)
        return (yield from original(self, event))

    state_wait_for_request_headers._sidecar_forms = True  # type: ignore[attr-defined]
    http_layers.HttpStream.state_wait_for_request_headers = (  # type: ignore[method-assign]
        state_wait_for_request_headers)


def arrived_in_origin_form(request: http.Request) -> bool:
    """Whether the app sent ``request`` in origin-form; needs :func:`track_request_forms`."""
    return request in _origin_form


# -- limits on app connections -----------------------------------------------------------------

# How h11 (and so mitmproxy) recognises the blank line that ends a message head.
_HEAD_END = re.compile(rb"\n\r?\n")


class RequestHeadGuard(Protocol):
    """What :func:`guard_request_heads` asks while a request head is arriving."""

    def max_head_bytes(self) -> int: ...

    def head_bytes_arrived(self, client: connection.Client) -> None: ...

    def head_too_large(self, client: connection.Client, limit: int) -> bytes: ...


_head_guard: RequestHeadGuard | None = None


def guard_request_heads(guard: RequestHeadGuard) -> None:
    """Bound the request head mitmproxy buffers, and report when bytes of one arrive.

    mitmproxy's HTTP/1 server (``_http1.Http1Server.read_headers``) buffers a request head
    until its blank line with no size limit, and no addon hook runs before the head is
    complete. The wrapper below runs on every read while a head is awaited: it reports the
    arrival (so a header deadline can start), and a head larger than the limit, terminated or
    not, is answered with ``guard.head_too_large(...)`` (a complete response), never parsed
    and never forwarded. The buffer is dropped and later bytes are discarded, so memory stays
    bounded while the write side is half-closed to let the client read the answer.
    """
    global _head_guard
    first = _head_guard is None
    _head_guard = guard
    if not first:
        return
    original = _http1.Http1Server.read_headers

    @functools.wraps(original)
    def read_headers(self: _http1.Http1Server, event: events.ConnectionEvent
                     ) -> Generator[commands.Command, Any, None]:
        current = _head_guard
        if current is not None and isinstance(event, events.DataReceived) and self.buf:
            current.head_bytes_arrived(self.context.client)
            limit = current.max_head_bytes()
            if len(self.buf) > limit and _HEAD_END.search(bytes(self.buf), 0, limit) is None:
                answer = current.head_too_large(self.context.client, limit)
                yield from _refuse_head(self, answer)
                return
        yield from original(self, event)

    _http1.Http1Server.read_headers = read_headers  # type: ignore[method-assign]


def _refuse_head(server: _http1.Http1Server, answer: bytes
                 ) -> Generator[commands.Command, Any, None]:
    _discard_rest(server)
    yield commands.SendData(server.conn, answer)
    yield commands.CloseTcpConnection(server.conn, half_close=True)


def _discard_rest(server: _http1.Http1Server) -> None:
    """From now on the app's bytes are dropped unread; its close closes the connection."""
    server.buf = type(server.buf)()

    def discard(event: events.Event) -> Generator[commands.Command, Any, None]:
        server.buf = type(server.buf)()
        if isinstance(event, events.ConnectionClosed):
            yield commands.CloseConnection(server.conn)

    server.state = discard


def _connection_handler(client: connection.Client) -> Any:
    proxyserver = ctx.master.addons.get("proxyserver")
    return proxyserver.connections.get(client.id) if proxyserver else None


def close_client(client: connection.Client, *, reset: bool = False) -> bool:
    """Close an app's connection; ``reset`` aborts it (TCP RST), dropping unsent bytes.

    An app must not mistake a response cut short for a complete one: a response framed by
    the end of the connection would look complete after an orderly close, a reset never does.
    Returns whether the connection was still open.
    """
    handler = _connection_handler(client)
    io = handler.transports.get(client) if handler is not None else None
    if io is None:
        return False
    if reset and isinstance(io.writer, asyncio.StreamWriter):
        sock = io.writer.get_extra_info("socket")
        if sock is not None:  # closing with a zero linger time sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        io.writer.transport.abort()
    else:
        handler.close_connection(client)
    return True


def last_activity(client: connection.Client) -> float | None:
    """When (``time.time()``) anything last happened on the app's connection or its upstreams.

    mitmproxy's inactivity watchdog records every read, from the app or from an upstream, and
    the end of every hook; while a response body is being received, that is the upstream's
    last sign of life. None when the connection is gone.
    """
    handler = _connection_handler(client)
    if handler is None:
        return None
    return float(handler.timeout_watchdog.last_activity)


class _WithoutTrailers:
    """An h11 body reader whose end of message never carries trailer fields."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, buf: Any) -> Any:
        event = self._inner(buf)
        if isinstance(event, h11.EndOfMessage) and event.headers:
            return h11.EndOfMessage()
        return event

    def read_eof(self) -> Any:
        return self._inner.read_eof()


_trailers_dropped = False


def drop_http1_trailers() -> None:
    """Drop the trailer fields of chunked HTTP/1 messages instead of crashing on them.

    mitmproxy's HTTP/1 layer raises ``NotImplementedError`` when a chunked body ends with
    trailers, which leaves the connection hanging without an answer. Its body readers come
    from ``_http1.make_body_reader``; wrapped, the message ends as if it had no trailers, and
    it is forwarded (with a plain chunked ending) like any other.
    """
    global _trailers_dropped
    if _trailers_dropped:
        return
    _trailers_dropped = True
    original = _http1.make_body_reader

    @functools.wraps(original)
    def make_body_reader(expected_size: int | None) -> Any:
        return _WithoutTrailers(original(expected_size))

    _http1.make_body_reader = make_body_reader
