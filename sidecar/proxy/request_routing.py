"""The addon that decides where a request goes, or refuses it.

``requestheaders`` checks the request (``request_checks.py``), routes it to a named connection
(``sidecar.request.routing``), confines its path to the connection's base path, removes the
app's own credentials and points the request at the upstream. A CONNECT is refused unless the config
intercepts HTTPS for that host. Whatever goes wrong inside, the request is refused, never
passed on as it came.
"""

from __future__ import annotations

from collections.abc import Awaitable

from mitmproxy import http
from mitmproxy.addonmanager import Loader
from mitmproxy.net.http import url as mitm_url
from mitmproxy.proxy.mode_specs import ReverseMode

from sidecar.callers import gate
from sidecar.callers.workload_tokens import Caller
from sidecar.fhir.links import LinkRewriter, app_base_url
from sidecar.proxy import error_answers, failures, mitm_compat, request_checks
from sidecar.proxy.config_source import SidecarConfig
from sidecar.proxy.flow_state import (
    FLOW_KEY,
    REQUEST_ID,
    FlowState,
    new_request_id,
    request_id_from,
    state_of,
    trace_of,
)
from sidecar.proxy.request_log import RequestLog
from sidecar.request.errors import SidecarError
from sidecar.request.headers import connection_options, hop_by_hop_fields, persistence_option
from sidecar.request.path import UnsafePath, confine, resolve
from sidecar.runtime.listeners import listen_address_of
from sidecar.runtime.snapshot import CompiledConnection, Snapshot


class Routing:
    def __init__(self, config: SidecarConfig, request_log: RequestLog) -> None:
        self._config = config
        self._request_log = request_log

    def load(self, loader: Loader) -> None:
        # mitmproxy would leave a request with trailers hanging, unanswered.
        mitm_compat.drop_http1_trailers()
        # The forward proxy's Host rule needs the form a request arrived in.
        mitm_compat.track_request_forms()

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        snapshot = self._config.current()
        if snapshot is None:
            return None
        try:
            return self._route(flow, snapshot)
        except Exception:
            # Fail closed. mitmproxy logs a hook's exception and carries on with the flow as
            # it is: unrouted, a forward-proxy request would go wherever the app asked.
            error_answers.refuse_after_failure(flow, self._state(flow, snapshot),
                                               "routing the request")
            return None

    def _state(self, flow: http.HTTPFlow, snapshot: Snapshot) -> FlowState:
        """The flow's state; one for a request refused before it was routed."""
        state = state_of(flow)
        if state is None:
            tracer, span = trace_of(flow)
            state = FlowState(snapshot, None, new_request_id(), tracer=tracer, span=span)
            flow.metadata[FLOW_KEY] = state
            self._request_log.started(flow, state)
        return state

    def _route(self, flow: http.HTTPFlow, snapshot: Snapshot) -> Awaitable[None] | None:
        request = flow.request
        authorization = request.headers.get("Authorization")  # a caller's workload token
        request_id = request_id_from(request.headers.get(REQUEST_ID))
        refused = request_checks.refusal(request, http2=flow.client_conn.alpn == b"h2")
        conn, upstream_path = None, None
        if refused is None:
            conn, upstream_path, refused = _destination(flow, snapshot)
        tracer, span = trace_of(flow)
        state = FlowState(snapshot, conn, request_id, tracer=tracer, span=span)
        flow.metadata[FLOW_KEY] = state
        self._request_log.started(flow, state)

        # The app's own credentials never leave the sidecar, whatever happens next.
        request.headers.pop("Authorization", None)
        request.headers.pop("Proxy-Authorization", None)
        _drop_hop_by_hop(request)
        request.headers[REQUEST_ID] = request_id
        if refused is not None:
            error_answers.refuse(flow, state, refused, close=True)
            return None
        if conn is None or upstream_path is None:
            error_answers.refuse(flow, state, failures.no_route(request.pretty_host,
                                                                request.path))
            return None
        refused = _caller_refusal(flow, snapshot, conn)
        if refused is not None:
            error_answers.refuse(flow, state, refused)
            return None

        upstream = conn.upstream
        if conn.settings.rewrite_links:
            state.links = LinkRewriter.between(upstream, _app_base(flow, conn))
        request.scheme, request.host, request.port = upstream.scheme, upstream.host, upstream.port
        request.path = upstream_path
        # Origin-form upstream, always: mitmproxy would send an absolute-form target that
        # arrived on a reverse listener on as it came (``GET https://host/fhir/...``).
        request.authority = ""
        request.host_header = upstream.host_header
        allowed_callers = conn.settings.allowed_callers
        if allowed_callers is None:
            return None
        verdict = gate.caller_verdict(authorization, connection=conn.name,
                                      allowed_callers=allowed_callers,
                                      verifiers=snapshot.callers)
        if isinstance(verdict, gate.NeedsKeys):
            return self._judge_after_keys(flow, state, snapshot, conn, authorization, verdict)
        _admit(flow, state, verdict)
        return None

    async def _judge_after_keys(self, flow: http.HTTPFlow, state: FlowState,
                                snapshot: Snapshot, conn: CompiledConnection,
                                authorization: str | None, needed: gate.NeedsKeys) -> None:
        try:
            await needed.source.refresh()
            assert conn.settings.allowed_callers is not None
            verdict = gate.after_keys(authorization, connection=conn.name,
                                      allowed_callers=conn.settings.allowed_callers,
                                      verifiers=snapshot.callers)
            _admit(flow, state, verdict)
        except Exception:
            error_answers.refuse_after_failure(flow, state, "checking the caller's token")

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # Apps reach upstreams through the sidecar in plain HTTP; a CONNECT tunnel would carry
        # TLS the sidecar can neither authenticate nor inspect -- unless the config opts in to
        # interception, and then only for configured hosts: mitmproxy terminates the app's TLS
        # with the sidecar's CA (TlsConfig's tls_start_client) and the decrypted requests are
        # routed like forward-proxy ones in ``requestheaders``.
        snapshot = self._config.current()
        if snapshot is None:
            return
        host = flow.request.host
        known = any(c.upstream.host == host.lower() for c in snapshot.connections.values())
        if known and snapshot.config.proxy.intercept_https:
            return
        # CONNECT requests skip requestheaders: the state is made here.
        error_answers.refuse(flow, self._state(flow, snapshot),
                             failures.connect_refused(host, known))


