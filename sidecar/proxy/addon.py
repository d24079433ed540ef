"""fhir-sidecar as mitmproxy addons: one small addon per concern, in the order they run.

A request's path through them (each hook is named after the mitmproxy event it handles):

- ``Routing`` (``request_routing.py``) checks and routes the request, or refuses it;
- ``RequestSpans`` (``request_spans.py``) traces the request when tracing is on;
- ``Credentials`` (``credential_injection.py``) adds Basic or a bearer token, and retries a
  ``401`` to a bearer token once;
- ``UpstreamTls`` (``upstream_tls.py``) applies the connection's TLS policy, ``EgressTunnel``
  (``egress_tunnel.py``) its egress proxy;
- ``ClientLimits``, ``UpstreamDeadline`` and ``UpstreamReadTimeout`` (``limits.py``) bound
  what an app connection and a slow upstream may cost;
- ``LinkRewriting`` (``link_rewriting.py``) points FHIR links back at the sidecar;
- ``ErrorAnswers`` (``error_answers.py``) answers what failed;
- ``RequestLog`` (``request_log.py``) finishes every request once: log line, metrics, and
  the one count of requests in flight;
- ``AuditRequests`` (``audit_requests.py``) writes the request's audit record;
- ``RetiredUpstreams`` (``upstream_retirement.py``) closes the upstream connections a reload
  retired, once no request uses them.

Besides requests: ``SidecarConfig`` (``config_source.py``) holds the current snapshot, and
``Listeners``, ``TokenSources`` and ``CaExport`` (``snapshot_lifecycle.py``) follow it. The
logic lives in plain modules; the addons translate events into calls on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.audit.trail import AuditTrail
from sidecar.proxy.audit_requests import AuditRequests
from sidecar.proxy.config_source import SidecarConfig
from sidecar.proxy.credential_injection import Credentials
from sidecar.proxy.egress_tunnel import EgressTunnel
from sidecar.proxy.error_answers import ErrorAnswers
from sidecar.proxy.limits import ClientLimits, UpstreamDeadline, UpstreamReadTimeout
from sidecar.proxy.link_rewriting import LinkRewriting
from sidecar.proxy.request_log import RequestLog
from sidecar.proxy.request_routing import Routing
from sidecar.proxy.request_spans import RequestSpans, TraceStart
from sidecar.proxy.snapshot_lifecycle import CaExport, Listeners, TokenSources
from sidecar.proxy.upstream_retirement import RetiredUpstreams
from sidecar.proxy.upstream_tls import UpstreamTls
from sidecar.report.observe import NullObserver, ProxyObserver
from sidecar.runtime.live import LiveConfig
from sidecar.tracing.setup import Tracing


@dataclass(frozen=True)
class SidecarAddons:
    config: SidecarConfig
    listeners: Listeners
    chain: list[object]  # to add to a master in this order, before mitmproxy's TlsConfig


def sidecar_addons(live: LiveConfig | None = None, observer: ProxyObserver | None = None,
                   audit: AuditTrail | None = None, tracing: Tracing | None = None
                   ) -> SidecarAddons:
    """The addons, wired to one another. ``live`` is the embedded runner's config; without
    it, the ``sidecar_config`` option names the file (``mitmdump -s``). ``audit``: the
    runner's audit trail (``fhir-sidecar run`` only: it needs the state directory)."""
    observer = observer or NullObserver()
    config = SidecarConfig(live)
    listeners = Listeners(config)
    request_log = RequestLog(observer)
    upstream_tls = UpstreamTls()
    chain: list[object] = [
        config,
        listeners,
        TokenSources(config),
        CaExport(config),  # before TlsConfig's ``running``, which would create the CA
        TraceStart(lambda: tracing),  # before routing: a refusal names its trace too
        Routing(config, request_log),
        RequestSpans(request_log),  # before a token fetch's child span
        Credentials(observer),
        upstream_tls,  # its tls_start_server must run before TlsConfig's default one
        EgressTunnel(),
        ClientLimits(config.current),
        UpstreamDeadline(),
        UpstreamReadTimeout(),
        LinkRewriting(),
        ErrorAnswers(upstream_tls, observer, request_log),
        request_log,  # it logs what the app got
        AuditRequests(lambda: audit, request_log),  # after the request log finished it
        RetiredUpstreams(config, request_log),  # after the request log has finished a request
    ]
    return SidecarAddons(config, listeners, chain)
