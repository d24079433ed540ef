"""Noticing that the config, or any file it names, changed: no signal, no restart needed.

Polling file signatures catches both ways files change in practice: a file rewritten in place
(size, mtime or inode change) and a Kubernetes Secret/ConfigMap volume update, where the
``..data`` symlink is swapped atomically (the resolved path changes). Renames and deletions
change the signature too. A change is acted on once two polls agree, so a file caught halfway
through a write is not loaded.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sidecar.config.models import OAuthDefinition, SidecarConfig, TlsSettings

Signature = tuple[str, int, int, int] | None
POLL_SECONDS = 0.5


def referenced_files(config: SidecarConfig) -> set[Path]:
    """Every file the config reads: secrets, keys, CA bundles, client certificates."""
    found: set[Path | None] = {config.admin.token_file}
    for basic in config.basic_auth.values():
        found.add(basic.password_file)
    for oauth in config.oauth.values():
        found |= _oauth_files(oauth)
    for conn in config.connections.values():
        found |= _tls_files(conn.tls)
    for caller in config.callers.values():
        found |= {caller.jwks_file} | _tls_files(caller.tls)
    return {p for p in found if p is not None}


def _oauth_files(oauth: OAuthDefinition) -> set[Path | None]:
    return {oauth.client_secret_file, oauth.private_key_file, oauth.next_private_key_file,
            oauth.previous_private_key_file} | _tls_files(oauth.tls)


def _tls_files(tls: TlsSettings) -> set[Path | None]:
    return {tls.ca_bundle, tls.client_cert, tls.client_key}


def signature(path: Path) -> Signature:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_ino, st.st_mtime_ns, st.st_size)


class FileWatcher:
    def __init__(self, files: Callable[[], Iterable[Path]], on_change: Callable[[], Any],
                 interval: float = POLL_SECONDS):
        self._files = files
        self._on_change = on_change
        self._interval = interval
        self._seen = self._snapshot()
        self._pending: dict[Path, Signature] | None = None

    def _snapshot(self) -> dict[Path, Signature]:
        return {path: signature(path) for path in self._files()}

    def poll(self) -> bool:
        """Check once; call ``on_change`` once a change has been stable for one interval."""
        current = self._snapshot()
        if current == self._seen:
            self._pending = None
            return False
        if current != self._pending:  # new, or still being written: look again next time
            self._pending = current
            return False
        self._pending = None
        self._on_change()
        # The reload may have changed which files are referenced.
        self._seen = self._snapshot()
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.poll()
