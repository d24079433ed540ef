"""Fails loudly when a dependency internal we rely on changes (see sidecar/proxy/mitm_compat.py
and sidecar/tls_policy.enable_hostname_verification)."""

from __future__ import annotations

import inspect

from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.server import ConnectionHandler
from OpenSSL import SSL

from sidecar.proxy import mitm_compat
from sidecar.tls_policy import enable_hostname_verification


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
