"""Fails loudly when a mitmproxy internal we rely on changes (see sidecar/proxy/mitm_compat.py;
the OpenSSL bindings of sidecar/tls/openssl_bindings.py are covered by tests/test_tls_policy.py)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.server import ConnectionHandler
from mitmproxy.test import tflow

from sidecar.proxy import mitm_compat

if TYPE_CHECKING:
    from mitmproxy.connection import Client
    from mitmproxy.proxy.commands import Command


def test_mitmproxy_error_page_renderer_shape() -> None:
    # (``inspect.unwrap``: the originals, should install_error_pages have run already.)
    params = list(inspect.signature(inspect.unwrap(_http1.make_error_response)).parameters)
    assert params[:2] == ["status_code", "message"]
    # install_error_pages repeats what Http1Server.send does with a ResponseProtocolError.
    source = inspect.getsource(inspect.unwrap(_http1.Http1Server.send))
    for expected in ("isinstance(event, ResponseProtocolError)", "ConnectionState.CAN_WRITE",
                     "event.code.http_status_code()", "if not self.response and status",
                     "make_error_response(status, event.message)",
                     "commands.CloseConnection(self.conn)"):
        assert expected in source, expected
    read_headers = inspect.getsource(_http1.Http1Server.read_headers)
    assert "make_error_response(400, str(e))" in read_headers


def _server_layer() -> tuple[_http1.Http1Server, http.HTTPFlow]:
    from mitmproxy import options
    from mitmproxy.proxy.context import Context
    from mitmproxy.test import tflow

    flow = tflow.tflow()
    layer = _http1.Http1Server(Context(flow.client_conn, options.Options()))
    layer.request = flow.request
    return layer, flow


def _page(layer: _http1.Http1Server, message: str) -> bytes:
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http import ErrorCode, ResponseProtocolError

    sent = [c for c in layer.send(ResponseProtocolError(1, message, ErrorCode.CONNECT_FAILED))
            if isinstance(c, commands.SendData)]
    assert len(sent) == 1
    return sent[0].data


def _fallback(status: int, message: str) -> http.Response:
    return http.Response.make(status, b"{}", {"X-Sidecar-Error": "fallback"})


def test_every_mitmproxy_error_page_is_replaced() -> None:
    mitm_compat.install_error_pages(_fallback)
    page = _http1.make_error_response(400, "Bad HTTP request line: b'x'")
    assert page.startswith(b"HTTP/1.1 400 ") and b"X-Sidecar-Error: fallback" in page
    assert b"html" not in page.lower()
    layer, _ = _server_layer()
    assert b"X-Sidecar-Error: fallback" in _page(layer, "Connect call failed")


def _failed_stream(answer: http.Response | None) -> list[object]:
    """Fail a real HttpStream's upstream, let its error hook answer, and return what the
    stream sends on; ``answer_failed_flow`` runs where an addon's ``error`` hook would."""
    from mitmproxy import options
    from mitmproxy.proxy import events
    from mitmproxy.proxy.context import Context
    from mitmproxy.proxy.layers import http as http_layers
    from mitmproxy.proxy.layers.http import ErrorCode, ResponseProtocolError

    flow = tflow.tflow()
    flow.response = None
    stream = http_layers.HttpStream(Context(flow.client_conn, options.Options()), 1)
    stream.flow = flow
    list(stream.handle_event(events.Start()))
    stream.client_state = stream.state_done
    stream.server_state = stream.state_wait_for_response_headers
    failure = ResponseProtocolError(1, "Connect call failed", ErrorCode.CONNECT_FAILED)
    paused = list(stream.handle_event(failure))
    assert [type(c).__name__ for c in paused] == ["HttpErrorHook"]
    assert flow.error is not None and flow.error.msg == "Connect call failed"
    if answer is not None:
        mitm_compat.answer_failed_flow(flow, answer)
        assert mitm_compat.failed_flow_answer(flow) is answer
    return list(stream.handle_event(events.HookCompleted(paused[0], None)))  # type: ignore[arg-type]


