"""Every use of a mitmproxy internal lives here, each in one function.

``tests/test_mitm_compat.py`` checks that these internals still exist with the expected
shape, so a mitmproxy upgrade that changes them fails loudly instead of silently.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections import OrderedDict
from collections.abc import Callable, Generator
from typing import Any

from mitmproxy import connection, ctx, exceptions, flow, hooks, http
from mitmproxy.addonmanager import AddonManager, safecall
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import tls as tls_layers
from mitmproxy.proxy.layers.http import HttpEvent, ResponseProtocolError, _http1
from OpenSSL import SSL

# Answers waiting to replace mitmproxy's HTML error page for one request, by the id (a UUID
# string) of the client connection it came on: an HTTP/1 connection carries one request at a
# time. Bounded, in case a page is never written (the client went away first).
_pending: OrderedDict[str, tuple[http.Request, http.Response]] = OrderedDict()
_PENDING_LIMIT = 1024
ErrorPage = Callable[[int, str], http.Response]
_fallback: ErrorPage | None = None


def install_error_pages(fallback: ErrorPage) -> None:
    """Answer with ``fallback(status, message)`` wherever mitmproxy would write an HTML page.

    mitmproxy answers some requests by itself with ``text/html`` pages
    (``_http1.make_error_response``): a malformed request line or header (400, before any
    addon sees a flow), a request that fails its own header validation, an upstream that
    cannot be reached (502). An addon cannot set a response for these, so the page renderer is
    replaced; ``replace_error_page`` gives one request its own, more specific answer.
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
        if isinstance(event, ResponseProtocolError):
            entry = _pending.pop(self.conn.id, None)
            if entry is not None and entry[0] is self.request:
                # mitmproxy's own handling of this event, with the flow's answer as the page.
                if not self.conn.state & connection.ConnectionState.CAN_WRITE:
                    return
                if not self.response and event.code.http_status_code() is not None:
                    yield commands.SendData(self.conn, bytes(assemble_response(entry[1])))
                yield commands.CloseConnection(self.conn)
                return
        yield from original_send(self, event)

    _http1.Http1Server.send = send  # type: ignore[method-assign,assignment]


def replace_error_page(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer the flow's client with ``response`` where mitmproxy would write its own page.

    For failures mitmproxy reports through the ``error`` hook: it renders their page after
    the hook, ignoring any response an addon sets there. Needs ``install_error_pages``.
    """
    _pending[flow.client_conn.id] = (flow.request, response)
    _pending.move_to_end(flow.client_conn.id)
    while len(_pending) > _PENDING_LIMIT:
        _pending.popitem(last=False)


def close_upstream(client: connection.Client, address: tuple[str, int]) -> bool:
    """Close (or abort connecting) the client's server connections to ``address``.

    mitmproxy has no per-request upstream timeout; closing the server connection makes the
    pending request fail through the normal error path. Returns whether one was found.
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = proxyserver.connections.get(client.id) if proxyserver else None
    if handler is None:
        return False
    found = False
    for conn in list(handler.transports):
        if isinstance(conn, connection.Server) and conn.address == address:
            handler.close_connection(conn)
            found = True
    return found


def skip_message_type_checks() -> bool:
    """Stop mitmproxy from type-checking every field of every Request and Response it builds.

    ``MessageData.__post_init__`` runs ``typecheck.check_option_type`` on each field of each
    message (twice per proxied request, plus one throw-away Response per response read); it
    is a development aid that ``python -O`` compiles out, and it was ~7% of the sidecar's
    CPU per keep-alive request in ``bench/profile.py``. Returns whether it was in place.
    """
    from mitmproxy.http import MessageData

    if "__post_init__" not in MessageData.__dict__:
        return False
    # A dataclass's generated __init__ calls __post_init__ when the class had one, so it is
    # replaced by a no-op rather than deleted.
    MessageData.__post_init__ = _no_type_check  # type: ignore[attr-defined,method-assign]
    return True


def _no_type_check(self: object) -> None:
    return None


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

    def receive_data(self: tls_layers.ServerTLSLayer, data: bytes):  # type: ignore[no-untyped-def]
        yield from original(self, data)
        alerted = (self.tls is not None and self.tls.get_shutdown() & SSL.RECEIVED_SHUTDOWN
                   and self.conn.state & connection.ConnectionState.CAN_READ)
        if alerted:
            self.conn.state &= ~connection.ConnectionState.CAN_READ
            yield from self.event_to_child(events.ConnectionClosed(self.conn))

    tls_layers.ServerTLSLayer.receive_data = receive_data  # type: ignore[method-assign,assignment]


def cache_hook_dispatch(addons: AddonManager) -> None:
    """Dispatch each hook only to the addons that implement it, looked up once per hook name.

    mitmproxy looks every hook up on every addon for every event (``trigger_event`` →
    ``invoke_addon`` → ``_iter_hooks`` → ``traverse``) and triggers an ``update`` hook after
    each flow hook, which none of the sidecar's addons implement: ~15% of the CPU per request
    in ``bench/profile.py``. The lookup is redone whenever the addon chain changes; a chain
    with nested addons (whose children may change unseen) keeps mitmproxy's own dispatch.
    """
    if type(addons) is AddonManager:
        addons.__class__ = _CachingAddonManager


class _CachingAddonManager(AddonManager):
    _handlers: dict[str, list[Callable[..., object]]]
    _handlers_chain: list[object] | None = None  # a copy of the chain the handlers are for

    def _handlers_for(self, name: str) -> list[Callable[..., object]] | None:
        if self._handlers_chain != self.chain:  # compares the addons by identity, in C
            if any(hasattr(addon, "addons") for addon in self.chain):
                return None
            self._handlers, self._handlers_chain = {}, list(self.chain)
        found = self._handlers.get(name)
        if found is None:
            found = []
            for addon in self.chain:
                func = getattr(addon, name, None)
                if func is None or isinstance(func, types.ModuleType):
                    continue
                if not callable(func):
                    return None  # mitmproxy's own dispatch reports this as an error
                found.append(func)
            self._handlers[name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self._handlers_for(event.name)
        if handlers is None:
            await super().trigger_event(event)
            return
        args = event.args()
        for func in handlers:
            try:
                with safecall():
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self._handlers_for("update") != []:
            message = event.args()[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))
