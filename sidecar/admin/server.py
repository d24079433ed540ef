"""The admin listener: one tornado ``Application`` on the sidecar's own asyncio loop.

This module serves ``/healthz``, ``/readyz`` and ``/metrics``. The dashboard and ``/api`` add
their routes to the same application (``build_app(..., extra_handlers=...)`` or
``AdminServer.app.add_handlers``), so there is one admin port and one place that binds it. Every
request first passes :class:`~sidecar.admin.guard.AdminApplication`'s ``Host`` and body checks;
health, readiness and metrics need no token, so probes and Prometheus keep working.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import tornado.web
from prometheus_client.exposition import choose_encoder
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from sidecar.admin.error_log import LoggedErrors
from sidecar.admin.guard import AdminApplication
from sidecar.admin.readiness import StatusSources, is_ready, readiness_report
from sidecar.config.errors import ConfigError, ConfigProblem
from sidecar.config.models import ListenAddress
from sidecar.credentials.jwks import JWKS_CACHE_SECONDS, key_set
from sidecar.report.logs import log_event
from sidecar.runtime.snapshot import Snapshot

TRUE_WORDS = frozenset({"1", "true", "yes"})


class _AdminHandler(LoggedErrors):
    def initialize(self, sources: StatusSources) -> None:
        self.sources = sources

    def set_default_headers(self) -> None:
        # Probes and scrapes must always see the current state, never a cached one.
        self.set_header("Cache-Control", "no-store")


class HealthHandler(_AdminHandler):
    """Alive: the event loop that also runs the proxy is answering."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("ok\n")


class ReadyHandler(_AdminHandler):
    def get(self) -> None:
        ready = is_ready(self.sources)
        self.set_status(200 if ready else 503)
        if self.get_query_argument("verbose", "").lower() in TRUE_WORDS:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(readiness_report(self.sources), indent=2) + "\n")
            return
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("ready\n" if ready else "not ready: listeners not bound yet\n")


class MetricsHandler(_AdminHandler):
    def get(self) -> None:
        # Prometheus negotiates the format (classic text or OpenMetrics) with Accept.
        encoder, content_type = choose_encoder(self.request.headers.get("Accept", ""))
        self.set_header("Content-Type", content_type)
        self.finish(encoder(self.sources.metrics.registry))


class JwksHandler(_AdminHandler):
    """The public signing keys; open like /healthz, since vendors fetch it without credentials."""

    def get(self) -> None:
        # Servers cache the set; a next key is published ahead so that caching never hurts.
        self.set_header("Cache-Control", f"max-age={JWKS_CACHE_SECONDS}")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(key_set(self.sources.live.current.signing_keys)) + "\n")


def _no_access_log(handler: tornado.web.RequestHandler) -> None:
    # Probes every few seconds would drown the request log; tornado's default would also print
    # query strings to stderr.
    return None


def build_app(sources: StatusSources,
              extra_handlers: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]
              | None = None) -> tornado.web.Application:
    args = {"sources": sources}
    handlers: list[Any] = [
        (r"/healthz", HealthHandler, args),
        (r"/readyz", ReadyHandler, args),
        (r"/metrics", MetricsHandler, args),
        (r"/\.well-known/jwks\.json", JwksHandler, args),
        *(extra_handlers or []),
    ]
    return AdminApplication(handlers, sources.live, log_function=_no_access_log)


class AdminServer:
    """Binds ``admin.listen`` and serves ``app`` on the running asyncio loop."""

    def __init__(self, app: tornado.web.Application, listen: ListenAddress | str,
                 source: str = ""):
        self.app = app
        self.listen_address = ListenAddress.parse(listen) if isinstance(listen, str) else listen
        self.listen = str(self.listen_address)
        self._source = source  # the config file, for error messages
        self._server: HTTPServer | None = None
        self.address = self.listen

    def start(self) -> None:
        host, port = self.listen_address.host, self.listen_address.port
        try:
            sockets = bind_sockets(port, address=host)
        except OSError as exc:
            raise ConfigError([ConfigProblem(self._source, "admin.listen",
                                             f"cannot listen on {host}:{port}: "
                                             f"{exc.strerror or exc}")]) from None
        bound_host, bound_port = sockets[0].getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}" if ":" not in bound_host \
            else f"[{bound_host}]:{bound_port}"
        self._server = HTTPServer(self.app)
        self._server.add_sockets(sockets)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None


def start_admin(sources: StatusSources) -> AdminServer | None:
    """Start the admin listener of the current config; None when ``admin.listen`` is null."""
    snapshot = sources.live.current
    listen = snapshot.config.admin.listen
    if listen is None:
        return None
    server = AdminServer(build_app(sources), listen, snapshot.source)
    server.start()
    sources.live.on_swap(_warn_if_moved)
    return server


def _warn_if_moved(old: Snapshot, new: Snapshot) -> None:
    # Rebinding would drop the probes' connection mid-reload; the address is read at start.
    if new.config.admin.listen != old.config.admin.listen:
        log_event("config_warning", logging.WARNING,
                  f"{new.source}: admin.listen: changed to {new.config.admin.listen}; the admin "
                  f"listener stays on {old.config.admin.listen} until the sidecar restarts")