def test_a_failed_flows_own_answer_replaces_the_page_for_that_request_only() -> None:
    from mitmproxy.proxy.layers.http import SendHttp

    mitm_compat.install_error_pages(_fallback)
    response = http.Response.make(502, b"{}", {"X-Sidecar-Error": "upstream-unreachable"})
    sent = [c for c in _failed_stream(response) if isinstance(c, SendHttp)]
    assert len(sent) == 1
    layer, _ = _server_layer()
    page = _page_for(layer, sent[0].event)
    assert b"X-Sidecar-Error: upstream-unreachable" in page and b"html" not in page.lower()
    # A flow without an answer of its own gets the fallback page.
    sent = [c for c in _failed_stream(None) if isinstance(c, SendHttp)]
    assert b"X-Sidecar-Error: fallback" in _page_for(_server_layer()[0], sent[0].event)


def _page_for(layer: _http1.Http1Server, event: object) -> bytes:
    from mitmproxy.proxy import commands

    sent = [c for c in layer.send(event) if isinstance(c, commands.SendData)]  # type: ignore[arg-type]
    assert len(sent) == 1
    return sent[0].data


def test_http_stream_error_path_shape() -> None:
    from mitmproxy.proxy.layers import http as http_layers

    # answer_failed_flow's answer rides the ResponseProtocolError the stream sends to the
    # client after its error hook.
    source = inspect.getsource(http_layers.HttpStream.handle_protocol_error)
    assert source.index("yield HttpErrorHook(self.flow)") < source.index(
        "yield SendHttp(event, self.context.client)")
    assert inspect.isgeneratorfunction(inspect.unwrap(http_layers.HttpStream.handle_event))


def test_proxyserver_connection_registry_shape() -> None:
    assert isinstance(Proxyserver().connections, dict)
    assert callable(ConnectionHandler.close_connection)
    assert "transports" in inspect.getsource(ConnectionHandler.__init__)


def test_tls_layer_close_handling_shape() -> None:
    from mitmproxy.proxy.layers import tls as tls_layers

    # install_tls_close_fix wraps receive_data and relies on receive_close's assumption.
    assert "RECEIVED_SHUTDOWN" in inspect.getsource(tls_layers.TLSLayer.receive_close)
    mitm_compat.install_tls_close_fix()
    assert inspect.isgeneratorfunction(tls_layers.ServerTLSLayer.receive_data)


# -- limits (guard_request_heads, drop_http1_trailers, close_client, last_activity) -------------

def _http1_server() -> tuple[_http1.Http1Server, Client]:
    from mitmproxy import connection, options
    from mitmproxy.proxy import context, events

    client = connection.Client(peername=("127.0.0.1", 40000), sockname=("127.0.0.1", 8080),
                               timestamp_start=0.0)
    server = _http1.Http1Server(context.Context(client, options.Options()))
    list(server.handle_event(events.Start()))
    return server, client


class _Guard:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.arrivals = 0

    def max_head_bytes(self) -> int:
        return self.limit

    def head_bytes_arrived(self, client: object) -> None:
        self.arrivals += 1

    def head_too_large(self, client: object, limit: int) -> bytes:
        return b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n"


def _feed(server: _http1.Http1Server, client: Client, data: bytes) -> list[Command]:
    from mitmproxy.proxy import events

    return list(server.handle_event(events.DataReceived(client, data)))


