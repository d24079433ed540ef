"""Prometheus metrics (docs/metrics.md) and a small in-memory status board, fed by the observers.

:class:`SidecarMetrics` implements the proxy's
:class:`~sidecar.report.observe.ProxyObserver`, the token sources' ``TokenObserver`` and a
reload observer (:meth:`SidecarMetrics.attach`). It keeps its own :class:`CollectorRegistry`,
so nothing else in the process (or a second instance in a test) can add series to what
``/metrics`` shows.

Every label value is a configured name or one of a few fixed words: the request method is client
input, so anything outside the standard methods is counted as ``OTHER`` (bounded cardinality).
Everything runs on the sidecar's single event loop, so the board needs no locking.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.observe.trends import MinuteRing
from sidecar.report.observe import NO_CONNECTION, TokenResult
from sidecar.request.errors import CALLER_REJECTIONS, ErrorKind
from sidecar.tls.policy import client_cert_expiry, earliest_expiry
from sidecar.tls.verdict import TLS_FAILURE_REASONS

if TYPE_CHECKING:
    from sidecar.runtime.live import LiveConfig, ReloadOutcome
    from sidecar.runtime.snapshot import Snapshot

# The contract (docs/metrics.md) lists exact metric names; prometheus-client would add a `*_created`
# series beside every counter and histogram. The sidecar process owns the library's settings.
disable_created_metrics()

PREFIX = "fhir_sidecar"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE",
                     "CONNECT"})
TOKEN_RESULTS = frozenset(get_args(TokenResult))
TLS_REASONS = TLS_FAILURE_REASONS
NO_STATUS = "none"  # status_class of a request that ended without any response
# Exported at 0 for every configured connection from the moment it is loaded, so that a rate()
# or an alert sees the first request, retry or failure as a change (a series that appears
# with its first increment hides that increment). Methods: the FHIR RESTful interactions;
# other methods and status classes appear on first use.
PRESET_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
PRESET_STATUS_CLASSES = ("2xx", "4xx", "5xx")
# The error words a routed request can end with (failures before routing count under "-").
CONNECTION_ERRORS = (*(kind.value for kind in (ErrorKind.TOKEN_UNAVAILABLE, ErrorKind.UPSTREAM_TLS,
                                              ErrorKind.UPSTREAM_UNREACHABLE,
                                              ErrorKind.UPSTREAM_TIMEOUT)),
                     "client-disconnected", "stream-aborted")
AUDIT_RESULTS = {"file": ("written", "failed"),
                 "fhir": ("written", "sent", "rejected", "full", "failed")}
# X-Sidecar-Error value -> the reason label of fhir_sidecar_caller_rejections_total.
CALLER_REJECTION_REASONS = {kind.value: reason for kind, reason in CALLER_REJECTIONS.items()}
# The FHIR server's answers that refuse the credentials (fhir_sidecar_upstream_rejections_total).
REJECTIONS = (401, 403)
# FHIR searches can take tens of seconds; the default buckets stop at 10 s.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Token requests wait at most the definition's request timeout (10 s).
TOKEN_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def status_class(status: int | None) -> str:
    if status is None or not 100 <= status <= 599:
        return NO_STATUS
    return f"{status // 100}xx"


def method_label(method: str) -> str:
    upper = method.upper()
    return upper if upper in METHODS else "OTHER"


# -- status board ---------------------------------------------------------------------------

class RecentCounts:
    """Counts per key over a sliding window, in fixed buckets (memory does not grow with load)."""

    def __init__(self, window_seconds: float = 300.0, buckets: int = 30,
                 clock: Callable[[], float] = time.monotonic):
        self.window_seconds = window_seconds
        self._width = window_seconds / buckets
        self._clock = clock
        self._buckets: deque[tuple[int, Tally[str]]] = deque()

    def add(self, key: str) -> None:
        index = self._prune()
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append((index, Tally()))
        self._buckets[-1][1][key] += 1

    def totals(self) -> dict[str, int]:
        self._prune()
        total: Tally[str] = Tally()
        for _, tally in self._buckets:
            total.update(tally)
        return dict(total)

    def _prune(self) -> int:
        index = int(self._clock() // self._width)
        oldest = index - int(self.window_seconds // self._width) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()
        return index


@dataclass(frozen=True)
class TlsFailureRecord:
    connection: str
    reason: str
    at: float  # epoch seconds


@dataclass
class ConnectionActivity:
    """What one connection has been doing; times are epoch seconds."""

    name: str
    recent: RecentCounts = field(default_factory=RecentCounts)  # by status class
    errors_recent: RecentCounts = field(default_factory=RecentCounts)  # by error word
    # What the FHIR server itself answered (the sidecar's own answers are not in it): by status
    # class, and its 401s and 403s by status.
    upstream_recent: RecentCounts = field(default_factory=RecentCounts)
    rejections_recent: RecentCounts = field(default_factory=RecentCounts)
    last_rejection_at: float | None = None
    trend: MinuteRing = field(default_factory=MinuteRing)  # the last hour, per minute
    requests: int = 0
    in_flight: int = 0
    last_request_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None  # a sidecar error kind (docs/errors.md) or a client-side abort
    last_error_at: float | None = None
    last_tls_failure: TlsFailureRecord | None = None
    last_upstream_answer_at: float | None = None  # the upstream answered: TLS worked

    @property
    def tls_ok(self) -> bool | None:
        """None until the connection has been tried; False while its last handshake failed."""
        failure = self.last_tls_failure
        answered = self.last_upstream_answer_at
        if failure is None:
            return None if answered is None else True
        return answered is not None and answered > failure.at


@dataclass
class TokenActivity:
    definition: str
    last_result: str | None = None
    last_result_at: float | None = None
    expires_at: float | None = None


class StatusBoard:
    """Recent activity per connection and per OAuth definition, for health pages and dashboards.

    Holds configured names, status codes and fixed error words only: never a URL, header or body.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._connections: dict[str, ConnectionActivity] = {}
        self._tokens: dict[str, TokenActivity] = {}
        self.last_tls_failure: TlsFailureRecord | None = None

    def connection(self, name: str) -> ConnectionActivity:
        found = self._connections.get(name)
        if found is None:
            found = self._connections[name] = ConnectionActivity(name)
        return found

    def connections(self) -> dict[str, ConnectionActivity]:
        return dict(self._connections)

    def token(self, definition: str) -> TokenActivity:
        found = self._tokens.get(definition)
        if found is None:
            found = self._tokens[definition] = TokenActivity(definition)
        return found

    def tokens(self) -> dict[str, TokenActivity]:
        return dict(self._tokens)

    def keep_only(self, connections: Iterable[str], definitions: Iterable[str]) -> None:
        """Forget what was removed from the config ("-" counts unrouted requests: kept)."""
        keep = {*connections, NO_CONNECTION}
        # A removed connection's requests still in flight keep their count until they finish;
        # its history goes at once, so a connection added again by that name starts fresh.
        self._connections = {k: v if k in keep else _fresh(v)
                             for k, v in self._connections.items() if k in keep or v.in_flight}
        wanted = set(definitions)
        self._tokens = {k: v for k, v in self._tokens.items() if k in wanted}

    # -- recording (called by SidecarMetrics) --

    def in_flight(self) -> dict[str, int]:
        """Requests being handled now, per connection: the one count of them in the process."""
        return {name: a.in_flight for name, a in self._connections.items()}

    def started(self, connection: str) -> None:
        self.connection(connection).in_flight += 1

    def finished(self, connection: str, status: int | None, error: str | None,
                 upstream_status: int | None = None) -> None:
        """Count a finished request: ``status`` is what the app got, ``upstream_status`` what
        the FHIR server answered (None when the request never got an answer from it)."""
        now = self._clock()
        activity = self.connection(connection)
        activity.in_flight -= 1
        activity.requests += 1
        activity.recent.add(status_class(status))
        activity.trend.add(now, error is not None)
        activity.last_request_at = now
        activity.last_status = status
        if error is not None:
            activity.errors_recent.add(error)
            activity.last_error, activity.last_error_at = error, now
        elif status is not None:
            activity.last_upstream_answer_at = now
        if upstream_status is not None:
            activity.upstream_recent.add(status_class(upstream_status))
            if upstream_status in REJECTIONS:
                activity.rejections_recent.add(str(upstream_status))
                activity.last_rejection_at = now

    def tls_failed(self, connection: str, reason: str) -> None:
        record = TlsFailureRecord(connection, reason, self._clock())
        self.connection(connection).last_tls_failure = record
        self.last_tls_failure = record

    def token_result(self, definition: str, result: str) -> None:
        activity = self.token(definition)
        activity.last_result, activity.last_result_at = result, self._clock()

    def token_expiry(self, definition: str, expires_at: float) -> None:
        self.token(definition).expires_at = expires_at


