"""The embedded, lean mitmproxy ``Master``: only the addons the sidecar needs.

``DumpMaster``'s default addon set costs throughput the sidecar has no use for (bench/README.md).
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from sidecar.listeners import listener_modes
from sidecar.live import LiveConfig
from sidecar.observe import ProxyObserver
from sidecar.proxy import mitm_compat
from sidecar.proxy.addon import FhirSidecar

STREAM_THRESHOLD = "1m"
GC_INTERVAL_SECONDS = 0.5


class GcHousekeeping:
    """Keeps memory bounded under connection churn.

    Every proxied connection leaves reference cycles (pyOpenSSL connections, mitmproxy layer
    trees) that hold OpenSSL's C memory until a full collection, which CPython runs rarely once
    the heap is large, so RSS climbs under connection churn (bench/README.md). Objects alive
    at start are frozen, never scanned again, so a full collection twice a second costs a few
    milliseconds.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        gc.freeze()
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            await asyncio.sleep(GC_INTERVAL_SECONDS)
            gc.collect()

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()


def build_master(live: LiveConfig, state_dir: Path, observer: ProxyObserver | None = None
                 ) -> tuple[Master, FhirSidecar]:
    state_dir.mkdir(parents=True, exist_ok=True)
    # mitmproxy's debug-only type checks of every message cost CPU on every request.
    mitm_compat.skip_message_type_checks()
    opts = options.Options(confdir=str(state_dir / "mitmproxy"))
    master = Master(opts)
    # mitmproxy looks every hook up on every addon per event, on every request.
    mitm_compat.cache_hook_dispatch(master.addons)
    sidecar = FhirSidecar(live, observer=observer)
    master.addons.add(
        core.Core(),
        disable_h2c.DisableH2C(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        sidecar,
        sidecar.upstream_tls,  # its tls_start_server must run before TlsConfig's default one
        sidecar.egress_tunnel,
        sidecar.client_limits,
        sidecar.read_timeout,
        tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(),
        GcHousekeeping(),  # no per-request hooks: costs nothing on the request path
    )
    opts.update(
        mode=listener_modes(live.current),
        stream_large_bodies=STREAM_THRESHOLD,
        connection_strategy="lazy",
        http2=False,
        # Reverse listeners keep the app's Host header, so FHIR links can be rewritten to the
        # base URL the app used; the addon sets the upstream's Host itself.
        keep_host_header=True,
    )
    return master, sidecar
