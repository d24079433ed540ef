"""What ``sidecar/proxy/mitm_compat.py`` and ``sidecar/proxy/speedups.py`` patch in mitmproxy.

They patch classes and module functions once per process, as the sidecar's own process needs.
A test that installs them in the test process (directly, or through an addon's ``running``
hook) must not leave them in force for the tests after it: ``conftest.py`` restores every
attribute listed here after each test (docs/testing.md#random-order). Every name that
``sidecar/proxy/mitm_private.py`` lists as patched must be here (``tests/test_mitm_fence.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mitmproxy.http import MessageData
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import tls as tls_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.server import ConnectionHandler

from sidecar.proxy import mitm_compat

PATCHED: tuple[tuple[Any, str], ...] = (
    # install_error_pages
    (_http1, "make_error_response"),
    (_http1.Http1Server, "send"),
    (http_layers.HttpStream, "handle_event"),
    (mitm_compat, "_fallback"),
    # bind_upstream_connections
    (http_layers.HttpLayer, "get_connection"),
    (mitm_compat, "_owner_of"),
    # install_tls_close_fix
    (tls_layers.ServerTLSLayer, "receive_data"),
    (mitm_compat, "_tls_close_fixed"),
    # guard_request_heads
    (_http1.Http1Server, "read_headers"),
    (mitm_compat, "_head_guard"),
    # track_request_forms, continue_only_when_connected
    (http_layers.HttpStream, "state_wait_for_request_headers"),
    # answer_malformed_request_bodies
    (_http1.Http1Server, "read_body"),
    (mitm_compat, "_malformed_bodies_answered"),
    (mitm_compat, "_continuing"),
    # drop_http1_trailers
    (_http1, "make_body_reader"),
    (mitm_compat, "_trailers_dropped"),
    # speedups.skip_message_type_checks
    (MessageData, "__post_init__"),
    # speedups.read_in_large_chunks
    (ConnectionHandler, "handle_connection"),
)


@contextlib.contextmanager
def restored() -> Iterator[None]:
    """Put back, when the block ends, each attribute as it is now; one that was only
    inherited (``HttpStream.handle_event``) is removed from the owner again."""
    missing = object()
    saved = [(owner, name, vars(owner).get(name, missing)) for owner, name in PATCHED]
    try:
        yield
    finally:
        for owner, name, value in saved:
            if value is not missing:
                setattr(owner, name, value)
            elif name in vars(owner):
                delattr(owner, name)
