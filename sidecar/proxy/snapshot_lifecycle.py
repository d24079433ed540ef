"""What follows the snapshot outside single requests: three small addons.

``TokenSources`` starts the token sources of the loaded config and, on a reload, starts the new
ones and closes the dropped ones (a reload keeps the very objects of unchanged definitions).
``CaExport`` copies the CA that signs intercepted connections to ``proxy.ca_cert_export``.
``Listeners`` moves mitmproxy's listeners (``mode``) to the ones the config defines.
"""

from __future__ import annotations

import asyncio
import logging
import os

from mitmproxy import certs, ctx

from sidecar.proxy.config_source import SidecarConfig
from sidecar.report.logs import log_event
from sidecar.request.intercept import CaExportError, ca_certificate, export_ca_certificate
from sidecar.runtime.listeners import listener_modes
from sidecar.runtime.snapshot import Snapshot


class TokenSources:
    def __init__(self, config: SidecarConfig) -> None:
        self._config = config
        self._closing: set[asyncio.Task[None]] = set()
        config.on_swap(self._swapped)

    def running(self) -> None:
        current = self._config.current()
        if current is not None:
            for source in current.token_sources.values():
                source.start()

    def _swapped(self, old: Snapshot, new: Snapshot) -> None:
        before = list(old.token_sources.values())
        after = list(new.token_sources.values())
        for source in after:
            if not any(source is kept for kept in before):
                source.start()
        for source in before:
            if not any(source is kept for kept in after):
                task = asyncio.get_running_loop().create_task(source.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)


class CaExport:
    def __init__(self, config: SidecarConfig) -> None:
        self._config = config
        config.on_swap(self._swapped)

    def running(self) -> None:
        current = self._config.current()
        if current is not None:
            _export_ca(current)

    def _swapped(self, old: Snapshot, new: Snapshot) -> None:
        if new.config.proxy.ca_cert_export != old.config.proxy.ca_cert_export:
            _export_ca(new)


def _export_ca(snapshot: Snapshot) -> None:
    destination = snapshot.config.proxy.ca_cert_export
    if destination is None:
        return
    try:
        confdir = os.path.expanduser(ctx.options.confdir)
        if not ca_certificate(confdir).exists():
            # This runs before TlsConfig's ``running``, which would create the CA: create it
            # the same way now (TlsConfig then loads these files).
            passphrase = ctx.options.cert_passphrase
            certs.CertStore.from_store(confdir, "mitmproxy", ctx.options.key_size,
                                       passphrase.encode() if passphrase else None)
        if export_ca_certificate(confdir, destination):
            log_event("ca_exported", logging.INFO, f"CA certificate written to {destination}")
    except CaExportError as exc:
        log_event("ca_export_failed", logging.ERROR, str(exc))


class Listeners:
    def __init__(self, config: SidecarConfig) -> None:
        self._config = config
        # Set by the runner once mitmproxy has bound every listener (``/readyz``).
        self.bound = False
        # Set by the runner when shutdown closes the listeners: a reload after that (an admin
        # API change during the drain) must not open them again.
        self.closed = False
        config.on_swap(self._swapped)

    def running(self) -> None:
        current = self._config.current()
        if current is not None and self._config.from_option:
            # Under mitmdump, command-line defaults (mode=regular) are applied after scripts
            # configure, so the config's listeners are set once everything is running.
            ctx.options.update(mode=listener_modes(current))

    def _swapped(self, old: Snapshot, new: Snapshot) -> None:
        if self.closed:
            return
        modes = listener_modes(new)
        if modes != listener_modes(old):
            ctx.options.update(mode=modes)