def _admit(flow: http.HTTPFlow, state: FlowState, verdict: Caller | SidecarError) -> None:
    if isinstance(verdict, SidecarError):
        error_answers.refuse(flow, state, verdict)
    else:
        state.caller = verdict.name


def _caller_refusal(flow: http.HTTPFlow, snapshot: Snapshot, conn: CompiledConnection
                    ) -> SidecarError | None:
    """The Host and Origin checks (docs/callers.md), before anything else is done."""
    request = flow.request
    client = flow.client_conn
    local = client.sockname[0] if client.sockname else None
    if isinstance(client.proxy_mode, ReverseMode):
        listen = listen_address_of(client.proxy_mode.full_spec)
        if listen is not None:
            refused = gate.host_refusal(
                request.host_header, listen=listen, local_address=local,
                allowed_hosts=conn.settings.allowed_hosts,
                setting=f"connections.{conn.name}.allowed_hosts",
                what=f"the listener of connection '{conn.name}'")
            if refused is not None:
                return refused
    elif mitm_compat.arrived_in_origin_form(request) and not client.tls:
        # An origin-form request on the forward proxy is routed by its Host alone: the one
        # kind a rebound page can send there. Absolute-form requests name their target.
        listen = snapshot.config.proxy.listen
        if listen is not None:
            refused = gate.host_refusal(
                request.host_header, listen=listen, local_address=local,
                allowed_hosts=snapshot.config.proxy.allowed_hosts,
                setting="proxy.allowed_hosts", what="the forward proxy")
            if refused is not None:
                return refused
    return gate.origin_refusal(request.headers.get("Origin"),
                               allowed_origins=conn.settings.allowed_origins,
                               connection=conn.name)


def _drop_hop_by_hop(request: http.Request) -> None:
    """Forward none of the app's hop-by-hop fields: ``Connection``, what it names, and the
    standard ones (``sidecar/request/headers.py``). ``Connection`` is replaced by the one option
    that keeps both connections' persistence as the app asked for."""
    headers = request.headers
    options = connection_options(headers.get_all("connection"))
    for name in hop_by_hop_fields(options):
        if name in headers:
            del headers[name]
    option = persistence_option(request.http_version, options)
    if option is not None:
        headers["Connection"] = option


def _destination(flow: http.HTTPFlow, snapshot: Snapshot
                 ) -> tuple[CompiledConnection | None, str | None, SidecarError | None]:
    """The connection, the upstream path (dot-segments resolved), or why it is refused."""
    client = flow.client_conn
    path = flow.request.path
    try:
        if isinstance(client.proxy_mode, ReverseMode):
            address = listen_address_of(client.proxy_mode.full_spec)
            conn = snapshot.by_listener(address) if address is not None else None
            if conn is None:
                return None, None, None
            route = snapshot.router.reverse(conn.name, conn.upstream, path)
            target = route.upstream_path  # the base path joined first: '..' may not undo it
        else:
            found = snapshot.router.forward(flow.request.host, resolve(path).target,
                                            scheme=flow.request.scheme,
                                            port=flow.request.port)
            if found is None:
                return None, None, None
            route, target = found, path
    except UnsafePath as exc:
        return None, None, failures.bad_request(str(exc))
    conn = snapshot.connections[route.connection]
    try:
        return conn, confine(target, conn.upstream.base_path), None
    except UnsafePath as exc:
        return conn, None, failures.bad_request(f"connection '{conn.name}': {exc}")


def _app_base(flow: http.HTTPFlow, conn: CompiledConnection) -> str:
    """The base URL the app used: its Host, plus the base path on the forward proxy."""
    request = flow.request
    host = request.host_header or mitm_url.hostport(request.scheme, request.host, request.port)
    scheme = "https" if flow.client_conn.tls else "http"
    if isinstance(flow.client_conn.proxy_mode, ReverseMode):
        return app_base_url(scheme, host)
    return app_base_url(scheme, host, conn.upstream.base_path)
