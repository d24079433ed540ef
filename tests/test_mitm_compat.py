"""Fails loudly when a dependency internal we rely on changes (see sidecar/proxy/mitm_compat.py
and sidecar/tls_policy.enable_hostname_verification)."""

from __future__ import annotations

import gc
import inspect
import socket
import ssl
import threading
from collections.abc import Callable

from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.server import ConnectionHandler
from OpenSSL import SSL

from sidecar.config.models import TlsSettings
from sidecar.demo.pki import DemoPKI
from sidecar.proxy import mitm_compat
from sidecar.tls_policy import (
    UpstreamTlsPolicy,
    compile_tls_policy,
    enable_hostname_verification,
    retire_connection,
)


def test_mitmproxy_error_page_renderer_shape() -> None:
    params = list(inspect.signature(_http1.make_error_response).parameters)
    assert params[:2] == ["status_code", "message"]
    assert b"502" in _http1.make_error_response(502, "x")


def test_replaced_error_page_is_used_once_for_that_message_only() -> None:
    text = "Connect call failed ('127.0.0.1', 1)"
    message = "".join(list(text))  # equal text, but its own object (as mitmproxy's would be)
    response = http.Response.make(502, b"{}", {"X-Sidecar-Error": "upstream-unreachable"})
    mitm_compat.replace_error_page(message, response)
    assert b"X-Sidecar-Error" not in _http1.make_error_response(502, text)
    assert b"X-Sidecar-Error" in _http1.make_error_response(502, message)
    assert b"X-Sidecar-Error" not in _http1.make_error_response(502, message)


def test_proxyserver_connection_registry_shape() -> None:
    assert isinstance(Proxyserver().connections, dict)
    assert callable(ConnectionHandler.close_connection)
    assert "transports" in inspect.getsource(ConnectionHandler.__init__)


def test_openssl_hostname_bindings_exist() -> None:
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    enable_hostname_verification(conn, "fhir.example.org")
    enable_hostname_verification(conn, "127.0.0.1")


def test_message_type_checks_can_be_skipped() -> None:
    from mitmproxy.http import MessageData

    had_checks = "__post_init__" in MessageData.__dict__
    mitm_compat.skip_message_type_checks()
    # Still constructible, and the generated __init__ still finds a __post_init__ to call.
    response = http.Response.make(200, b"{}", {"Content-Type": "application/fhir+json"})
    assert response.status_code == 200
    assert had_checks == (MessageData.__post_init__ is mitm_compat._no_type_check)  # type: ignore[attr-defined]


def _pump(conn: SSL.Connection, sock: socket.socket, step: Callable[[], object]) -> object:
    """Drive a memory-BIO pyOpenSSL connection (as mitmproxy does) over a blocking socket."""
    while True:
        try:
            result = step()
        except SSL.WantReadError:
            _flush(conn, sock)
            data = sock.recv(65536)
            assert data, "server closed the connection"
            conn.bio_write(data)
        else:
            _flush(conn, sock)
            return result


def _flush(conn: SSL.Connection, sock: socket.socket) -> None:
    while True:
        try:
            sock.sendall(conn.bio_read(65536))
        except SSL.WantReadError:
            return


def test_tls_sessions_resume_only_under_the_policy_that_made_them(pki: DemoPKI) -> None:
    identity = pki.server(name="resumption")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(identity.cert_chain, identity.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(4):
            raw, _ = listener.accept()
            with server_ctx.wrap_socket(raw, server_side=True) as tls_sock:
                tls_sock.sendall(b"x")  # after the TLS 1.3 session tickets
                tls_sock.recv(1)  # until the client hangs up

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings = TlsSettings(verify="custom", ca_bundle=pki.ca_bundle_path)
    policy, other_policy = compile_tls_policy(settings), compile_tls_policy(settings)

    def connect(used: UpstreamTlsPolicy, *, retire: bool = True) -> bool:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            conn = used.new_openssl_connection("127.0.0.1", port=port)
            _pump(conn, sock, conn.do_handshake)
            assert _pump(conn, sock, lambda: conn.recv(1)) == b"x"
            used.remember_session("127.0.0.1", port, conn)
            reused = mitm_compat.tls_session_reused(conn)
            if retire:
                retire_connection(conn)
        return reused

    def connect_and_free(used: UpstreamTlsPolicy, *, retire: bool = True) -> bool:
        reused = connect(used, retire=retire)
        gc.collect()  # frees the SSL object, as happens to every closed upstream connection
        return reused

    try:
        assert connect_and_free(policy, retire=False) is False
        # OpenSSL voided that session when its connection was freed without a close_notify:
        # this is what retire_connection prevents.
        assert connect_and_free(policy) is False
        # The session remembered from the retired connection is resumed, although that
        # connection and its SSL object are gone.
        assert connect_and_free(policy) is True
        # An identical but separately compiled policy (e.g. after a reload) never gets it.
        assert connect_and_free(other_policy) is False
    finally:
        listener.close()
        thread.join(timeout=5)


def test_tls_layer_close_handling_shape() -> None:
    from mitmproxy.proxy.layers import tls as tls_layers

    # install_tls_close_fix wraps receive_data and relies on receive_close's assumption.
    assert "RECEIVED_SHUTDOWN" in inspect.getsource(tls_layers.TLSLayer.receive_close)
    mitm_compat.install_tls_close_fix()
    assert inspect.isgeneratorfunction(tls_layers.ServerTLSLayer.receive_data)


def test_cached_hook_dispatch_follows_the_addon_chain() -> None:
    import asyncio

    from mitmproxy import exceptions, options
    from mitmproxy.addonmanager import AddonManager
    from mitmproxy.master import Master
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import tflow

    calls: list[str] = []

    class First:
        def request(self, flow: http.HTTPFlow) -> None:
            calls.append("first")

    class Halting:
        async def request(self, flow: http.HTTPFlow) -> None:
            calls.append("halting")
            raise exceptions.AddonHalt

    class Late:
        def request(self, flow: http.HTTPFlow) -> None:
            calls.append("late")

    async def scenario() -> None:
        master = Master(options.Options())
        assert type(master.addons) is AddonManager  # the class the cache replaces
        mitm_compat.cache_hook_dispatch(master.addons)
        first = First()
        master.addons.add(first)
        flow = tflow.tflow()
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first"]
        master.addons.add(Halting(), Late())  # a changed chain is looked up again
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first", "first", "halting"]  # AddonHalt still stops the chain
        master.addons.remove(first)
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first", "first", "halting", "halting"]

    asyncio.run(scenario())
