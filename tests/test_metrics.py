"""SidecarMetrics in process: exact names and labels (docs/metrics.md), bounded label values,
CA bundle expiry from snapshots, reload counting, token observer wiring and the status board."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support.bearer import BearerValidator
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import write_config

from sidecar import __version__
from sidecar.credentials.oauth import TokenUnavailable
from sidecar.observe.metrics import (
    RecentCounts,
    SidecarMetrics,
    StatusBoard,
    method_label,
    status_class,
)
from sidecar.runtime.live import LiveConfig

CONTRACT = {
    "fhir_sidecar_requests_total": {"connection", "method", "status_class"},
    "fhir_sidecar_request_duration_seconds": {"connection"},
    "fhir_sidecar_requests_in_flight": {"connection"},
    "fhir_sidecar_request_errors_total": {"connection", "error"},
    "fhir_sidecar_token_requests_total": {"definition", "result"},
    "fhir_sidecar_token_expiry_timestamp_seconds": {"definition"},
    "fhir_sidecar_auth_retries_total": {"connection"},
    "fhir_sidecar_upstream_tls_failures_total": {"connection", "reason"},
    "fhir_sidecar_ca_bundle_expiry_timestamp_seconds": {"connection"},
    "fhir_sidecar_client_cert_expiry_timestamp_seconds": {"connection"},
    "fhir_sidecar_oauth_client_cert_expiry_timestamp_seconds": {"definition"},
    "fhir_sidecar_config_reloads_total": {"result"},
    "fhir_sidecar_config_last_reload_success_timestamp_seconds": set(),
    "fhir_sidecar_build_info": {"version"},
    "fhir_sidecar_caller_rejections_total": {"connection", "reason"},
    "fhir_sidecar_audit_records_total": {"sink", "result"},
    "fhir_sidecar_audit_queue_bytes": set(),
    "fhir_sidecar_trace_exports_total": {"result"},
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: SidecarMetrics) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def exercise(metrics: SidecarMetrics) -> None:
    """One call of every observer method, so that every metric has a sample."""
    metrics.request_started("good")
    metrics.request_finished("good", "GET", 200, 0.02, None)
    metrics.request_started("good")
    metrics.request_finished("good", "GET", 504, 0.02, "upstream-timeout")
    metrics.auth_retry("good")
    metrics.upstream_tls_failure("good", "unknown_ca")
    metrics.token_requested("cerner", "success")
    metrics.token_expiry("cerner", 2_000_000_000.0)
    metrics.ca_expiry.labels("good").set(1.0)
    metrics.client_cert_expiry.labels("good").set(1.0)
    metrics.oauth_client_cert_expiry.labels("cerner").set(1.0)
    metrics.request_started("good")
    metrics.request_finished("good", "GET", 421, 0.0, "misdirected")
    metrics.audit_record("file", "written")


def test_names_and_labels_are_exactly_the_contract() -> None:
    metrics = SidecarMetrics()
    exercise(metrics)
    seen: dict[str, set[str]] = {}
    for (name, labels), _ in samples(metrics).items():
        base = name
        if name.startswith("fhir_sidecar_request_duration_seconds"):
            base = "fhir_sidecar_request_duration_seconds"
            assert name.removeprefix(base) in HISTOGRAM_SUFFIXES
        seen.setdefault(base, set()).update(k for k, _ in labels if k != "le")
    assert seen == CONTRACT  # and in particular no *_created series


def test_request_counting_and_in_flight() -> None:
    metrics = SidecarMetrics()
    metrics.request_started("good")
    metrics.request_started("good")
    found = samples(metrics)
    assert value(found, "fhir_sidecar_requests_in_flight", connection="good") == 2
    metrics.request_finished("good", "get", 200, 0.02, None)
    metrics.request_finished("good", "GET", 401, 0.03, None)
    metrics.request_started("-")
    metrics.request_finished("-", "GET", 403, 0.001, "no-route")
    found = samples(metrics)
    assert value(found, "fhir_sidecar_requests_in_flight", connection="good") == 0
    assert value(found, "fhir_sidecar_requests_total", connection="good", method="GET",
                 status_class="2xx") == 1
    assert value(found, "fhir_sidecar_requests_total", connection="good", method="GET",
                 status_class="4xx") == 1
    assert value(found, "fhir_sidecar_requests_total", connection="-", method="GET",
                 status_class="4xx") == 1
    assert value(found, "fhir_sidecar_request_errors_total", connection="-",
                 error="no-route") == 1
    assert value(found, "fhir_sidecar_request_errors_total", connection="good",
                 error="no-route") is None
    assert value(found, "fhir_sidecar_request_duration_seconds_count", connection="good") == 2
    assert value(found, "fhir_sidecar_request_duration_seconds_bucket", connection="good",
                 le="0.025") == 1


def test_label_values_are_bounded() -> None:
    assert [status_class(s) for s in (101, 204, 302, 404, 503, None, 42)] == \
        ["1xx", "2xx", "3xx", "4xx", "5xx", "none", "none"]
    assert method_label("patch") == "PATCH"
    assert method_label("X-ANYTHING-THE-CLIENT-SENDS") == "OTHER"
    metrics = SidecarMetrics()
    metrics.upstream_tls_failure("good", "something new")
    metrics.token_requested("cerner", "closed")
    found = samples(metrics)
    assert value(found, "fhir_sidecar_upstream_tls_failures_total", connection="good",
                 reason="handshake") == 1
    assert value(found, "fhir_sidecar_token_requests_total", definition="cerner",
                 result="invalid_response") == 1


def test_build_info_and_reload_counters_start_visible() -> None:
    found = samples(SidecarMetrics())
    assert value(found, "fhir_sidecar_build_info", version=__version__) == 1
    assert value(found, "fhir_sidecar_config_reloads_total", result="success") == 0
    assert value(found, "fhir_sidecar_config_reloads_total", result="failure") == 0


def _config(tmp_path: Path, pki: TestPKI, connections: dict[str, Any],
            **sections: Any) -> Path:
    return write_config(tmp_path, {"admin": {"listen": None}, **sections,
                                   "connections": connections})


def test_ca_bundle_expiry_and_reloads_follow_the_live_config(tmp_path: Path,
                                                              pki: TestPKI) -> None:
    custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    path = _config(tmp_path, pki, {
        "a": {"url": "https://a.example/fhir", "tls": custom},
        "b": {"url": "https://b.example/fhir", "tls": custom},
        "pub": {"url": "https://pub.example/fhir"},
    })
    live = LiveConfig(path)
    metrics = SidecarMetrics()
    metrics.attach(live)
    certs = x509.load_pem_x509_certificates(pki.ca_bundle_path.read_bytes())
    earliest = min(c.not_valid_after_utc for c in certs).timestamp()
    found = samples(metrics)
    assert value(found, "fhir_sidecar_ca_bundle_expiry_timestamp_seconds", connection="a") == \
        pytest.approx(earliest)
    assert value(found, "fhir_sidecar_ca_bundle_expiry_timestamp_seconds", connection="pub") \
        is None  # certifi's public roots are not the operator's bundle to renew
    assert value(found, "fhir_sidecar_config_last_reload_success_timestamp_seconds") == \
        pytest.approx(live.last_success_at)

    _config(tmp_path, pki, {"a": {"url": "https://a.example/fhir", "tls": custom}})
    assert live.reload().ok
    found = samples(metrics)
    assert value(found, "fhir_sidecar_config_reloads_total", result="success") == 1
    assert value(found, "fhir_sidecar_ca_bundle_expiry_timestamp_seconds", connection="b") \
        is None  # removed with its connection
    assert value(found, "fhir_sidecar_config_last_reload_success_timestamp_seconds") == \
        pytest.approx(live.last_success_at)

    success_at = live.last_success_at
    path.write_text("connections: [unclosed\n")
    assert not live.reload().ok
    found = samples(metrics)
    assert value(found, "fhir_sidecar_config_reloads_total", result="failure") == 1
    assert value(found, "fhir_sidecar_config_last_reload_success_timestamp_seconds") == \
        pytest.approx(success_at)
    assert value(found, "fhir_sidecar_ca_bundle_expiry_timestamp_seconds", connection="a") \
        is not None  # the old snapshot still serves


def test_client_certificate_expiry_follows_the_live_config(tmp_path: Path,
                                                            pki: TestPKI) -> None:
    identity = pki.client_identity(name="metrics-client")
    mtls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path),
            "client_cert": str(identity.cert), "client_key": str(identity.key)}
    path = _config(tmp_path, pki, {
        "lab": {"url": "https://lab.example/fhir", "tls": mtls},
        "plain": {"url": "https://plain.example/fhir"},
    })
    live = LiveConfig(path)
    metrics = SidecarMetrics()
    metrics.attach(live)
    # The leaf's expiry (the first certificate of the PEM), not the issuing CA's.
    leaf, *_ = x509.load_pem_x509_certificates(identity.cert.read_bytes())
    found = samples(metrics)
    assert value(found, "fhir_sidecar_client_cert_expiry_timestamp_seconds", connection="lab") \
        == pytest.approx(leaf.not_valid_after_utc.timestamp())
    assert value(found, "fhir_sidecar_client_cert_expiry_timestamp_seconds",
                 connection="plain") is None

    _config(tmp_path, pki, {"lab": {"url": "https://lab.example/fhir",
                                    "tls": {"verify": "custom",
                                            "ca_bundle": str(pki.ca_bundle_path)}}})
    assert live.reload().ok
    assert value(samples(metrics), "fhir_sidecar_client_cert_expiry_timestamp_seconds",
                 connection="lab") is None  # the certificate was removed from the connection


def test_token_sources_report_to_the_observer(
        tmp_path: Path, pki: TestPKI, oauth_provider: OAuthTestProvider,
        bearer_validator: BearerValidator) -> None:
    client = oauth_provider.clients["basic"]
    (tmp_path / "client-secret").write_text(f"{client.secret}\n")
    token_tls = {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)}
    oauth_provider.settings(ttl=120)
    metrics = SidecarMetrics()
    path = _config(tmp_path, pki, {
        "c": {"url": "https://c.example/fhir", "auth": {"oauth": "real"}},
        "d": {"url": "https://d.example/fhir", "auth": {"oauth": "refused"}},
    }, oauth={
        "real": {"token_url": oauth_provider.token_url, "client_id": client.client_id,
                 "client_secret_file": "client-secret", "tls": token_tls},
        # A client the authorization server does not know: 401 invalid_client.
        "refused": {"token_url": oauth_provider.token_url, "client_id": "someone-else",
                    "client_secret_file": "client-secret", "tls": token_tls},
    })
    live = LiveConfig(path, token_observer=metrics)
    metrics.attach(live)

    async def fetch() -> None:
        sources = live.current.token_sources
        token = await sources["real"].token()
        assert bearer_validator.validate(token) is None
        with pytest.raises(TokenUnavailable, match="401") as refused:
            await sources["refused"].token()
        assert refused.value.definition == "refused"
        assert refused.value.result == "http_error"
        for source in sources.values():
            await source.aclose()

    asyncio.run(fetch())
    assert oauth_provider.stats()["issued"] == 1
    found = samples(metrics)
    assert value(found, "fhir_sidecar_token_requests_total", definition="real",
                 result="success") == 1
    assert value(found, "fhir_sidecar_token_requests_total", definition="refused",
                 result="http_error") == 1
    expiry = value(found, "fhir_sidecar_token_expiry_timestamp_seconds", definition="real")
    assert expiry is not None and expiry == pytest.approx(
        metrics.board.token("real").expires_at)
    assert metrics.board.token("refused").last_result == "http_error"


def test_status_board_tracks_each_connection() -> None:
    now = [1000.0]
    board = StatusBoard(clock=lambda: now[0])
    assert board.connection("good").tls_ok is None  # never tried
    board.started("good")
    board.finished("good", 200, None)
    assert board.connection("good").tls_ok is True
    now[0] += 1
    board.tls_failed("good", "expired")
    board.started("good")
    board.finished("good", 502, "upstream-tls")
    activity = board.connection("good")
    assert activity.tls_ok is False
    assert activity.last_error == "upstream-tls" and activity.last_status == 502
    assert board.last_tls_failure is not None and board.last_tls_failure.reason == "expired"
    assert activity.recent.totals() == {"2xx": 1, "5xx": 1}
    now[0] += 1
    board.started("good")
    board.finished("good", 200, None)
    assert board.connection("good").tls_ok is True  # recovered
    assert board.connection("good").in_flight == 0

    board.connection("gone")
    board.token("old-definition")
    board.keep_only(["good"], [])
    assert set(board.connections()) == {"good"} and board.tokens() == {}


def test_recent_counts_forget_old_buckets() -> None:
    now = [0.0]
    recent = RecentCounts(window_seconds=60, buckets=6, clock=lambda: now[0])
    recent.add("2xx")
    now[0] = 30
    recent.add("2xx")
    recent.add("5xx")
    assert recent.totals() == {"2xx": 2, "5xx": 1}
    now[0] = 65  # the first bucket (0-10 s) has left the window
    assert recent.totals() == {"2xx": 1, "5xx": 1}
    now[0] = 1000
    assert recent.totals() == {}


def test_in_flight_of_a_removed_connection_is_kept_until_it_finishes() -> None:
    metrics = SidecarMetrics()
    metrics.request_started("gone")
    metrics.board.keep_only(["good"], [])
    assert value(samples(metrics), "fhir_sidecar_requests_in_flight", connection="gone") == 1
    assert metrics.in_flight_total() == 1
    metrics.request_finished("gone", "GET", 200, 0.01, None)
    assert value(samples(metrics), "fhir_sidecar_requests_in_flight", connection="gone") == 0
    assert metrics.in_flight_total() == 0


def test_a_request_finishing_on_a_removed_connection_does_not_bring_its_series_back(
        tmp_path: Path, pki: TestPKI) -> None:
    custom = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    path = _config(tmp_path, pki, {"a": {"url": "https://a.example/fhir", "tls": custom},
                                   "b": {"url": "https://b.example/fhir", "tls": custom}})
    live = LiveConfig(path)
    metrics = SidecarMetrics()
    metrics.attach(live)
    assert value(samples(metrics), "fhir_sidecar_auth_retries_total", connection="b") == 0
    metrics.request_started("b")
    _config(tmp_path, pki, {"a": {"url": "https://a.example/fhir", "tls": custom}})
    assert live.reload().ok
    metrics.auth_retry("b")
    metrics.upstream_tls_failure("b", "expired")
    metrics.request_finished("b", "GET", 200, 0.01, None)
    # (requests_in_flight follows the status board, which lets running requests finish)
    assert not any(dict(labels).get("connection") == "b"
                   and name != "fhir_sidecar_requests_in_flight"
                   for name, labels in samples(metrics))
    assert metrics.in_flight_total() == 0

    _config(tmp_path, pki, {"a": {"url": "https://a.example/fhir", "tls": custom},
                            "b": {"url": "https://b.example/fhir", "tls": custom}})
    assert live.reload().ok  # added back: counted again, from 0
    metrics.request_started("b")
    metrics.request_finished("b", "GET", 200, 0.01, None)
    found = samples(metrics)
    assert value(found, "fhir_sidecar_requests_total", connection="b", method="GET",
                 status_class="2xx") == 1
    assert value(found, "fhir_sidecar_auth_retries_total", connection="b") == 0
