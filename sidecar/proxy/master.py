"""The embedded, lean mitmproxy ``Master``: only the addons the sidecar needs.

``DumpMaster``'s default addon set costs throughput the sidecar has no use for (bench/README.md).
The speed tweaks (``speedups.py``) are an option of this master: they change the whole
process, so only the sidecar's own process gets them, never a user's ``mitmdump``.
"""

from __future__ import annotations

from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from sidecar.audit.trail import AuditTrail
from sidecar.proxy import speedups as speed_tweaks
from sidecar.proxy.addon import SidecarAddons, sidecar_addons
from sidecar.report.observe import ProxyObserver
from sidecar.runtime.listeners import listener_modes
from sidecar.runtime.live import LiveConfig
from sidecar.tracing.setup import Tracing

STREAM_THRESHOLD = "1m"


def build_master(live: LiveConfig, state_dir: Path, observer: ProxyObserver | None = None,
                 *, speedups: bool = True, audit: AuditTrail | None = None,
                 tracing: Tracing | None = None) -> tuple[Master, SidecarAddons]:
    state_dir.mkdir(parents=True, exist_ok=True)
    opts = options.Options(confdir=str(state_dir / "mitmproxy"))
    master = Master(opts)
    last = speed_tweaks.apply(master) if speedups else []
    sidecar = sidecar_addons(live, observer, audit, tracing)
    master.addons.add(
        core.Core(),
        # Not mitmproxy's DisableH2C: it kills an HTTP/2 preface (PRI *) without an answer;
        # the sidecar refuses it with a 400 and never forwards Upgrade (request_checks.py,
        # request_routing.py).
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        *sidecar.chain,
        tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(),
        *last,
    )
    opts.update(
        mode=listener_modes(live.current),
        stream_large_bodies=STREAM_THRESHOLD,
        connection_strategy="lazy",
        http2=False,
        # Listeners are TCP only and no upstream leg is QUIC: an HTTP/3 leg would bypass the
        # connection's TLS policy (docs/architecture.md, "Listeners are TCP only").
        http3=False,
        # Reverse listeners keep the app's Host header, so FHIR links can be rewritten to the
        # base URL the app used; the addon sets the upstream's Host itself.
        keep_host_header=True,
    )
    return master, sidecar
