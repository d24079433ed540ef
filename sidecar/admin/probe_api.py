"""``POST /api/connections/{name}/test`` and ``POST /api/oauth/{name}/test``: run the real
path once and answer each step (docs/admin-api.md#testing-a-connection).

A test needs the admin token (or a session and its CSRF token), like a change, but changes
nothing: it also works in read-only mode. :class:`~sidecar.admin.probe_gate.ProbeGate` limits
it to one at a time per name and one per second. The steps are in :mod:`sidecar.check.probe`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import tornado.web

from sidecar.admin.api import OBJECT_WORDS, ApiHandler
from sidecar.admin.api_models import ProbeReport
from sidecar.admin.config_store import ChangeRejected, check_name
from sidecar.admin.console import Console
from sidecar.admin.probe_gate import ProbeBusy
from sidecar.check.probe.run import probe_connection, probe_oauth
from sidecar.report.logs import log_event

TRUE_WORDS = frozenset({"1", "true", "yes"})


class _ProbeHandler(ApiHandler):
    accepts_body = False  # a body is refused with 413 before any handler runs
    kind: Literal["connections", "oauth"]
    words: str

    def admit(self) -> None:
        self.authorize(write=True, changes=False)

    async def post(self, name: str) -> None:
        if self.answered:
            return
        check_name(name, self.kind)
        snapshot = self.console.sources.live.current
        known = snapshot.connections if self.kind == "connections" else snapshot.token_sources
        if name not in known:
            raise ChangeRejected(404, f"no {self.words} named {name!r}")
        fresh = self.get_query_argument("fresh", "").lower() in TRUE_WORDS
        key = (self.kind, name)
        gate = self.console.probes
        try:
            gate.enter(key, f"{self.words} {name!r}")
        except ProbeBusy as busy:
            self.set_header("Retry-After", str(busy.retry_after))
            raise ChangeRejected(429, busy.message) from None
        try:
            if self.kind == "connections":
                report = await probe_connection(snapshot, name, fresh)
            else:
                report = await probe_oauth(snapshot, name, fresh)
        finally:
            gate.leave(key)
        failed = next((step["step"] for step in report["steps"] if step["status"] == "failed"),
                      None)
        self.console.audit(
            "test", result="success" if failed is None else "failure",
            client=self.request.remote_ip,
            via="token" if self.request.headers.get("Authorization") is not None else "session",
            object=f"{OBJECT_WORDS[self.kind]}/{name}", error=failed)
        # Who tested what and the verdict; the details stay in the answer.
        log_event("connection_test", logging.INFO,
                  f"test of {self.words} {name!r}: "
                  + (f"failed at step {failed}" if failed else "ok"),
                  kind=report["kind"], name=name, ok=failed is None, failed_step=failed,
                  fresh=fresh)
        self.reply(ProbeReport.model_validate(report).model_dump(mode="json"))


class ConnectionProbeHandler(_ProbeHandler):
    kind, words = "connections", "connection"


class OAuthProbeHandler(_ProbeHandler):
    kind, words = "oauth", "OAuth definition"


def probe_handlers(console: Console) -> list[tuple[str, type[tornado.web.RequestHandler],
                                                    dict[str, Any]]]:
    args = {"console": console}
    return [(r"/api/connections/([^/]+)/test", ConnectionProbeHandler, args),
            (r"/api/oauth/([^/]+)/test", OAuthProbeHandler, args)]
