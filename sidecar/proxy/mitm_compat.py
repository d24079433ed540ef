"""Every use of a mitmproxy internal lives here, each in one function.

``tests/test_mitm_compat.py`` checks that these internals still exist with the expected
shape, so a mitmproxy upgrade that changes them fails loudly instead of silently.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from mitmproxy import connection, ctx, http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.proxy.layers.http import _http1

# Error bodies waiting to replace mitmproxy's HTML error page, keyed by the identity of the
# error message string that mitmproxy passes from the flow's error to the page renderer.
_pending: OrderedDict[int, tuple[str, http.Response]] = OrderedDict()
_PENDING_LIMIT = 1024
_original_make_error_response: Callable[..., bytes] | None = None


def replace_error_page(message: str, response: http.Response) -> None:
    """Answer the client with ``response`` instead of mitmproxy's HTML page for ``message``.

    mitmproxy renders upstream failures itself (``_http1.make_error_response``) after the
    ``error`` hook, ignoring any response an addon sets there. The message object is the one
    stored in ``flow.error.msg``, so its identity ties the page to the flow.
    """
    _install_error_renderer()
    _pending[id(message)] = (message, response)
    while len(_pending) > _PENDING_LIMIT:
        _pending.popitem(last=False)


def _install_error_renderer() -> None:
    global _original_make_error_response
    if _original_make_error_response is not None:
        return
    original = _http1.make_error_response
    _original_make_error_response = original

    def make_error_response(status_code: int, message: str = "") -> bytes:
        entry = _pending.pop(id(message), None)
        if entry is not None and entry[0] is message:
            return bytes(assemble_response(entry[1]))
        return original(status_code, message)

    _http1.make_error_response = make_error_response


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