def test_request_head_guard_bounds_heads_and_reports_arrivals() -> None:
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http import ReceiveHttp, RequestHeaders

    guard = _Guard(limit=1024)
    mitm_compat.guard_request_heads(guard)
    server, client = _http1_server()
    produced = _feed(server, client, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert guard.arrivals == 1
    assert any(isinstance(c, ReceiveHttp) and isinstance(c.event, RequestHeaders)
               for c in produced), produced

    server, client = _http1_server()
    assert _feed(server, client, b"GET /a HTTP/1.1\r\nX: " + b"a" * 1000) == []
    refused = _feed(server, client, b"a" * 100)  # over the limit, still unterminated
    assert [type(c) for c in refused] == [commands.SendData, commands.CloseTcpConnection]
    assert refused[0].data.startswith(b"HTTP/1.1 431")  # type: ignore[attr-defined]
    assert _feed(server, client, b"a" * 100_000 + b"\r\n\r\n") == []  # discarded from now on
    assert len(server.buf) == 0


def test_chunked_trailers_are_dropped_instead_of_crashing() -> None:
    from mitmproxy.proxy.layers.http import ReceiveHttp, RequestData, RequestEndOfMessage

    mitm_compat.guard_request_heads(_Guard(limit=65536))
    mitm_compat.drop_http1_trailers()
    server, client = _http1_server()
    produced = _feed(server, client, b"POST /a HTTP/1.1\r\nHost: x\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n"
                                     b"2\r\nhi\r\n0\r\nX-Checksum: 1\r\n\r\n")
    events_ = [c.event for c in produced if isinstance(c, ReceiveHttp)]
    assert [bytes(e.data) for e in events_ if isinstance(e, RequestData)] == [b"hi"]
    assert isinstance(events_[-1], RequestEndOfMessage)


def test_retired_upstream_connections_must_be_closed_because_of_the_per_address_slots(
) -> None:
    """Why close_upstreams_of exists: mitmproxy gives each app connection five slots per
    upstream address, held for a server connection's whole life (docs/architecture.md,
    "Reloads and upstream connections"). If this changes, the retirement may still be right
    but the reason in the docs is not."""
    source = inspect.getsource(ConnectionHandler)
    assert "asyncio.Semaphore(5)" in source
    assert "async with self.max_conns[command.connection.address]" in source
    # What close_upstreams_of walks and calls: each handler knows its client, its transports
    # are keyed by connection, and a full close cancels the connection's task (its slot).
    assert "self.client = context.client" in inspect.getsource(ConnectionHandler.__init__)
    assert 'handler.cancel("closed by command")' in inspect.getsource(
        ConnectionHandler.close_connection)


def test_connection_handler_activity_and_transport_shape() -> None:
    from mitmproxy.proxy import server

    # last_activity reads the inactivity watchdog, which every event refreshes.
    assert "register_activity" in inspect.getsource(ConnectionHandler.server_event)
    assert "timeout_watchdog" in inspect.getsource(ConnectionHandler.__init__)
    watchdog = server.TimeoutWatchdog(10, lambda: None)  # type: ignore[arg-type,return-value]
    watchdog.register_activity()
    assert isinstance(watchdog.last_activity, float)
    # close_client aborts through the client's StreamWriter.
    assert {"handler", "reader", "writer"} <= set(server.ConnectionIO.__dataclass_fields__)


def test_upstream_connection_reuse_shape() -> None:
    from mitmproxy.proxy.layers import http as http_layers

    original = inspect.unwrap(http_layers.HttpLayer.get_connection)
    assert list(inspect.signature(original).parameters) == ["self", "event", "reuse"]
    source = inspect.getsource(original)
    # Both places that may hand out an existing connection ask the command whether it fits,
    # and a new connection is registered in ``self.connections``.
    assert "event.connection_spec_matches(connection)" in source
    assert "event.connection_spec_matches(self.context.server)" in source
    assert "self.connections[context.server]" in source
    assert "self.command_sources.pop(event)" in source
    assert "flow" in http_layers.HttpStream.__annotations__
    assert "connection_spec_matches" in vars(http_layers.GetHttpConnection)
    assert "__slots__" not in vars(http_layers.GetHttpConnection)


class _Stream:
    """Stands in for mitmproxy's HttpStream: the flow, and the replies it is given."""

    def __init__(self, flow: http.HTTPFlow) -> None:
        self.flow = flow
        self.replies: list[object] = []

    def handle_event(self, event: object) -> Iterator[object]:
        self.replies.append(event)
        return iter(())


def _ask_for_connection(layer: Any, owner: object) -> tuple[_Stream, Any]:
    from mitmproxy.proxy.layers import http as http_layers

    flow = tflow.tflow()
    flow.metadata["owner"] = owner
    stream = _Stream(flow)
    command = http_layers.GetHttpConnection(("upstream.example", 443), True, None)
    layer.command_sources[command] = stream
    list(layer.get_connection(command))
    return stream, command


def test_upstream_connections_are_reused_only_by_the_owner_that_opened_them() -> None:
    from mitmproxy import connection, options
    from mitmproxy.proxy.context import Context
    from mitmproxy.proxy.layers import http as http_layers

    mitm_compat.bind_upstream_connections(lambda flow: flow.metadata.get("owner"))
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2),
                               timestamp_start=0)
    layer = http_layers.HttpLayer(Context(client, options.Options()),
                                  http_layers.HTTPMode.regular)
    first, second = object(), object()

    _ask_for_connection(layer, first)
    opened = [c for c in layer.connections if isinstance(c, connection.Server)]
    assert len(opened) == 1 and mitm_compat.opened_for(opened[0]) is first
    server = opened[0]
    layer.waiting_for_establishment.pop(server)
    server.state = connection.ConnectionState.OPEN  # as if connected

    stream, _ = _ask_for_connection(layer, first)  # same owner: reused at once
    assert [type(r).__name__ for r in stream.replies] == ["GetHttpConnectionCompleted"]
    assert stream.replies[0].reply == (server, None)  # type: ignore[attr-defined]

    stream, _ = _ask_for_connection(layer, second)  # another owner: a connection of its own
    assert stream.replies == []
    servers = [c for c in layer.connections if isinstance(c, connection.Server)]
    assert len(servers) == 2 and mitm_compat.opened_for(servers[1]) is second

    stream, _ = _ask_for_connection(layer, None)  # no owner: never reuses
    assert stream.replies == []
    assert len([c for c in layer.connections if isinstance(c, connection.Server)]) == 3


