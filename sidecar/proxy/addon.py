"""The mitmproxy addon: a thin adapter from mitmproxy hooks to the sidecar's plain modules.

Request path: ``requestheaders`` routes (``sidecar.routing``) and injects credentials
(``sidecar.credentials``); the companion addon ``UpstreamTls`` (``upstream_tls.py``) applies
the routed connection's TLS policy (``sidecar.tls.policy``); ``error`` turns upstream failures
into OperationOutcomes (``failures.py``); ``response`` retries a rejected bearer token once
(``bearer_retry.py``), points FHIR links back at the sidecar (``response_links.py``) and logs
one line per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from mitmproxy import certs, connection, ctx, exceptions, http
from mitmproxy.net.http import url as mitm_url
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from sidecar.config.errors import ConfigError
from sidecar.errors import ErrorKind, SidecarError
from sidecar.intercept import CaExportError, ca_certificate, export_ca_certificate
from sidecar.links import LinkRewriter, app_base_url
from sidecar.listeners import listen_address_of, listener_modes
from sidecar.live import LiveConfig
from sidecar.logs import log_event, log_request
from sidecar.observe import NO_CONNECTION, NullObserver, ProxyObserver
from sidecar.proxy import error_answers, failures, mitm_compat, request_checks
from sidecar.proxy.bearer_retry import may_retry, retried_response
from sidecar.proxy.egress_tunnel import EgressTunnel
from sidecar.proxy.flow_state import (
    FLOW_KEY,
    REQUEST_ID,
    FlowState,
    byte_counter,
    new_request_id,
    request_id_from,
    upstream_owner,
)
from sidecar.proxy.limits import ClientLimits, UpstreamReadTimeout
from sidecar.proxy.response_links import rewrite_link_headers, rewrite_links, stream_body
from sidecar.proxy.upstream_tls import UpstreamTls
from sidecar.request_path import UnsafePath, confine, resolve
from sidecar.snapshot import CompiledConnection, Snapshot

if TYPE_CHECKING:
    from sidecar.credentials.oauth import TokenSource


class FhirSidecar:
    """Routes each request to a named FHIR connection, with its credentials and TLS policy."""

    def __init__(self, live: LiveConfig | None = None, observer: ProxyObserver | None = None):
        mitm_compat.install_tls_close_fix()
        mitm_compat.install_error_pages(self._protocol_error_page)
        mitm_compat.drop_http1_trailers()
        # An upstream connection carries only requests of the compiled connection (TLS
        # policy, client certificate, credentials, snapshot) that opened it.
        mitm_compat.bind_upstream_connections(upstream_owner)
        self.live = live
        self.observer: ProxyObserver = observer or NullObserver()
        # Its own addon, added right after this one (and before mitmproxy's TlsConfig).
        self.upstream_tls = UpstreamTls()
        # Its own addon, added after this one: upstream traffic through egress proxies.
        self.egress_tunnel = EgressTunnel()
        # Companion addons, added after this one: see limits.py.
        self.client_limits = ClientLimits(lambda: self.live.current if self.live else None)
        self.read_timeout = UpstreamReadTimeout()
        # Requests started and not yet finished, per app connection: whatever way a
        # connection ends, each of them is finished (logged, counted) exactly once.
        self._unfinished: dict[str, dict[str, http.HTTPFlow]] = {}
        # Why a client's latest upstream connection could not be opened.
        self._connect_errors: dict[str, OSError] = {}
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
        # A reload reuses the token sources of unchanged definitions (same objects).
        before = list(old.token_sources.values())
        after = list(new.token_sources.values())
        for source in after:
            if not any(source is kept for kept in before):
                source.start()
        for source in before:
            if not any(source is kept for kept in after):
                task = asyncio.get_running_loop().create_task(source.aclose())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        if new.config.proxy.ca_cert_export != old.config.proxy.ca_cert_export:
            self._export_ca(new)
        modes = listener_modes(new)
        if modes != listener_modes(old):
            ctx.options.update(mode=modes)

    # -- requests ---------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if self.live is None:
            return None
        try:
            return self._route_and_authorize(flow)
        except Exception:
            # Fail closed. mitmproxy logs a hook's exception and carries on with the flow as
            # it is: unrouted, a forward-proxy request would go wherever the app asked.
            self._refuse_after_failure(flow, "routing the request")
            return None

    def _refuse_after_failure(self, flow: http.HTTPFlow, doing: str) -> None:
        logging.getLogger(__name__).exception("fhir-sidecar failed while %s", doing)
        flow.request.headers.pop("Authorization", None)
        flow.request.headers.pop("Proxy-Authorization", None)
        problem = SidecarError(ErrorKind.INTERNAL,
                               f"The sidecar failed while {doing}; nothing was sent upstream.")
        self._answer(flow, problem, close=True)

    def _route_and_authorize(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        assert self.live is not None
        snapshot = self.live.current
        request = flow.request
        request_id = request_id_from(request.headers.get(REQUEST_ID))
        refused = request_checks.refusal(request)
        conn, upstream_path = None, None
        if refused is None:
            conn, upstream_path, refused = self._route(flow, snapshot)
        state = FlowState(snapshot, conn, request_id)
        flow.metadata[FLOW_KEY] = state
        if flow.client_conn.state is connection.ConnectionState.CLOSED:
            # mitmproxy answered this request itself (a malformed Content-Length, say) and
            # closed the connection; that answer was logged and counted as it was written.
            state.logged = True
        else:
            self._started(flow, state)

        # The app's own credentials never leave the sidecar, whatever happens next.
        request.headers.pop("Authorization", None)
        request.headers.pop("Proxy-Authorization", None)
        request.headers[REQUEST_ID] = request_id
        if refused is not None:
            self._answer(flow, refused, close=True)
            return None
        if conn is None or upstream_path is None:
            self._answer(flow, failures.no_route(flow.request.pretty_host, flow.request.path))
            return None

        upstream = conn.upstream
        if conn.settings.rewrite_links:
            state.links = LinkRewriter.between(upstream, self._app_base(flow, conn))
        request.scheme, request.host, request.port = upstream.scheme, upstream.host, upstream.port
        request.path = upstream_path
        request.host_header = upstream.host_header
        if request.stream is True:
            request.stream = byte_counter(state, "bytes_in")

        if conn.basic is not None:
            request.headers["Authorization"] = conn.basic.header()
        elif conn.oauth is not None:
            source = state.snapshot.token_sources[conn.oauth]
            token = source.cached_token()
            if token is None:
                return self._add_fetched_bearer(flow, state, conn, source)
            self._set_bearer(flow, state, token)
        return None

    async def _add_fetched_bearer(self, flow: http.HTTPFlow, state: FlowState,
                                  conn: CompiledConnection, source: TokenSource) -> None:
        from sidecar.credentials.oauth import TokenUnavailable

        try:
            token = await source.token()
        except TokenUnavailable as exc:
            self._answer(flow, failures.token_unavailable(conn.name, exc,
                                                          state.snapshot.redactor))
            return
        except Exception:
            self._refuse_after_failure(flow, "fetching an access token")
            return
        self._set_bearer(flow, state, token)

    @staticmethod
    def _set_bearer(flow: http.HTTPFlow, state: FlowState, token: str) -> None:
        flow.request.headers["Authorization"] = f"Bearer {token}"
        state.bearer = token

    def _route(self, flow: http.HTTPFlow, snapshot: Snapshot
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
        mitm_compat.close_upstream(flow.client_conn, (upstream.host, upstream.port),
                                   state.connection)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None:
            return
        if state.timer is not None:
            state.timer.cancel()
        assert flow.response is not None
        flow.response.headers[REQUEST_ID] = state.request_id
        rewrite_link_headers(flow.response, state)
        if may_retry(flow, state):
            flow.response.stream = False  # keep the 401 so it can be replaced by the retry
        else:
            stream_body(flow, state)  # counts bytes out; rewrites links of large bodies

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None:
            return None
        if may_retry(flow, state):
            return self._retry_with_new_token(flow, state)
        self._finish(flow, state)
        return None

    async def _retry_with_new_token(self, flow: http.HTTPFlow, state: FlowState) -> None:
        assert state.connection is not None
        response = await retried_response(flow, state)
        if response is not None:
            self.observer.auth_retry(state.connection.name)
            flow.response = response
        self._finish(flow, state)

    def _finish(self, flow: http.HTTPFlow, state: FlowState) -> None:
        assert flow.response is not None
        rewrite_links(flow.response, state)
        if flow.response.raw_content is not None:
            state.bytes_out = len(flow.response.raw_content)
        self._log(flow, state)

    # -- upstream failures ---------------------------------------------------------------------

    def error(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None or flow.error is None:
            return
        if state.timer is not None:
            state.timer.cancel()
        # An app that went away (mitmproxy treats even a half-close so) is no upstream failure.
        app_left = not flow.client_conn.connected
        if state.error == ErrorKind.BAD_REQUEST and flow.response is not None:
            # mitmproxy refused the request as well, and writes its own page instead of ours.
            error_answers.deliver(flow, flow.response)
            self._log(flow, state)
        elif state.connection is not None and flow.response is None and not app_left:
            failure = failures.UpstreamFailure(
                timed_out=state.timed_out,
                tls=self.upstream_tls.pop_failure(flow.client_conn, flow.server_conn),
                connect_error=self._connect_errors.pop(flow.client_conn.id, None),
                reported=mitm_compat.read_flow_failure(flow.error.msg))
            problem = failures.classify(state.connection, failure)
            proxy = failures.failed_proxy(state.connection, failure)
            if proxy is not None:
                self.observer.egress_proxy_failure(proxy.name)
            elif problem.kind is ErrorKind.UPSTREAM_TLS and failure.tls is not None:
                self.observer.upstream_tls_failure(state.connection.name, failure.tls.reason)
            state.error = problem.kind.value
            error_answers.answer(flow, problem, state.request_id, close=True)
            self._log(flow, state)
        else:
            # An error already decided (a stalled upstream body) outranks how it surfaced.
            state.error = state.error or (
                "client-disconnected" if flow.response is None else "stream-aborted")
            self._log(flow, state)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        error = mitm_compat.connect_exception()
        if error is not None:
            self._connect_errors[data.client.id] = error

    def client_disconnected(self, client: connection.Client) -> None:
        self._connect_errors.pop(client.id, None)
        # The one place every connection passes at its end, also after mitmproxy failed to
        # finish a request (which then never reaches ``response`` or ``error``).
        for flow in list(self._unfinished.pop(client.id, {}).values()):
            state = flow.metadata[FLOW_KEY]
            state.error = state.error or "client-disconnected"
            self._log(flow, state)

    # -- helpers -----------------------------------------------------------------------------

    def _protocol_error_page(self, status: int, message: str) -> http.Response:
        """The answer to what mitmproxy refuses by itself, before the addon sees a flow."""
        problem = failures.protocol_error(status, mitm_compat.read_request_fault(message))
        request_id = new_request_id()
        if problem.kind is ErrorKind.BAD_REQUEST:
            self.observer.request_started(NO_CONNECTION)
            self.observer.request_finished(NO_CONNECTION, "", problem.status, 0.0,
                                           problem.kind.value)
            log_request(request_id=request_id, connection=NO_CONNECTION, status=problem.status,
                        error=problem.kind.value)
        return error_answers.error_response(problem, request_id, close=True)

    def _answer(self, flow: http.HTTPFlow, problem: SidecarError, close: bool = False) -> None:
        state = flow.metadata.get(FLOW_KEY)
        if state is None:  # CONNECT requests skip requestheaders
            assert self.live is not None
            state = FlowState(self.live.current, None, new_request_id())
            flow.metadata[FLOW_KEY] = state
            self._started(flow, state)
        state.error = problem.kind.value
        # A refused request may have framed its body in a way the sidecar cannot trust.
        error_answers.answer(flow, problem, state.request_id, close=close)

    def _started(self, flow: http.HTTPFlow, state: FlowState) -> None:
        self._unfinished.setdefault(flow.client_conn.id, {})[flow.id] = flow
        self.observer.request_started(_name(state))

    def _log(self, flow: http.HTTPFlow, state: FlowState) -> None:
        if state.logged:
            return
        state.logged = True
        open_flows = self._unfinished.get(flow.client_conn.id)
        if open_flows is not None:
            open_flows.pop(flow.id, None)
            if not open_flows:
                del self._unfinished[flow.client_conn.id]
        response = flow.response
        upstream_status = None
        if response is not None and state.error is None:
            upstream_status = response.status_code
        status = error_answers.answered_status(flow)
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
