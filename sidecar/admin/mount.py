"""The dashboard and the ``/api`` handlers, mounted on the admin listener's application."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tornado.web

from sidecar.admin.api import api_handlers
from sidecar.admin.console import Console
from sidecar.admin.dashboard import dashboard_handlers
from sidecar.admin.probe_api import probe_handlers
from sidecar.admin.readiness import StatusSources


def console_handlers(console: Console) -> list[tuple[str, type[tornado.web.RequestHandler],
                                                      dict[str, Any]]]:
    # The tests' routes go first: /api/... ends in a catch-all for unknown resources.
    return [*probe_handlers(console), *api_handlers(console), *dashboard_handlers(console)]


def mount_console(app: tornado.web.Application, sources: StatusSources, secrets_dir: Path,
                  listen_host: str) -> Console:
    """Add the dashboard and API routes to a running admin application.

    ``secrets_dir`` is the sidecar's own directory for the secrets and CA bundles given to
    the API (``<state dir>/secrets``); ``listen_host`` the host the admin listener is bound to.
    """
    console = Console.create(sources, secrets_dir, listen_host)
    app.add_handlers(r".*", console_handlers(console))
    return console
