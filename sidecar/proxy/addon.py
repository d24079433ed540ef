"""The mitmproxy addon: a thin adapter from mitmproxy hooks to the sidecar's plain modules.

Request path: ``requestheaders`` routes (``sidecar.routing``) and injects credentials
(``sidecar.credentials``); ``tls_start_server`` applies the connection's TLS policy
(``sidecar.tls_policy``); ``error`` turns upstream failures into OperationOutcomes
(``sidecar.proxy.failures``); ``response`` logs one line per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field

import httpx
from mitmproxy import certs, connection, ctx, exceptions, http, tls
from mitmproxy.net.http import url as mitm_url
from mitmproxy.proxy.mode_specs import ReverseMode
from OpenSSL import SSL

from sidecar.config.errors import ConfigError
from sidecar.errors import ErrorKind, SidecarError
from sidecar.intercept import CaExportError, ca_certificate, export_ca_certificate
from sidecar.links import REWRITTEN_HEADERS, LinkRewriter, app_base_url
from sidecar.listeners import listener_modes
from sidecar.live import LiveConfig
from sidecar.logs import log_event, log_request
from sidecar.observe import NO_CONNECTION, NullObserver, ProxyObserver
from sidecar.proxy import failures, mitm_compat
from sidecar.snapshot import CompiledConnection, Snapshot
from sidecar.tls_policy import UpstreamTlsPolicy
from sidecar.upstream_replay import replay

FLOW_KEY = "fhir_sidecar"
REQUEST_ID = "X-Request-ID"
HTTP1_ALPN = [b"http/1.1"]


@dataclass
class FlowState:
    """What the sidecar remembers about one request while it is in flight."""

    snapshot: Snapshot
    connection: CompiledConnection | None
    request_id: str
    started: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None
    timed_out: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    logged: bool = False
    bearer: str | None = field(default=None, repr=False)
    links: LinkRewriter | None = None  # when the upstream's URLs must point back at us
    links_done_for: http.Response | None = field(default=None, repr=False)


def _counter(state: FlowState, attr: str):  # type: ignore[no-untyped-def]
    def count(chunk: bytes) -> bytes:
        setattr(state, attr, getattr(state, attr) + len(chunk))
        return chunk
    return count


class FhirSidecar:
    """Routes each request to a named FHIR connection, with its credentials and TLS policy."""

    def __init__(self, live: LiveConfig | None = None, observer: ProxyObserver | None = None):
        mitm_compat.install_tls_close_fix()
        self.live = live
        self.observer: ProxyObserver = observer or NullObserver()
        # The connection a client's latest request was routed to, so the server TLS hook (which
        # sees connections, not requests) can apply that connection's policy.
        self._client_target: dict[str, tuple[Snapshot, CompiledConnection]] = {}
        # TLS verification outcome of a client's latest failed upstream handshake.
        self._tls_failures: dict[str, failures.TlsFailure] = {}
        # A client's new upstream TLS connection whose session is not yet remembered: TLS 1.3
        # tickets arrive after the handshake, so the session is taken at the first response.
        self._new_sessions: dict[str, tuple[UpstreamTlsPolicy, SSL.Connection, str, int]] = {}
        self.in_flight = 0
        self.listeners_bound = False
        self._own_listeners = False
        self._background: set[asyncio.Task[None]] = set()
        if live is not None:
            live.on_swap(self._snapshot_swapped)

    # -- lifecycle --------------------------------------------------------------------------

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("sidecar_config", str, "",
                          "fhir-sidecar config file (YAML). Sets the listeners it defines.")

    def configure(self, updated: set[str]) -> None:
        # Only used when loaded into a user's own mitmproxy (``mitmdump -s``); the embedded
        # runner passes a LiveConfig instead.
        if "sidecar_config" not in updated or not ctx.options.sidecar_config:
            return
        try:
            self.live = LiveConfig(ctx.options.sidecar_config)
        except ConfigError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        self.live.on_swap(self._snapshot_swapped)
        self._own_listeners = True
        if not ctx.options.stream_large_bodies:
            ctx.options.update(stream_large_bodies="1m")
        # Connect upstream only once a request has been routed to a connection.
        ctx.options.update(connection_strategy="lazy")
        # Keep the app's Host on reverse listeners: links are rewritten to the URL it used.
        ctx.options.update(keep_host_header=True)

    def running(self) -> None:
        if self.live is None:
            return
        if self._own_listeners:
            # Under mitmdump, command-line defaults (mode=regular) are applied after scripts
            # configure, so the config's listeners are set once everything is running.
            ctx.options.update(mode=listener_modes(self.live.current))
        for source in self.live.current.token_sources.values():
            source.start()
        self._export_ca(self.live.current)

    def _export_ca(self, snapshot: Snapshot) -> None:
        """Copy the CA that signs intercepted connections to ``proxy.ca_cert_export``."""
        destination = snapshot.config.proxy.ca_cert_export
        if destination is None:
            return
        try:
            confdir = os.path.expanduser(ctx.options.confdir)
            if not ca_certificate(confdir).exists():
                # Our ``running`` precedes TlsConfig's, which would create the CA: create it the
                # same way now (TlsConfig then loads these files).
                passphrase = ctx.options.cert_passphrase
                certs.CertStore.from_store(confdir, "mitmproxy", ctx.options.key_size,
                                           passphrase.encode() if passphrase else None)
            if export_ca_certificate(confdir, destination):
                log_event("ca_exported", logging.INFO, f"CA certificate written to {destination}")
        except CaExportError as exc:
            log_event("ca_export_failed", logging.ERROR, str(exc))

    def _snapshot_swapped(self, old: Snapshot, new: Snapshot) -> None:
        """Start what the new snapshot added, retire what it dropped, move listeners."""
        kept = {id(s) for s in new.token_sources.values()}
        for source in new.token_sources.values():
            if source not in old.token_sources.values():
                source.start()
        for source in old.token_sources.values():
            if id(source) not in kept:
                task = asyncio.get_running_loop().create_task(source.aclose())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        if new.config.proxy.ca_cert_export != old.config.proxy.ca_cert_export:
            self._export_ca(new)
        modes = listener_modes(new)
        if modes != listener_modes(old):
            ctx.options.update(mode=modes)

    def client_disconnected(self, client: connection.Client) -> None:
        self._client_target.pop(client.id, None)
        self._tls_failures.pop(client.id, None)
        self._new_sessions.pop(client.id, None)

    # -- requests ---------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if self.live is None:
            return None
        snapshot = self.live.current
        request = flow.request
        request_id = request.headers.get(REQUEST_ID) or uuid.uuid4().hex
        conn, upstream_path = self._route(flow, snapshot)
        state = FlowState(snapshot, conn, request_id)
        flow.metadata[FLOW_KEY] = state
        self._started(state)

        # The app's own credentials never leave the sidecar, whatever happens next.
        request.headers.pop("Authorization", None)
        request.headers.pop("Proxy-Authorization", None)
        request.headers[REQUEST_ID] = request_id
        if conn is None or upstream_path is None:
            self._answer(flow, failures.no_route(flow.request.pretty_host, flow.request.path))
            return None

        upstream = conn.upstream
        if conn.settings.rewrite_links:
            state.links = LinkRewriter.between(upstream, self._app_base(flow, conn))
        request.scheme, request.host, request.port = upstream.scheme, upstream.host, upstream.port
        request.path = upstream_path
        request.host_header = upstream.host_header
        self._client_target[flow.client_conn.id] = (snapshot, conn)
        if request.stream is True:
            request.stream = _counter(state, "bytes_in")

        if conn.basic is not None:
            request.headers["Authorization"] = conn.basic.header()
        elif conn.oauth is not None:
            return self._add_bearer(flow, state, conn)
        return None

    async def _add_bearer(self, flow: http.HTTPFlow, state: FlowState,
                          conn: CompiledConnection) -> None:
        from sidecar.credentials.oauth import TokenUnavailable

        assert conn.oauth is not None
        source = state.snapshot.token_sources[conn.oauth]
        try:
            token = await source.token()
        except TokenUnavailable as exc:
            self._answer(flow, failures.token_unavailable(conn.name, exc))
            return
        flow.request.headers["Authorization"] = f"Bearer {token}"
        state.bearer = token

    def _route(self, flow: http.HTTPFlow, snapshot: Snapshot
               ) -> tuple[CompiledConnection | None, str | None]:
        client = flow.client_conn
        if isinstance(client.proxy_mode, ReverseMode):
            conn = snapshot.by_listen_port(client.sockname[1])
            if conn is None:
                return None, None
            route = snapshot.router.reverse(conn.name, conn.upstream, flow.request.path)
        else:
            found = snapshot.router.forward(flow.request.host, flow.request.path)
            if found is None:
                return None, None
            route = found
        return snapshot.connections[route.connection], route.upstream_path

    @staticmethod
    def _app_base(flow: http.HTTPFlow, conn: CompiledConnection) -> str:
        """The base URL the app used: its Host, plus the base path on the forward proxy."""
        request = flow.request
        host = request.host_header or mitm_url.hostport(request.scheme, request.host,
                                                        request.port)
        scheme = "https" if flow.client_conn.tls else "http"
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return app_base_url(scheme, host)
        return app_base_url(scheme, host, conn.upstream.base_path)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # Apps reach upstreams through the sidecar in plain HTTP; a CONNECT tunnel would carry
        # TLS the sidecar can neither authenticate nor inspect -- unless the config opts in to
        # interception, and then only for configured hosts: mitmproxy terminates the app's TLS
        # with the sidecar's CA (TlsConfig's tls_start_client) and the decrypted requests are
        # routed like forward-proxy ones in ``requestheaders``.
        host = flow.request.host
        known = self._known_host(host)
        intercept = self.live is not None and self.live.current.config.proxy.intercept_https
        if known and intercept:
            return
        self._answer(flow, failures.connect_refused(host, known))

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # A refused CONNECT never reaches ``response``: finish (log, count) it here.
        state = flow.metadata.get(FLOW_KEY)
        if state is not None:
            self._log(flow, state)

    def _known_host(self, host: str) -> bool:
        return self.live is not None and any(
            c.upstream.host == host.lower() for c in self.live.current.connections.values())

    def request(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None or state.connection is None or flow.response is not None:
            return
        if flow.request.raw_content is not None:
            state.bytes_in = len(flow.request.raw_content)
        # mitmproxy has no per-request upstream deadline: start ours now that the request is
        # about to be sent; response headers (or an error) stop it.
        loop = asyncio.get_running_loop()
        state.timer = loop.call_later(state.connection.timeout_seconds, self._timed_out, flow)

    def _timed_out(self, flow: http.HTTPFlow) -> None:
        state: FlowState = flow.metadata[FLOW_KEY]
        state.timed_out = True
        assert state.connection is not None
        upstream = state.connection.upstream
        mitm_compat.close_upstream(flow.client_conn, (upstream.host, upstream.port))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None:
            return
        if state.timer is not None:
            state.timer.cancel()
        assert flow.response is not None
        new_session = self._new_sessions.pop(flow.client_conn.id, None)
        if new_session is not None:
            policy, ssl_conn, host, port = new_session
            policy.remember_session(host, port, mitm_compat.detached_tls_session(ssl_conn))
        flow.response.headers[REQUEST_ID] = state.request_id
        self._rewrite_link_headers(flow.response, state)
        if self._may_retry(flow, state):
            flow.response.stream = False  # keep the 401 so it can be replaced by the retry
        elif flow.response.stream is True:
            flow.response.stream = _counter(state, "bytes_out")

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None:
            return None
        if self._may_retry(flow, state):
            return self._retry_with_new_token(flow, state)
        self._finish(flow, state)
        return None

    def _finish(self, flow: http.HTTPFlow, state: FlowState) -> None:
        assert flow.response is not None
        self._rewrite_links(flow.response, state)
        if flow.response.raw_content is not None:
            state.bytes_out = len(flow.response.raw_content)
        self._log(flow, state)

    @staticmethod
    def _rewrite_link_headers(response: http.Response, state: FlowState) -> None:
        links = state.links
        if links is None or state.links_done_for is response:
            return
        state.links_done_for = response
        for name in REWRITTEN_HEADERS:
            values = response.headers.get_all(name)
            if values:
                response.headers.set_all(name, [links.header(v) for v in values])

    def _rewrite_links(self, response: http.Response, state: FlowState) -> None:
        """Headers (again, if the response was replaced) and a buffered body; streamed bodies
        (over ``stream_large_bodies``) pass untouched."""
        links = state.links
        if links is None:
            return
        self._rewrite_link_headers(response, state)
        if response.stream or not response.raw_content:
            return
        try:
            body = response.get_content(strict=True)
        except ValueError:
            return  # a content encoding we cannot undo: leave the body as it is
        if body is None:
            return
        rewritten = links.body(body, response.headers.get("content-type"))
        if rewritten is not body:
            response.content = rewritten

    @staticmethod
    def _may_retry(flow: http.HTTPFlow, state: FlowState) -> bool:
        """An upstream 401 to a bearer token, for a request whose body can be sent again."""
        return (state.bearer is not None and flow.response is not None
                and flow.response.status_code == 401 and not flow.request.stream
                and flow.request.raw_content is not None)

    async def _retry_with_new_token(self, flow: http.HTTPFlow, state: FlowState) -> None:
        from sidecar.credentials.oauth import TokenUnavailable

        conn = state.connection
        assert conn is not None and conn.oauth is not None and state.bearer is not None
        source = state.snapshot.token_sources[conn.oauth]
        source.invalidate(state.bearer)
        state.bearer = None  # once only
        try:
            token = await source.token()
        except TokenUnavailable:
            self._finish(flow, state)  # the upstream's 401 stands
            return
        self.observer.auth_retry(conn.name)
        headers = [(k, v) for k, v in flow.request.headers.items(multi=True)
                   if k.lower() != "authorization"]
        headers.append(("Authorization", f"Bearer {token}"))
        try:
            again = await replay(conn, flow.request.method, flow.request.path, headers,
                                 flow.request.raw_content or b"")
        except httpx.HTTPError:
            self._finish(flow, state)  # keep the first answer rather than invent one
            return
        now = time.time()
        # The body exactly as received (raw: any content-encoding is not applied twice).
        response = http.Response(
            http_version=b"HTTP/1.1", status_code=again.status,
            reason=again.reason.encode("latin-1"),
            headers=http.Headers([(k.encode("latin-1"), v.encode("latin-1"))
                                  for k, v in again.headers]),
            content=again.raw_body, trailers=None, timestamp_start=now, timestamp_end=now)
        response.headers[REQUEST_ID] = state.request_id
        flow.response = response
        self._finish(flow, state)

    # -- upstream TLS and failures -----------------------------------------------------------

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        """Where upstream TLS is decided: the routed connection's own policy, never a global."""
        server = tls_start.conn
        assert isinstance(server, connection.Server) and server.address is not None
        target = self._client_target.get(tls_start.context.client.id)
        conn = target[1] if target else None
        if conn is None and self.live is not None:
            # Connected before any request was routed (an eager connection strategy).
            conn = self.live.current.by_upstream_address(*server.address)
        if conn is None or conn.tls is None:
            # Not one of our upstreams: refuse rather than fall back to mitmproxy's defaults.
            raise ValueError("fhir-sidecar: no TLS policy for this upstream")
        policy = conn.tls
        host = server.address[0]
        server.sni = policy.sni_for(host)
        server.alpn_offers = HTTP1_ALPN
        port = server.address[1]
        # Resuming the session of an earlier connection under this same policy saves most of
        # the handshake: a client opening a connection per request pays one per request.
        tls_start.ssl_conn = policy.new_openssl_connection(host, HTTP1_ALPN, port=port)
        self._new_sessions[tls_start.context.client.id] = (policy, tls_start.ssl_conn, host, port)

    def tls_failed_server(self, tls_start: tls.TlsData) -> None:
        target = self._client_target.get(tls_start.context.client.id)
        if target is not None and tls_start.ssl_conn is not None:
            self._tls_failures[tls_start.context.client.id] = failures.TlsFailure.from_conn(
                tls_start.ssl_conn, tls_start.conn.error or "")

    def error(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None or flow.error is None:
            return
        if state.timer is not None:
            state.timer.cancel()
        if state.connection is not None and flow.response is None:
            tls_failure = self._tls_failures.pop(flow.client_conn.id, None)
            problem = failures.classify(state.connection, flow.error.msg,
                                        timed_out=state.timed_out, tls_failure=tls_failure)
            if problem.kind is ErrorKind.UPSTREAM_TLS:
                self.observer.upstream_tls_failure(
                    state.connection.name, tls_failure.reason if tls_failure else "handshake")
            state.error = problem.kind.value
            mitm_compat.replace_error_page(flow.error.msg, self._error_response(problem, state))
            self._log(flow, state, status=problem.status)
        else:
            state.error = "client-disconnected" if flow.response is None else "stream-aborted"
            self._log(flow, state)

    # -- helpers -----------------------------------------------------------------------------

    def _error_response(self, problem: SidecarError, state: FlowState, close: bool = True
                        ) -> http.Response:
        headers = {**problem.headers(), REQUEST_ID: state.request_id}
        if close:  # mitmproxy closes the client connection after its own error pages
            headers["Connection"] = "close"
        return http.Response.make(problem.status, problem.body(), headers)

    def _answer(self, flow: http.HTTPFlow, problem: SidecarError) -> None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None:  # CONNECT requests skip requestheaders
            assert self.live is not None
            state = FlowState(self.live.current, None, uuid.uuid4().hex)
            flow.metadata[FLOW_KEY] = state
            self._started(state)
        state.error = problem.kind.value
        flow.response = self._error_response(problem, state, close=False)

    def _started(self, state: FlowState) -> None:
        self.in_flight += 1
        self.observer.request_started(_name(state))

    def _log(self, flow: http.HTTPFlow, state: FlowState, status: int | None = None) -> None:
        if state.logged:
            return
        state.logged = True
        self.in_flight -= 1
        response = flow.response
        upstream_status = None
        if response is not None and state.error is None:
            upstream_status = response.status_code
        status = status or (response.status_code if response else None)
        duration = time.monotonic() - state.started
        self.observer.request_finished(_name(state), flow.request.method, status, duration,
                                       state.error)
        log_request(
            request_id=state.request_id,
            connection=_name(state),
            method=flow.request.method,
            path=flow.request.path.split("?", 1)[0],
            status=status,
            upstream_status=upstream_status,
            duration_ms=round(duration * 1000, 2),
            bytes_in=state.bytes_in, bytes_out=state.bytes_out, error=state.error,
        )


def _name(state: FlowState) -> str:
    return state.connection.name if state.connection else NO_CONNECTION


def log_startup_problem(message: str) -> None:
    log_event("startup_failed", logging.ERROR, message)
