"""Every private mitmproxy name the sidecar touches: what for, what breaks without it, and the
mitmproxy releases it was checked on.

*Private* means what mitmproxy does not document as its addon API
(https://docs.mitmproxy.org/stable/api/events.html and the modules listed there): any name
with a leading underscore, everything in its sans-io proxy core and its addon dispatch
(:data:`INTERNAL_MODULES`), and anything the sidecar patches. Only the fence may touch them:
``sidecar/proxy/mitm_compat.py`` (correctness fixes, and the one place that reads mitmproxy's
words), ``sidecar/proxy/speedups.py`` (the embedded master's speed tweaks) and this table.
Helpers without an underscore that mitmproxy's own addons use (``mitmproxy.net.http.*``,
``mitmproxy.addons.*``, ``mitmproxy.master``) are not private here.

``tests/test_mitm_fence.py`` fails when code outside the fence uses a private name, when the
fence uses one this table does not list, when an entry no longer resolves on the installed
mitmproxy (or its words are gone), and when a release CI tests is not in :data:`CHECKED_ON`.
The behaviour behind each entry is checked in ``tests/test_mitm_compat.py`` and
``tests/test_speedups.py``.

Upgrading mitmproxy: install the release (``pip install 'mitmproxy==X'``), run the
mitmproxy-sensitive modules (``tests/test_mitm_fence.py tests/test_mitm_compat.py
tests/test_speedups.py tests/test_proxy.py tests/test_request_hygiene.py tests/test_limits.py
tests/test_streaming.py tests/test_upstream_tls.py tests/test_failures.py
tests/test_fail_closed.py tests/test_reload_keepalive.py tests/test_routing_addon.py
tests/test_credentials_addon.py tests/test_mitmdump_saved_flows.py``), then add the release to
:data:`CHECKED_ON` and update ``requirements.lock``. CI runs the whole suite on the floor
(``.ci/oldest-deps.txt``, the Python 3.12 run) and on the lock's release (the 3.13 run):
docs/testing.md#ci-time. Patches that only fix mitmproxy, candidates to send upstream:
docs/architecture.md, "mitmproxy internals we rely on, and fixes to send upstream".
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Literal

# The releases the whole table was checked on: the floor (pyproject.toml, .ci/oldest-deps.txt)
# and requirements.lock's release. 12.1.x, 12.2.0-12.2.2 cannot be installed with the sidecar's
# floors (pyproject.toml says why), so the fence was never run on them.
CHECKED_ON: tuple[str, ...] = ("12.2.3", "12.3.1")

# Every name in these modules is private (mitmproxy's sans-io proxy core, its addon dispatch).
INTERNAL_MODULES: tuple[str, ...] = (
    "mitmproxy.proxy.layers",
    "mitmproxy.proxy.layer",
    "mitmproxy.proxy.server",
    "mitmproxy.proxy.commands",
    "mitmproxy.proxy.events",
    "mitmproxy.proxy.tunnel",
    "mitmproxy.addonmanager",
    "mitmproxy.hooks",
)
# ... except these, which mitmproxy documents.
PUBLIC_IN_INTERNAL_MODULES: frozenset[str] = frozenset({"mitmproxy.addonmanager.Loader"})

# The modules of the fence, relative to the repository.
FENCE: tuple[str, ...] = (
    "sidecar/proxy/mitm_compat.py",
    "sidecar/proxy/speedups.py",
    "sidecar/proxy/mitm_private.py",
)

# patched: replaced on its class or module (tests/support/mitm_patches.py restores it after each
# test); shadowed: replaced on one instance; overridden: in a subclass of the fence's own.
Use = Literal["patched", "shadowed", "overridden", "called", "read", "subclassed", "constructed",
              "words", "behaviour"]


@dataclass(frozen=True)
class PrivateName:
    """One private mitmproxy name, as ``mitmproxy.module.Class.attribute``."""

    path: str
    use: Use
    by: str  # the fence functions that use it
    breaks: str  # what goes wrong for users without it
    words: str | None = None  # text its source must still contain (what the fence relies on)
    instance: bool = False  # set on instances (``self.x = ...``), not found on the class
    checked_on: tuple[str, ...] = CHECKED_ON

    @property
    def attribute(self) -> str:
        return self.path.rsplit(".", 1)[1]


_HTTP = "mitmproxy.proxy.layers.http"
_H1 = f"{_HTTP}._http1"
_SERVER = "mitmproxy.proxy.server"
_TLS = "mitmproxy.proxy.layers.tls"
_ERROR_PAGES = "mitm_compat.install_error_pages"
_HEADS = "mitm_compat.guard_request_heads"
_OWNERS = "mitm_compat.bind_upstream_connections"
_HANDLER = ("mitm_compat.close_upstream, close_upstreams_of, app_connections, close_client, "
            "last_activity")
_DISPATCH = "speedups.cache_hook_dispatch"
_NO_HANG = "a malformed request or an unreachable upstream gets mitmproxy's HTML page"

PRIVATE_NAMES: tuple[PrivateName, ...] = (
    # -- mitmproxy's error pages (install_error_pages, answer_failed_flow) ---------------------
    PrivateName(f"{_H1}.make_error_response", "patched", _ERROR_PAGES,
                _NO_HANG + ", not the sidecar's OperationOutcome with X-Sidecar-Error"),
    PrivateName(f"{_H1}.Http1Server.send", "patched", _ERROR_PAGES,
                "a failed flow's own answer (e.g. 502 upstream-tls naming the cause) is lost; "
                "the app gets the generic page",
                words="make_error_response(status, event.message)"),
    PrivateName(f"{_HTTP}.HttpStream.handle_event", "patched", _ERROR_PAGES,
                "as Http1Server.send: the flow's answer never reaches the app's connection"),
    PrivateName(f"{_HTTP}.HttpStream.handle_protocol_error", "behaviour", _ERROR_PAGES,
                "the error hook must run before the failure is sent to the client, or the "
                "answer set in it comes too late", words="yield HttpErrorHook(self.flow)"),
    PrivateName(f"{_HTTP}.HttpStream.flow", "read",
                f"{_ERROR_PAGES}, {_OWNERS}", "no flow to find the answer or the owner by",
                instance=True),
    PrivateName(f"{_HTTP}.SendHttp", "constructed", _ERROR_PAGES,
                "the answered failure cannot be sent on in mitmproxy's own command"),
    PrivateName(f"{_HTTP}.SendHttp.event", "read", _ERROR_PAGES,
                "the failure cannot be recognised among the stream's commands", instance=True),
    PrivateName(f"{_HTTP}.SendHttp.connection", "read", _ERROR_PAGES,
                "the failure cannot be told to be for the app's side", instance=True),
    PrivateName(f"{_HTTP}.ResponseProtocolError", "subclassed", _ERROR_PAGES,
                "the answer cannot travel with the failure event"),
    PrivateName(f"{_HTTP}.ResponseProtocolError.stream_id", "read", _ERROR_PAGES,
                "the answered failure cannot be rebuilt", instance=True),
    PrivateName(f"{_HTTP}.ResponseProtocolError.message", "read", _ERROR_PAGES,
                "the answered failure cannot be rebuilt", instance=True),
    PrivateName(f"{_HTTP}.ResponseProtocolError.code", "read", _ERROR_PAGES,
                "the answered failure cannot be rebuilt", instance=True),
    PrivateName(f"{_HTTP}.ErrorCode.http_status_code", "called", _ERROR_PAGES,
                "a failure that must not be answered (the app went away) would be"),
    PrivateName(f"{_HTTP}.HttpEvent", "read", _ERROR_PAGES, "type of Http1Server.send's event"),
    PrivateName(f"{_H1}.Http1Connection.response", "read", _ERROR_PAGES,
                "a page could be written after a response had started", instance=True),
    PrivateName(f"{_H1}.Http1Connection.conn", "read", f"{_ERROR_PAGES}, {_HEADS}",
                "no connection to write the answer to", instance=True),
    # -- the app's request head (guard_request_heads) -------------------------------------------
    PrivateName(f"{_H1}.Http1Server.read_headers", "patched", _HEADS,
                "a request head is buffered without limit (memory) and the header deadline "
                "never starts: 431 header-too-large and the slow-header timeout are lost",
                words="make_error_response(400, str(e))"),
    PrivateName(f"{_H1}.Http1Connection.buf", "read", _HEADS,
                "the head's size cannot be measured or dropped", instance=True),
    PrivateName(f"{_H1}.Http1Connection.state", "shadowed", _HEADS,
                "bytes after a refused head would still be parsed", instance=True),
    PrivateName("mitmproxy.proxy.layer.Layer.context", "read",
                f"{_HEADS}, {_ERROR_PAGES}, {_OWNERS}",
                "no app connection to report the head's arrival for", instance=True),
    PrivateName("mitmproxy.proxy.commands.Command", "read", "every patch", "generator type"),
    PrivateName("mitmproxy.proxy.commands.SendData", "constructed",
                f"{_HEADS}, {_ERROR_PAGES}", "the answer cannot be written"),
    PrivateName("mitmproxy.proxy.commands.CloseConnection", "constructed",
                f"{_ERROR_PAGES}, {_HEADS}", "the connection stays open after the answer"),
    PrivateName("mitmproxy.proxy.commands.CloseTcpConnection", "constructed", _HEADS,
                "a refused head cannot half-close, so the app may never read the 431",
                words="half_close"),
    PrivateName("mitmproxy.proxy.events.Event", "read", "every patch", "event type"),
    PrivateName("mitmproxy.proxy.events.ConnectionEvent", "read", _HEADS, "event type"),
    PrivateName("mitmproxy.proxy.events.DataReceived", "read", _HEADS,
                "arrivals cannot be told from other events"),
    PrivateName("mitmproxy.proxy.events.ConnectionClosed", "constructed",
                f"{_HEADS}, mitm_compat.install_tls_close_fix",
                "a close cannot be passed on or recognised"),
    # -- chunked trailers (drop_http1_trailers) -------------------------------------------------
    PrivateName(f"{_H1}.make_body_reader", "patched", "mitm_compat.drop_http1_trailers",
                "a chunked message with trailers raises NotImplementedError in mitmproxy and "
                "the connection hangs without an answer"),
    # -- the request form (track_request_forms) -------------------------------------------------
    PrivateName(f"{_HTTP}.HttpStream.state_wait_for_request_headers", "patched",
                "mitm_compat.track_request_forms",
                "origin-form requests cannot be told from absolute-form ones, so the Host rule "
                "for the forward proxy (docs/callers.md) cannot be applied"),
    PrivateName(f"{_HTTP}.RequestHeaders", "read", "mitm_compat.track_request_forms",
                "no request to read the form of"),
    PrivateName(f"{_HTTP}.HttpStream.state_wait_for_request_headers", "patched",
                "mitm_compat.continue_only_when_connected",
                "Expect: 100-continue is answered before the upstream is connected: a request "
                "refused or failing afterwards gets 100 Continue, then a closed connection"),
    PrivateName(f"{_HTTP}.HttpStream.make_server_connection", "called",
                "mitm_compat.continue_only_when_connected",
                "the upstream cannot be opened before the 100 Continue"),
    PrivateName(f"{_HTTP}.HttpStream.state_errored", "read",
                "mitm_compat.continue_only_when_connected",
                "a failed connect before the 100 leaves the stream waiting for a body"),
    PrivateName(f"{_HTTP}.HttpStream.state_done", "read",
                "mitm_compat.continue_only_when_connected, "
                "mitm_compat.answer_malformed_request_bodies",
                "an answer sent before the body cannot end the stream"),
    PrivateName(f"{_HTTP}.HttpStream.send_response", "called",
                "mitm_compat.continue_only_when_connected, "
                "mitm_compat.answer_malformed_request_bodies",
                "the final answer before the body cannot be sent"),
    PrivateName(f"{_HTTP}.HttpResponseHeadersHook", "constructed",
                "mitm_compat.continue_only_when_connected",
                "addons never see the response headers of an answer sent before the body"),
    PrivateName(f"{_HTTP}.ResponseHeaders", "read", "mitm_compat.continue_only_when_connected",
                "the 100 Continue mitmproxy sends cannot be recognised"),
    PrivateName(f"{_HTTP}.RequestHeaders.end_stream", "read",
                "mitm_compat.continue_only_when_connected",
                "a request without a body would get a 100 Continue", instance=True),
    # -- request bodies that cannot be framed (answer_malformed_request_bodies) ------------------
    PrivateName(f"{_H1}.Http1Connection.read_body", "read",
                "mitm_compat.answer_malformed_request_bodies",
                "the body reader cannot be wrapped"),
    PrivateName(f"{_H1}.Http1Server.read_body", "patched",
                "mitm_compat.answer_malformed_request_bodies",
                "an invalid chunk size closes the app's connection without the 400 "
                "OperationOutcome docs/errors.md promises"),
    PrivateName(f"{_HTTP}.DropStream", "read", "mitm_compat.answer_malformed_request_bodies",
                "a request-side error sends nothing to the app"),
    PrivateName(f"{_HTTP}.ErrorCode.GENERIC_CLIENT_ERROR", "read",
                "mitm_compat.answer_malformed_request_bodies",
                "the malformed body's answer cannot be sent as mitmproxy's own error event"),
    # -- upstream connections belong to their owner (bind_upstream_connections) ---------------
    PrivateName(f"{_HTTP}.HttpLayer.get_connection", "patched", _OWNERS,
                "an upstream connection opened for one connection (its TLS policy, client "
                "certificate, credentials) is reused for another: a verify: skip connection "
                "could carry a verifying one's traffic",
                words="event.connection_spec_matches(connection)"),
    PrivateName(f"{_HTTP}.HttpLayer.command_sources", "read", _OWNERS,
                "the request asking for a connection (its owner) is unknown", instance=True),
    PrivateName(f"{_HTTP}.HttpLayer.connections", "read", _OWNERS,
                "new upstream connections cannot be tagged with their owner", instance=True),
    PrivateName(f"{_HTTP}.GetHttpConnection.connection_spec_matches", "shadowed", _OWNERS,
                "the reuse check cannot ask for the owner (shadowed per command)"),
    # -- the proxy server's connection handlers ---------------------------------------------------
    PrivateName("mitmproxy.addons.proxyserver.Proxyserver.connections", "read", _HANDLER,
                "the app's connection handler cannot be found: no upstream timeout, no "
                "retirement after a reload, no reset of a cut response", instance=True),
    PrivateName(f"{_SERVER}.ConnectionHandler.transports", "read",
                f"{_HANDLER}, speedups.read_in_large_chunks",
                "the connections and their streams cannot be walked", instance=True),
    PrivateName(f"{_SERVER}.ConnectionHandler.client", "read", _HANDLER,
                "the handler's app connection is unknown", instance=True),
    PrivateName(f"{_SERVER}.ConnectionHandler.close_connection", "called", _HANDLER,
                "a connection (and its slot) cannot be closed",
                words='handler.cancel("closed by command")'),
    PrivateName(f"{_SERVER}.ConnectionHandler.timeout_watchdog", "read",
                "mitm_compat.last_activity", "read_timeout_seconds cannot see upstream activity",
                instance=True),
    PrivateName(f"{_SERVER}.TimeoutWatchdog.last_activity", "read", "mitm_compat.last_activity",
                "as timeout_watchdog", instance=True),
    PrivateName(f"{_SERVER}.ConnectionIO.reader", "read", "speedups.read_in_large_chunks",
                "reads stay 64 KiB each (slower, still correct)"),
    PrivateName(f"{_SERVER}.ConnectionIO.writer", "read", "mitm_compat.close_client",
                "a cut response cannot be reset (RST), so it may look complete"),
    PrivateName(f"{_SERVER}.ConnectionHandler.max_conns", "behaviour",
                "mitm_compat.close_upstreams_of",
                "the reason retired upstream connections must be closed: five per address, "
                "held for a connection's life, or a keep-alive app hangs after five reloads",
                words="asyncio.Semaphore(5)", instance=True),
    PrivateName(f"{_SERVER}.ConnectionHandler.open_connection", "behaviour",
                "mitm_compat.connect_exception",
                "the server_connect_error hook must run inside the except clause, or the "
                "connect OSError (refused, DNS, timeout) is lost and only words are left",
                words="ServerConnectErrorHook(hook_data)"),
    # -- TLS alerts after the handshake (install_tls_close_fix) -------------------------------
    PrivateName(f"{_TLS}.ServerTLSLayer.receive_data", "patched",
                "mitm_compat.install_tls_close_fix",
                "a TLS 1.3 server that refuses the client certificate after the handshake "
                "leaves the request waiting for ever (until the sidecar's deadline)"),
    PrivateName(f"{_TLS}.TLSLayer.tls", "read", "mitm_compat.install_tls_close_fix",
                "the alert cannot be recognised"),
    PrivateName(f"{_TLS}.TLSLayer.receive_close", "behaviour",
                "mitm_compat.install_tls_close_fix",
                "the reason for the fix: a received shutdown is taken as already passed on",
                words="RECEIVED_SHUTDOWN"),
    PrivateName("mitmproxy.proxy.tunnel.TunnelLayer.conn", "read",
                "mitm_compat.install_tls_close_fix", "the connection's state is unknown",
                instance=True),
    PrivateName("mitmproxy.proxy.tunnel.TunnelLayer.event_to_child", "called",
                "mitm_compat.install_tls_close_fix", "the close cannot be passed on"),
    # -- mitmproxy's words (read_flow_failure) ----------------------------------------------------
    PrivateName(f"{_HTTP}._upstream_proxy.HttpUpstreamProxy.receive_handshake_data", "words",
                "mitm_compat.read_flow_failure",
                "an egress proxy refusing CONNECT becomes a generic upstream-unreachable "
                "without the proxy's status line", words="refused HTTP CONNECT request: "),
    PrivateName(f"{_H1}.Http1Client", "words", "mitm_compat.read_flow_failure",
                "an upstream closing before its answer is not worded as such",
                words='"server closed connection"'),
    PrivateName("mitmproxy.proxy.tunnel.TunnelLayer", "words", "mitm_compat.read_flow_failure",
                "as Http1Client", words='err = "connection closed"'),
    PrivateName(f"{_TLS}.ClientTLSLayer", "words", "mitm_compat.read_flow_failure",
                "as Http1Client", words='"connection closed early"'),
    PrivateName(f"{_HTTP}._http2", "words", "mitm_compat.read_flow_failure",
                "as Http1Client (HTTP/2 upstreams)", words="peer closed connection"),
    # -- speed tweaks of the embedded master (speedups.py) ------------------------------------
    PrivateName("mitmproxy.http.MessageData.__post_init__", "patched",
                "speedups.skip_message_type_checks",
                "none: the type checks run again (slower per request)"),
    PrivateName(f"{_SERVER}.ConnectionHandler.handle_connection", "patched",
                "speedups.read_in_large_chunks",
                "none: reads of 64 KiB again (15% more CPU for large pages)"),
    PrivateName("mitmproxy.addonmanager.AddonManager", "subclassed", _DISPATCH,
                "none: mitmproxy's per-event hook lookup again (slower per request)"),
    PrivateName("mitmproxy.addonmanager.AddonManager.trigger_event", "overridden", _DISPATCH,
                "as AddonManager"),
    PrivateName("mitmproxy.addonmanager.AddonManager.handle_lifecycle", "overridden", _DISPATCH,
                "as AddonManager; the update hook after a flow hook would be skipped",
                words="UpdateHook"),
    PrivateName("mitmproxy.addonmanager.AddonManager.chain", "read", _DISPATCH,
                "the cache cannot follow a changed addon chain", instance=True),
    PrivateName("mitmproxy.addonmanager.safecall", "called", _DISPATCH,
                "an addon's exception would escape the dispatch instead of being logged"),
    PrivateName("mitmproxy.hooks.Hook", "read", _DISPATCH, "hook type"),
    PrivateName("mitmproxy.hooks.Hook.name", "read", _DISPATCH,
                "hooks cannot be looked up by name", instance=True),
    PrivateName("mitmproxy.hooks.Hook.args", "called", _DISPATCH,
                "hooks cannot be called with their arguments"),
    PrivateName("mitmproxy.hooks.UpdateHook", "constructed", _DISPATCH,
                "the update hook after a flow hook cannot be triggered"),
)

_MISSING = object()


def by_path() -> dict[str, PrivateName]:
    return {entry.path: entry for entry in PRIVATE_NAMES}


def is_private(path: str) -> bool:
    """Whether a dotted mitmproxy name is private in the sense of this module."""
    if not (path == "mitmproxy" or path.startswith("mitmproxy.")):
        return False
    if path in PUBLIC_IN_INTERNAL_MODULES:
        return False
    if any(part.startswith("_") and not part.startswith("__") for part in path.split(".")):
        return True
    if any(path == module or path.startswith(module + ".") for module in INTERNAL_MODULES):
        return True
    return path in by_path()


def covered(path: str) -> bool:
    """Whether the table lists ``path``, or a member of it (a class or module used as such)."""
    return any(entry.path == path or entry.path.startswith(path + ".")
               for entry in PRIVATE_NAMES)


def resolve(entry: PrivateName) -> object:
    """The object ``entry`` names on the installed mitmproxy; raises LookupError if gone.

    An instance attribute resolves to its class, where ``self.name = ...``, an annotation or a
    dataclass field must still declare it. An entry with words resolves only while its
    source (or its class's, for an instance attribute) still contains them.
    """
    parts = entry.path.split(".")
    obj: object = _MISSING
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        rest = parts[cut:]
        break
    if obj is _MISSING:
        raise LookupError(f"{entry.path}: no such module")
    for i, name in enumerate(rest):
        found = getattr(obj, name, _MISSING)
        if found is _MISSING and i == len(rest) - 1 and entry.instance and inspect.isclass(obj):
            if not _declares(obj, name):
                raise LookupError(f"{entry.path}: {obj.__name__} no longer declares {name}")
            found = obj
        if found is _MISSING:
            raise LookupError(f"{entry.path}: no attribute {name!r}")
        obj = found
    if entry.words is not None:
        source = inspect.getsource(inspect.unwrap(obj))  # type: ignore[arg-type]
        if entry.words not in source:
            raise LookupError(f"{entry.path}: its source no longer says {entry.words!r}")
    return obj


def _declares(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if not klass.__module__.startswith("mitmproxy"):
            continue
        if name in inspect.get_annotations(klass):
            return True
        if re.search(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=[^=]", inspect.getsource(klass)):
            return True
    return False
