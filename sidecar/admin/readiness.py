"""What ``/readyz`` answers: ready or not, and (verbose) the state of every connection.

Ready means "config loaded, every listener bound". A failing token endpoint or an
upstream with a bad certificate does not make the sidecar unready (a still-valid token can
serve; other connections work); the verbose report shows them instead.

The report is built from the live snapshot, the metrics' status board and the token sources'
``status()``: configured names, times, fixed error words and the token endpoint's redacted
answer. It never contains a secret, a token, a header value or a request's query string.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.audit.trail import AuditTrail
from sidecar.observe.health import Health, HealthInputs, TokenState, connection_health
from sidecar.observe.metrics import ConnectionActivity, SidecarMetrics, TlsFailureRecord
from sidecar.runtime.live import LiveConfig
from sidecar.tls.policy import client_cert_expiry, earliest_expiry


@dataclass(frozen=True)
class ListenerState:
    """Whether the proxy listeners are up; ``missing`` lists addresses not (yet) bound."""

    bound: bool
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class StatusSources:
    """Everything the admin endpoints read; nothing in it can change the config."""

    live: LiveConfig
    metrics: SidecarMetrics
    listeners: Callable[[], ListenerState]
    audit: AuditTrail | None = None  # logins, changes and connection tests are its records


def is_ready(sources: StatusSources) -> bool:
    # The config is loaded by construction: the admin server starts only after it was.
    return sources.listeners().bound


def connection_health_now(activity: ConnectionActivity, now: float, *,
                          requests_recent: Mapping[str, int], errors_recent: Mapping[str, int],
                          token: TokenState | None, ca_expiry: dt.datetime | None,
                          cert_expiry: dt.datetime | None) -> Health:
    """The connection's status light as of ``now``, from what the caller has already read
    (its counts, its token's state, its certificates' expiry). One mapping for
    ``/readyz?verbose=1``, the API and the dashboard, so they agree."""
    return connection_health(HealthInputs(
        requests_recent=sum(requests_recent.values()), errors_recent=errors_recent,
        last_error=activity.last_error, last_error_at=activity.last_error_at,
        last_answer_at=activity.last_upstream_answer_at, token=token,
        upstream_recent=sum(activity.upstream_recent.totals().values()),
        rejections_recent=activity.rejections_recent.totals(),
        last_rejection_at=activity.last_rejection_at,
        ca_bundle_expires_at=ca_expiry.timestamp() if ca_expiry else None,
        client_cert_expires_at=cert_expiry.timestamp() if cert_expiry else None), now)


def readiness_report(sources: StatusSources) -> dict[str, Any]:
    live = sources.live
    snapshot = live.current
    listeners = sources.listeners()
    last = live.last_reload
    return {
        "ready": listeners.bound,
        "config": {
            "loaded": True,
            "generation": snapshot.generation,
            "last_success_at": _iso(live.last_success_at),
            "last_reload": {"result": "success" if last.ok else "failure",
                            "at": _iso(last.at), "problems": list(last.problems)},
        },
        "listeners": {"bound": listeners.bound, "missing": list(listeners.missing)},
        "connections": _connections(sources),
        "oauth": _oauth(sources),
    }


def _connections(sources: StatusSources) -> dict[str, Any]:
    snapshot = sources.live.current
    board = sources.metrics.board
    found: dict[str, Any] = {}
    now = time.time()
    for name, conn in snapshot.connections.items():
        activity = board.connection(name)
        expires = earliest_expiry(conn.tls) if conn.tls is not None else None
        source = snapshot.token_sources.get(conn.oauth) if conn.oauth is not None else None
        status = source.status() if source is not None else None
        token = None if conn.oauth is None else TokenState(
            usable=status is not None and status.usable,
            last_attempt_failed=status is not None and bool(status.last_error))
        requests_recent = activity.recent.totals()
        health = connection_health_now(
            activity, now, requests_recent=requests_recent,
            errors_recent=activity.errors_recent.totals(), token=token, ca_expiry=expires,
            cert_expiry=client_cert_expiry(conn.tls) if conn.tls is not None else None)
        found[name] = {
            "health": {"light": health.light, "reason": health.reason},
            "auth": conn.auth_kind,
            "oauth": conn.oauth,
            "tls": {
                "verify": conn.tls.verify if conn.tls is not None else None,
                "ok": activity.tls_ok,  # null until a request has been sent
                "last_failure": _tls_failure(activity.last_tls_failure),
                "ca_bundle_expires_at": _iso_dt(expires),
            },
            "token_valid_until": _iso_dt(status.valid_until) if status is not None else None,
            "requests_recent": requests_recent,
            "in_flight": activity.in_flight,
            "last_status": activity.last_status,
            "last_error": None if activity.last_error is None else {
                "error": activity.last_error, "at": _iso(activity.last_error_at)},
        }
    return found


def _oauth(sources: StatusSources) -> dict[str, Any]:
    snapshot = sources.live.current
    board = sources.metrics.board
    found: dict[str, Any] = {}
    for name, source in snapshot.token_sources.items():
        status = source.status()
        activity = board.token(name)
        found[name] = {
            "token_valid_until": _iso_dt(status.valid_until),
            "last_refresh": _iso_dt(status.last_refresh),
            "last_result": activity.last_result,
            "last_error": None if status.last_error is None
            else snapshot.redactor.scrub(status.last_error),
            "scopes": list(status.scopes),
            "used_by": sorted(c.name for c in snapshot.connections.values() if c.oauth == name),
        }
    return found


def _tls_failure(record: TlsFailureRecord | None) -> dict[str, Any] | None:
    return None if record is None else {"reason": record.reason, "at": _iso(record.at)}


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return _iso_dt(dt.datetime.fromtimestamp(epoch, dt.UTC))


def _iso_dt(moment: dt.datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
