"""The addon the others read the current snapshot from.

The embedded master (``fhir-sidecar run``) hands it the runner's ``LiveConfig``; loaded into a
user's own mitmproxy (``mitmdump -s addons/fhir_sidecar.py``) it builds one from the
``sidecar_config`` option. Addons that act on a reload subscribe with :meth:`on_swap`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from sidecar.config.errors import ConfigError
from sidecar.report.logs import log_event
from sidecar.runtime.live import LiveConfig
from sidecar.runtime.snapshot import Snapshot

SwapCallback = Callable[[Snapshot, Snapshot], None]


class SidecarConfig:
    def __init__(self, live: LiveConfig | None = None) -> None:
        self.live = live
        # True when the config came from the option: the sidecar then also sets the
        # listeners and the mitmproxy options the embedded master sets itself.
        self.from_option = False
        self._subscribers: list[SwapCallback] = []

    def current(self) -> Snapshot | None:
        return self.live.current if self.live is not None else None

    def on_swap(self, callback: SwapCallback) -> None:
        """Call ``callback(old, new)`` after every reload, whichever config is loaded."""
        self._subscribers.append(callback)
        if self.live is not None:
            self.live.on_swap(callback)

    def load(self, loader: Loader) -> None:
        loader.add_option("sidecar_config", str, "",
                          "fhir-sidecar config file (YAML). Sets the listeners it defines.")

    def configure(self, updated: set[str]) -> None:
        if "save_stream_file" in updated and getattr(ctx.options, "save_stream_file", None):
            # mitmproxy saves each request as it went upstream, the credentials we added
            # included; the sidecar cannot take them out first (mitmproxy's own addons run
            # before a script's).
            log_event("saved_flows_hold_credentials", logging.WARNING,
                      "flows saved with -w / save_stream_file include the Authorization "
                      "header the sidecar added: keep that file as secret as the credentials")
        if "sidecar_config" not in updated or not ctx.options.sidecar_config:
            return
        try:
            self.live = LiveConfig(ctx.options.sidecar_config)
        except ConfigError as exc:
            raise exceptions.OptionsError(str(exc)) from None
        for callback in self._subscribers:
            self.live.on_swap(callback)
        self.from_option = True
        if not ctx.options.stream_large_bodies:
            ctx.options.update(stream_large_bodies="1m")
        # Connect upstream only once a request has been routed to a connection.
        ctx.options.update(connection_strategy="lazy")
        # TCP only: an HTTP/3 leg would bypass the connection's TLS policy.
        ctx.options.update(http3=False)
        # Keep the app's Host on reverse listeners: links are rewritten to the URL it used.
        ctx.options.update(keep_host_header=True)