def _fresh(activity: ConnectionActivity) -> ConnectionActivity:
    """Only the in-flight count of a removed connection: nothing of its past."""
    return ConnectionActivity(activity.name, in_flight=activity.in_flight)


# -- Prometheus ------------------------------------------------------------------------------

class _InFlightCollector(Collector):
    """``requests_in_flight``, read from the status board at scrape time (no second count)."""

    def __init__(self, board: StatusBoard):
        self._board = board

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(f"{PREFIX}_requests_in_flight", "Requests being handled now.",
                                   labels=["connection"])
        for connection, count in sorted(self._board.in_flight().items()):
            family.add_metric([connection], count)
        yield family


class SidecarMetrics:
    """The sidecar's metrics (docs/metrics.md) on a private registry, with its status board."""

    def __init__(self, version: str = __version__, clock: Callable[[], float] = time.time):
        self.registry = CollectorRegistry(auto_describe=True)
        self.board = StatusBoard(clock)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Requests answered, by connection, "
                                "method and status class ('-': matched no connection).",
                                ["connection", "method", "status_class"], registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                  "Time from request headers to the end of the response.",
                                  ["connection"], buckets=DURATION_BUCKETS, registry=r)
        r.register(_InFlightCollector(self.board))
        self.errors = Counter(f"{PREFIX}_request_errors", "Requests that ended in an error, "
                              "by connection and error word (an X-Sidecar-Error value, "
                              "'client-disconnected' or 'stream-aborted').",
                              ["connection", "error"], registry=r)
        self.caller_rejections = Counter(
            f"{PREFIX}_caller_rejections", "Requests refused because of who sent them, not "
            "because of the connection: misdirected (a Host the listener does not answer), "
            "origin (a browser origin not allowed), unauthenticated / forbidden (the workload "
            "token of allowed_callers).", ["connection", "reason"], registry=r)
        self.trace_export_count = Counter(
            f"{PREFIX}_trace_exports", "Spans handed to the trace exporter, by result: exported "
            "(the collector took them), dropped (the queue was full), failed (the collector "
            "could not be reached or refused them).", ["result"], registry=r)
        for result in ("exported", "dropped", "failed"):
            self.trace_export_count.labels(result)
        self.audit_records = Counter(
            f"{PREFIX}_audit_records", "Audit records, by sink (file, fhir) and result: written "
            "(kept on disk), sent (stored by the audit repository), rejected (refused by it with "
            "4xx, moved aside), full (the queue was full) or failed (could not be kept).",
            ["sink", "result"], registry=r)
        self.audit_queue_bytes = Gauge(
            f"{PREFIX}_audit_queue_bytes", "Bytes of audit records waiting on disk for the "
            "audit repository.", registry=r)
        self.token_requests = Counter(f"{PREFIX}_token_requests", "Token endpoint requests, "
                                      "by OAuth definition and result.",
                                      ["definition", "result"], registry=r)
        self.token_duration = Histogram(
            f"{PREFIX}_token_request_duration_seconds", "Time a token endpoint request took "
            "(discovery excluded), by OAuth definition, whatever its result.", ["definition"],
            buckets=TOKEN_DURATION_BUCKETS, registry=r)
        self.upstream_rejections = Counter(
            f"{PREFIX}_upstream_rejections", "Requests the FHIR server answered 401 or 403 "
            "(after the one retry with a new token), by connection and status.",
            ["connection", "status"], registry=r)
        self.upstream_responses = Counter(
            f"{PREFIX}_upstream_responses", "Responses of the FHIR server itself (not the "
            "sidecar's own answers), by connection and status class.",
            ["connection", "status_class"], registry=r)
        self.token_expiry_at = Gauge(f"{PREFIX}_token_expiry_timestamp_seconds",
                                     "When the cached access token expires (epoch seconds).",
                                     ["definition"], registry=r)
        self.auth_retries = Counter(f"{PREFIX}_auth_retries", "Requests retried once with a new "
                                    "token after an upstream 401.", ["connection"], registry=r)
        self.tls_failures = Counter(f"{PREFIX}_upstream_tls_failures", "Upstream TLS handshakes "
                                    "that failed, by reason.", ["connection", "reason"],
                                    registry=r)
        self.egress_proxy_failures = Counter(
            f"{PREFIX}_egress_proxy_failures", "Upstream requests that failed at their egress "
            "proxy (unreachable, refused the tunnel, or its TLS failed), by proxy.", ["proxy"],
            registry=r)
        self.ca_expiry = Gauge(f"{PREFIX}_ca_bundle_expiry_timestamp_seconds",
                               "Earliest expiry among the certificates of the connection's CA "
                               "bundle (epoch seconds; verify: custom only).",
                               ["connection"], registry=r)
        self.client_cert_expiry = Gauge(f"{PREFIX}_client_cert_expiry_timestamp_seconds",
                                        "When the connection's TLS client certificate expires "
                                        "(epoch seconds; connections with client_cert only).",
                                        ["connection"], registry=r)
        self.oauth_client_cert_expiry = Gauge(
            f"{PREFIX}_oauth_client_cert_expiry_timestamp_seconds",
            "When the TLS client certificate an OAuth definition presents to its token endpoint "
            "expires (epoch seconds; definitions with tls.client_cert only).",
            ["definition"], registry=r)
        self.signing_key_created = Gauge(
            f"{PREFIX}_signing_key_created_timestamp_seconds",
            "When each published private_key_jwt signing key was created (epoch seconds; the "
            "key file's modification time), by definition, kid and slot.",
            ["definition", "kid", "slot"], registry=r)
        self.reloads = Counter(f"{PREFIX}_config_reloads", "Config reloads, by result.",
                               ["result"], registry=r)
        self.last_reload_success = Gauge(
            f"{PREFIX}_config_last_reload_success_timestamp_seconds",
            "When the config was last loaded successfully (epoch seconds; start counts).",
            registry=r)
        self.build_info = Gauge(f"{PREFIX}_build_info", "The running fhir-sidecar version.",
                                ["version"], registry=r)
        self.build_info.labels(version).set(1)
        for result in ("success", "failure"):  # so that a first failure is a visible change
            self.reloads.labels(result)
        self._ca_connections: set[str] = set()
        self._client_cert_connections: set[str] = set()
        self._client_cert_definitions: set[str] = set()
        self._token_definitions: set[str] = set()
        self._signing_keys: set[tuple[str, str, str]] = set()
        self._egress_proxies: set[str] = set()
        self._configured: set[str] = set()
        # Removed by a reload (and not added back): requests still running on them are not
        # counted, so their dropped series do not come back.
        self._removed: set[str] = set()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- ProxyObserver --

    def in_flight_total(self) -> int:
        return sum(self.board.in_flight().values())

    def request_started(self, connection: str) -> None:
        self.board.started(connection)

    def request_finished(self, connection: str, method: str, status: int | None,
                         duration_seconds: float, error: str | None,
                         upstream_status: int | None = None) -> None:
        if connection in self._removed:
            # Its connection was removed while it ran: its series are gone with it.
            self.board.finished(connection, status, error, upstream_status)
            return
        if error is not None:
            self.errors.labels(connection, error).inc()
            rejection = CALLER_REJECTION_REASONS.get(error)
            if rejection is not None:
                self.caller_rejections.labels(connection, rejection).inc()
        self.requests.labels(connection, method_label(method), status_class(status)).inc()
        self.duration.labels(connection).observe(duration_seconds)
        if upstream_status is not None:
            self.upstream_responses.labels(connection, status_class(upstream_status)).inc()
            if upstream_status in REJECTIONS:
                self.upstream_rejections.labels(connection, str(upstream_status)).inc()
        self.board.finished(connection, status, error, upstream_status)

    def auth_retry(self, connection: str) -> None:
        if connection not in self._removed:
            self.auth_retries.labels(connection).inc()

    def upstream_tls_failure(self, connection: str, reason: str) -> None:
        reason = reason if reason in TLS_REASONS else "handshake"
        if connection not in self._removed:
            self.tls_failures.labels(connection, reason).inc()
        self.board.tls_failed(connection, reason)

    def egress_proxy_failure(self, proxy: str) -> None:
        self.egress_proxy_failures.labels(proxy).inc()

    # -- TokenObserver --

    def token_requested(self, definition: str, result: str) -> None:
        # Only the contract's four words: anything else would be an unbounded label.
        label = result if result in TOKEN_RESULTS else "invalid_response"
        self.token_requests.labels(definition, label).inc()
        self.board.token_result(definition, label)

    def token_request_took(self, definition: str, seconds: float) -> None:
        self.token_duration.labels(definition).observe(seconds)

    def token_expiry(self, definition: str, expires_at: float) -> None:
        self.token_expiry_at.labels(definition).set(expires_at)
        self.board.token_expiry(definition, expires_at)

    # -- config --

    def trace_exports(self, result: str, spans: int) -> None:
        self.trace_export_count.labels(result).inc(spans)

    def audit_record(self, sink: str, result: str) -> None:
        self.audit_records.labels(sink, result).inc()

    def audit_queue(self, queued_bytes: int) -> None:
        self.audit_queue_bytes.set(queued_bytes)

    def audit_configured(self, sinks: list[str]) -> None:
        """The audit sinks in use, at 0 for every result (an alert sees the first one)."""
        for sink in sinks:
            for result in AUDIT_RESULTS.get(sink, ()):
                self.audit_records.labels(sink, result)

    def reload_finished(self, outcome: ReloadOutcome) -> None:
        self.reloads.labels("success" if outcome.ok else "failure").inc()
        if outcome.ok:
            self.last_reload_success.set(outcome.at)

    def snapshot_loaded(self, snapshot: Snapshot) -> None:
        """Refresh what depends on the config: certificate expiries, and forget removed names."""
        with_bundle: set[str] = set()
        for name, conn in snapshot.connections.items():
            expires = earliest_expiry(conn.tls) if conn.tls is not None else None
            if expires is not None:
                self.ca_expiry.labels(name).set(expires.timestamp())
                with_bundle.add(name)
        for gone in self._ca_connections - with_bundle:
            self.ca_expiry.remove(gone)
        self._ca_connections = with_bundle
        with_client_cert: set[str] = set()
        for name, conn in snapshot.connections.items():
            expires = client_cert_expiry(conn.tls) if conn.tls is not None else None
            if expires is not None:
                self.client_cert_expiry.labels(name).set(expires.timestamp())
                with_client_cert.add(name)
        for gone in self._client_cert_connections - with_client_cert:
            self.client_cert_expiry.remove(gone)
        self._client_cert_connections = with_client_cert
        self._oauth_client_certs_loaded(snapshot)
        self._signing_keys_loaded(snapshot)
        definitions = set(snapshot.token_sources)
        for gone in self._token_definitions - definitions:
            with contextlib.suppress(KeyError):  # KeyError: no token was ever fetched for it
                self.token_expiry_at.remove(gone)
            self.token_requests.remove_by_labels({"definition": gone})
            self.token_duration.remove_by_labels({"definition": gone})
        self._token_definitions = definitions
        proxies = set(snapshot.egress_proxies)
        for name in proxies - self._egress_proxies:  # exported at 0 until a first failure
            self.egress_proxy_failures.labels(name)
        for gone in self._egress_proxies - proxies:
            self.egress_proxy_failures.remove(gone)
        self._egress_proxies = proxies
        for definition in definitions:
            for result in sorted(TOKEN_RESULTS):
                self.token_requests.labels(definition, result)
            self.token_duration.labels(definition)
        self._export_connections(snapshot)
        self.board.keep_only(snapshot.connections, definitions)

    def _oauth_client_certs_loaded(self, snapshot: Snapshot) -> None:
        with_client_cert: set[str] = set()
        for name, source in snapshot.token_sources.items():
            expires = client_cert_expiry(source.tls)
            if expires is not None:
                self.oauth_client_cert_expiry.labels(name).set(expires.timestamp())
                with_client_cert.add(name)
        for gone in self._client_cert_definitions - with_client_cert:
            self.oauth_client_cert_expiry.remove(gone)
        self._client_cert_definitions = with_client_cert

    def _signing_keys_loaded(self, snapshot: Snapshot) -> None:
        labels: set[tuple[str, str, str]] = set()
        for key in snapshot.signing_keys:
            label = (key.definition, key.kid, key.slot)
            self.signing_key_created.labels(*label).set(key.created)
            labels.add(label)
        for gone in self._signing_keys - labels:
            self.signing_key_created.remove(*gone)
        self._signing_keys = labels

    def _export_connections(self, snapshot: Snapshot) -> None:
        """Series of configured connections at 0; a removed connection's series are dropped."""
        names = set(snapshot.connections)
        for gone in self._configured - names:
            for metric in (self.requests, self.duration, self.errors, self.auth_retries,
                           self.tls_failures, self.caller_rejections,
                           self.upstream_rejections, self.upstream_responses):
                metric.remove_by_labels({"connection": gone})
        self._removed = (self._removed | (self._configured - names)) - names
        self._configured = names
        for name, conn in snapshot.connections.items():
            for method in PRESET_METHODS:
                for status in PRESET_STATUS_CLASSES:
                    self.requests.labels(name, method, status)
            self.duration.labels(name)
            for error in CONNECTION_ERRORS:
                self.errors.labels(name, error)
            self.auth_retries.labels(name)
            for reason in CALLER_REJECTIONS.values():
                self.caller_rejections.labels(name, reason)
            for rejected in REJECTIONS:
                self.upstream_rejections.labels(name, str(rejected))
            for upstream_class in PRESET_STATUS_CLASSES:
                self.upstream_responses.labels(name, upstream_class)
            if conn.tls is not None:
                for reason in sorted(TLS_REASONS):
                    self.tls_failures.labels(name, reason)
            self.board.connection(name)  # requests_in_flight at 0

    def attach(self, live: LiveConfig) -> None:
        """Follow ``live``: count its reloads and refresh from every new snapshot."""
        self.last_reload_success.set(live.last_success_at)
        self.snapshot_loaded(live.current)
        live.on_reload(self.reload_finished)
        live.on_swap(lambda _old, new: self.snapshot_loaded(new))
