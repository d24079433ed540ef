"""Series whose labels the config already names exist at 0 before anything happens.

A series that appears with its first increment hides that increment from ``rate()`` and from
alerts. Checked on the real ``/metrics`` of the real process: at start, for a connection a
reload adds, and for one a reload removes (its series are dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until, write_config
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TLS_REASONS = ("unknown_ca", "hostname_mismatch", "expired", "handshake")


def scrape(admin: str) -> Samples:
    response = httpx.get(f"http://{admin}/metrics", timeout=10, trust_env=False)
    assert response.status_code == 200
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def series(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def connection_series(connection: str, tls: bool) -> list[tuple[str, frozenset[Any]]]:
    found = [series("fhir_sidecar_auth_retries_total", connection=connection),
             series("fhir_sidecar_request_duration_seconds_count", connection=connection),
             series("fhir_sidecar_requests_in_flight", connection=connection)]
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        for status in ("2xx", "4xx", "5xx"):
            found.append(series("fhir_sidecar_requests_total", connection=connection,
                                method=method, status_class=status))
    for error in ("token-unavailable", "upstream-tls", "upstream-unreachable",
                  "upstream-timeout", "client-disconnected", "stream-aborted"):
        found.append(series("fhir_sidecar_request_errors_total", connection=connection,
                            error=error))
    if tls:
        found += [series("fhir_sidecar_upstream_tls_failures_total", connection=connection,
                         reason=reason) for reason in TLS_REASONS]
    return found


def has_connection(found: Samples, name: str) -> bool:
    return any(dict(labels).get("connection") == name for _, labels in found)


def test_configured_series_start_at_zero_and_follow_reloads(
        tmp_path: Path, pki: TestPKI, upstream_good: FhirTestServer,
        oauth_provider: OAuthTestProvider, start_sidecar: StartSidecar) -> None:
    admin = f"127.0.0.1:{free_port()}"
    tls = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    client = oauth_provider.clients["basic"]
    (tmp_path / "cs").write_text(f"{client.secret}\n")
    config: dict[str, Any] = {
        "admin": {"listen": admin},
        "basic_auth": {"b": {"username": UPSTREAM_USER, "password": UPSTREAM_PASSWORD}},
        "oauth": {"o": {"token_url": oauth_provider.token_url,
                        "client_id": client.client_id, "client_secret_file": "cs",
                        "tls": {"verify": "custom",
                                "ca_bundle": str(oauth_provider.ca_bundle)}}},
        "connections": {
            "with-basic": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                           "auth": {"basic": "b"}, "tls": tls},
            "with-oauth": {"url": upstream_good.base_url, "listen": f"127.0.0.1:{free_port()}",
                           "auth": {"oauth": "o"}, "tls": tls},
            "plain-http": {"url": "http://127.0.0.1:9/fhir"},
        },
    }
    sidecar = start_sidecar(config, directory=tmp_path).process
    found = scrape(admin)
    for name, tls_on in (("with-basic", True), ("with-oauth", True),
                         ("plain-http", False)):
        for key in connection_series(name, tls_on):
            assert found.get(key) == 0.0, key
    assert not any(key in found for key in (
        series("fhir_sidecar_upstream_tls_failures_total", connection="plain-http",
               reason=reason) for reason in TLS_REASONS))
    for result in ("success", "http_error", "invalid_response", "network"):
        assert series("fhir_sidecar_token_requests_total", definition="o",
                      result=result) in found

    # A reload adds one connection and removes another.
    config["connections"]["added"] = {"url": upstream_good.base_url, "tls": tls}
    del config["connections"]["plain-http"]
    reloads = len(sidecar.events("config_reloaded"))
    write_config(tmp_path, config)
    wait_until(lambda: len(sidecar.events("config_reloaded")) > reloads, 10,
               message="the reload")
    found = scrape(admin)
    for key in connection_series("added", tls=True):
        assert found.get(key) == 0.0, key
    assert not has_connection(found, "plain-http")

    # Traffic on a kept connection counts on top of the zeros, as usual.
    port = config["connections"]["with-basic"]["listen"].rsplit(":", 1)[1]
    assert httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=30,
                     trust_env=False).status_code == 200
    found = scrape(admin)
    assert found[series("fhir_sidecar_requests_total", connection="with-basic",
                        method="GET", status_class="2xx")] == 1.0
    assert found[series("fhir_sidecar_requests_total", connection="with-basic",
                        method="GET", status_class="5xx")] == 0.0

    # The removed definition's series go too.
    del config["connections"]["with-oauth"]
    del config["oauth"]
    reloads = len(sidecar.events("config_reloaded"))
    write_config(tmp_path, config)
    wait_until(lambda: len(sidecar.events("config_reloaded")) > reloads, 10,
               message="the second reload")
    found = scrape(admin)
    assert not has_connection(found, "with-oauth")
    assert not any(dict(labels).get("definition") == "o" for _, labels in found)