# -- what mitmproxy reports only in words (connect_exception, read_flow_failure,
#    read_request_fault) ------------------------------------------------------------------------

def test_the_connect_error_is_still_the_handled_exception_in_the_server_connect_error_hook(
) -> None:
    import asyncio
    import socket

    from mitmproxy import connection, options
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.context import Context

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    seen: list[object] = []

    class Handler(ConnectionHandler):
        async def handle_hook(self, hook: object) -> None:
            if getattr(hook, "name", None) == "server_connect_error":
                seen.append(mitm_compat.connect_exception())

        async def server_event(self, event: object) -> None:
            return None

        def log(self, *args: object, **kwargs: object) -> None:
            return None

    async def scenario() -> None:
        client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2),
                                   timestamp_start=0)
        handler = Handler(Context(client, options.Options()))
        server = connection.Server(address=("127.0.0.1", closed_port))
        await handler.open_connection(commands.OpenConnection(server))
        assert server.error  # mitmproxy itself keeps only the text

    asyncio.run(scenario())
    assert len(seen) == 1 and isinstance(seen[0], ConnectionRefusedError), seen
    assert mitm_compat.connect_exception() is None  # outside the hook: nothing


def test_mitmproxy_still_uses_the_words_read_flow_failure_knows() -> None:
    from mitmproxy.proxy import tunnel
    from mitmproxy.proxy.layers import tls as tls_layers
    from mitmproxy.proxy.layers.http import _upstream_proxy

    assert ('refused HTTP CONNECT request: {response.status_code} {response.reason}'
            in inspect.getsource(_upstream_proxy))
    assert '"server closed connection"' in inspect.getsource(_http1.Http1Client)
    assert 'err = "connection closed"' in inspect.getsource(tunnel.TunnelLayer)
    assert '"connection closed early"' in inspect.getsource(tls_layers.ClientTLSLayer)


def test_read_flow_failure_turns_mitmproxys_words_into_values() -> None:
    from sidecar.proxy import failures

    refused = mitm_compat.read_flow_failure(
        "Upstream proxy 127.0.0.1:3128 refused HTTP CONNECT request: 403 Forbidden")
    assert refused == failures.TunnelRefused("403 Forbidden")
    assert mitm_compat.read_flow_failure("server closed connection") == (
        failures.ClosedWithoutAnswer())
    assert mitm_compat.read_flow_failure("something new") == failures.OtherFailure(
        "something new")


