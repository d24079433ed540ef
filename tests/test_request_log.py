"""One count of requests in flight: every request is finished (logged, counted) exactly once,
whichever of mitmproxy's events ends it, and a request mitmproxy answered itself is never
counted twice. Real addons, real mitmproxy flows, the real metrics."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import connection, flow
from mitmproxy.test import tflow
from support.sidecar_process import write_config

from sidecar.observe.metrics import SidecarMetrics
from sidecar.proxy.config_source import SidecarConfig
from sidecar.proxy.request_log import RequestLog
from sidecar.proxy.request_routing import Routing
from sidecar.runtime.live import LiveConfig


def _addons(tmp_path: Path) -> tuple[Routing, RequestLog, SidecarMetrics]:
    config = write_config(tmp_path, {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": None},
        "connections": {"fhir": {"url": "https://fhir.example/base"}},
    })
    metrics = SidecarMetrics()
    log = RequestLog(metrics)
    return Routing(SidecarConfig(LiveConfig(str(config))), log), log, metrics


def _finished(metrics: SidecarMetrics) -> float:
    return sum(sample.value for family in metrics.registry.collect()
               if family.name == "fhir_sidecar_requests" for sample in family.samples
               if sample.name.endswith("_total"))


def test_a_request_is_finished_once_whatever_way_it_ends(tmp_path: Path) -> None:
    routing, log, metrics = _addons(tmp_path)
    unrouted = tflow.tflow()
    unrouted.request.host, unrouted.request.port = "elsewhere.example", 80
    routing.requestheaders(unrouted)
    assert metrics.in_flight_total() == 1
    log.response(unrouted)
    log.error(unrouted)  # however late another event for it comes
    log.client_disconnected(unrouted.client_conn)
    assert metrics.in_flight_total() == 0 and _finished(metrics) == 1

    routed = tflow.tflow()
    request = routed.request
    request.scheme, request.host, request.port = "https", "fhir.example", 443
    request.path = "/base/Patient"
    routing.requestheaders(routed)
    assert routed.response is None and metrics.in_flight_total() == 1
    routed.error = flow.Error("server closed connection")
    log.client_disconnected(routed.client_conn)  # the connection ended first
    log.error(routed)
    assert metrics.in_flight_total() == 0 and _finished(metrics) == 2


def test_a_request_mitmproxy_answered_itself_is_not_counted_again(tmp_path: Path) -> None:
    routing, log, metrics = _addons(tmp_path)
    answered = tflow.tflow()
    answered.client_conn.state = connection.ConnectionState.CLOSED
    routing.requestheaders(answered)
    assert metrics.in_flight_total() == 0
    log.response(answered)
    assert _finished(metrics) == 0
