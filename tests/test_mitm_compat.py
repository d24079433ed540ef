"""Fails loudly when a mitmproxy internal we rely on changes (see sidecar/proxy/mitm_compat.py;
the OpenSSL bindings of sidecar/tls/openssl_bindings.py are covered by tests/test_tls_policy.py)."""

from __future__ import annotations

import inspect

from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.server import ConnectionHandler

from sidecar.proxy import mitm_compat


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


def test_message_type_checks_can_be_skipped() -> None:
    from mitmproxy.http import MessageData

    had_checks = "__post_init__" in MessageData.__dict__
    mitm_compat.skip_message_type_checks()
    # Still constructible, and the generated __init__ still finds a __post_init__ to call.
    response = http.Response.make(200, b"{}", {"Content-Type": "application/fhir+json"})
    assert response.status_code == 200
    assert had_checks == (MessageData.__post_init__ is mitm_compat._no_type_check)  # type: ignore[attr-defined]


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