def test_read_request_fault_recognises_mitmproxys_own_refusals() -> None:
    from mitmproxy.net.http.validate import validate_headers

    from sidecar.proxy.failures import RequestFault

    messages: list[str] = []

    def recording(status: int, message: str) -> http.Response:
        messages.append(message)
        return _fallback(status, message)

    mitm_compat.install_error_pages(recording)
    try:
        for head in (b"GET /\r\n\r\n", b"GET / HTTP/1.1\r\nno colon\r\n\r\n"):
            server, client = _http1_server()
            _feed(server, client, head)
    finally:
        mitm_compat.install_error_pages(_fallback)
    assert [mitm_compat.read_request_fault(m) for m in messages] == [
        RequestFault.REQUEST_LINE, RequestFault.HEADER_LINE], messages

    def validation_message(headers: dict[str, str]) -> str:
        request = tflow.treq()
        request.headers.clear()
        request.headers.update(headers)
        try:
            validate_headers(request)
        except ValueError as exc:
            return str(exc)
        raise AssertionError(f"mitmproxy accepted {headers}")

    assert mitm_compat.read_request_fault(validation_message(
        {"Content-Length": "1", "Transfer-Encoding": "chunked"})) in (
        RequestFault.TRANSFER_ENCODING, RequestFault.CONTENT_LENGTH)
    assert mitm_compat.read_request_fault(validation_message(
        {"Content-Length": "x"})) is RequestFault.CONTENT_LENGTH


def test_a_malformed_chunked_body_is_held_open_for_the_flows_answer() -> None:
    from mitmproxy.proxy import commands
    from mitmproxy.proxy.layers.http import ReceiveHttp, RequestProtocolError

    # read_body closes the app's connection itself when h11 refuses the body, and only then
    # tells the stream: that close is what answer_malformed_request_bodies holds back.
    source = inspect.getsource(_http1.Http1Connection.read_body)
    assert source.index("except h11.ProtocolError") < source.index(
        "yield commands.CloseConnection(self.conn)") < source.index("self.ReceiveProtocolError(")
    mitm_compat.answer_malformed_request_bodies()
    server, client = _http1_server()
    produced = _feed(server, client, b"POST /a HTTP/1.1\r\nHost: x\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n")
    assert not any(isinstance(c, commands.CloseConnection) for c in produced), produced
    errors = [c.event for c in produced
              if isinstance(c, ReceiveHttp) and isinstance(c.event, RequestProtocolError)]
    assert len(errors) == 1
    flow = tflow.tflow()
    flow.client_conn = client
    assert mitm_compat.request_body_malformed(flow)
    assert _feed(server, client, b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n") == []  # dropped


def test_http_stream_request_error_and_kill_paths_shape() -> None:
    from mitmproxy.proxy.layers import http as http_layers

    # A request-side error ends in DropStream with nothing sent to the app; a broken body
    # that arrives while a hook runs makes the flow "killed by remote", answered with KILL.
    source = inspect.getsource(http_layers.HttpStream.handle_protocol_error)
    assert source.rstrip().endswith("yield DropStream(self.stream_id)")
    killed = inspect.getsource(http_layers.HttpStream.check_killed)
    for expected in ("self._paused_event_queue", "isinstance(evt, RequestProtocolError)",
                     'ResponseProtocolError(self.stream_id, "killed", ErrorCode.KILL)'):
        assert expected in killed, expected
    # An interim response is kept as the connection's response: the reason a failure after
    # "100 Continue" wrote no page.
    assert "self.response = response = event.response" in inspect.getsource(
        inspect.unwrap(_http1.Http1Server.send))


def test_expect_continue_shape() -> None:
    from mitmproxy.proxy.layers import http as http_layers

    # continue_only_when_connected replaces the "100 Continue" the stream sends right after
    # its requestheaders hook, before it decides to stream or to buffer the body.
    source = inspect.getsource(inspect.unwrap(
        http_layers.HttpStream.state_wait_for_request_headers))
    order = ["yield HttpRequestHeadersHook(self.flow)", '"100-continue"',
             "http.Response.make(100)", "ResponseHeaders(self.stream_id, continue_response)",
             'self.flow.request.headers.pop("expect")', "self.start_request_stream()",
             "self.client_state = self.state_consume_request_body"]
    positions = [source.index(part) for part in order]
    assert positions == sorted(positions), positions
    assert inspect.isgeneratorfunction(http_layers.HttpStream.make_server_connection)
    connect = inspect.getsource(http_layers.HttpStream.make_server_connection)
    assert "yield GetHttpConnection(" in connect and "return True" in connect
    respond = inspect.getsource(http_layers.HttpStream.send_response)
    assert "yield HttpResponseHook(self.flow)" in respond
    assert "if self.client_state == self.state_done:" in respond
