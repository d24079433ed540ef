"""The dashboard and the ``/api`` handlers, mounted on the admin listener's application."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tornado.web

from sidecar.admin.auth import AdminAuth
from sidecar.admin.config_store import ConfigStore
from sidecar.admin.readiness import StatusSources
from sidecar.admin.views import Views


@dataclass(frozen=True)
class Console:
    """Everything the dashboard and API handlers use."""

    sources: StatusSources
    store: ConfigStore
    views: Views
    auth: AdminAuth

    @classmethod
    def create(cls, sources: StatusSources) -> Console:
        store = ConfigStore(sources.live)
        return cls(sources, store, Views(sources, store),
                   AdminAuth(lambda: sources.live.current.config.admin.token_file))

    def read_only_reason(self) -> str | None:
        return self.store.read_only_reason()


def console_handlers(console: Console) -> list[tuple[str, type[tornado.web.RequestHandler],
                                                      dict[str, Any]]]:
    from sidecar.admin.api import api_handlers
    from sidecar.admin.dashboard import dashboard_handlers

    return [*api_handlers(console), *dashboard_handlers(console)]


def mount_console(app: tornado.web.Application, sources: StatusSources) -> Console:
    """Add the dashboard and API routes to a running admin application."""
    console = Console.create(sources)
    app.add_handlers(r".*", console_handlers(console))
    return console
