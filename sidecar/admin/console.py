"""The dashboard and the ``/api`` handlers, mounted on the admin listener's application."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.web

from sidecar.admin.auth import AdminAuth
from sidecar.admin.config_store import ConfigStore
from sidecar.admin.host_check import is_loopback_listen
from sidecar.admin.readiness import StatusSources
from sidecar.admin.views import Views


@dataclass(frozen=True)
class Console:
    """Everything the dashboard and API handlers use."""

    sources: StatusSources
    store: ConfigStore
    views: Views
    auth: AdminAuth
    # Off loopback, other machines (other pods) can reach the listener: then reading the
    # configuration needs the admin token too.
    reads_need_token: bool

    @classmethod
    def create(cls, sources: StatusSources, secrets_dir: Path, listen_host: str) -> Console:
        store = ConfigStore(sources.live, secrets_dir)
        return cls(sources, store, Views(sources, store),
                   AdminAuth(lambda: sources.live.current.config.admin.token_file),
                   not is_loopback_listen(listen_host))

    def read_only_reason(self) -> str | None:
        return self.store.read_only_reason()


def console_handlers(console: Console) -> list[tuple[str, type[tornado.web.RequestHandler],
                                                      dict[str, Any]]]:
    from sidecar.admin.api import api_handlers
    from sidecar.admin.dashboard import dashboard_handlers

    return [*api_handlers(console), *dashboard_handlers(console)]


def mount_console(app: tornado.web.Application, sources: StatusSources, secrets_dir: Path,
                  listen_host: str) -> Console:
    """Add the dashboard and API routes to a running admin application.

    ``secrets_dir`` is the sidecar's own directory for the secrets and CA bundles given to
    the API (``<state dir>/secrets``); ``listen_host`` the host the admin listener is bound to.
    """
    console = Console.create(sources, secrets_dir, listen_host)
    app.add_handlers(r".*", console_handlers(console))
    return console
