"""A failure inside the sidecar's own routing code refuses the request instead of passing it on.

mitmproxy catches an exception raised by an addon hook, logs it and carries on with the flow as
it stands. Before routing, a forward-proxy request still points where the app asked, so carrying
on would make the sidecar an open proxy. The fault is injected into the real routing addon,
because no input is known to make the routing code raise (that is the point of failing closed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mitmproxy.test import tflow
from support.sidecar_process import write_config

from sidecar.proxy import request_routing as routing_module
from sidecar.proxy.config_source import SidecarConfig
from sidecar.proxy.flow_state import REQUEST_ID, state_of
from sidecar.proxy.request_log import RequestLog
from sidecar.proxy.request_routing import Routing
from sidecar.report.observe import NullObserver
from sidecar.request.errors import ERROR_HEADER
from sidecar.runtime.live import LiveConfig


def _boom(*_args: object, **_kwargs: object) -> None:
    raise RuntimeError("injected fault")


@pytest.fixture
def sidecar(tmp_path: Path) -> Routing:
    config = write_config(tmp_path, {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": None},
        "connections": {"fhir": {"url": "https://fhir.example/base"}},
    })
    return Routing(SidecarConfig(LiveConfig(str(config))), RequestLog(NullObserver()))


def test_a_fault_while_routing_refuses_the_request_and_keeps_the_app_credentials_in(
        sidecar: Routing, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(routing_module.request_checks, "refusal", _boom)
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "attacker.example", 80
    flow.request.headers["Authorization"] = "Bearer app-secret"
    with caplog.at_level(logging.ERROR):
        sidecar.requestheaders(flow)  # the fault must not escape the hook: it answers instead

    assert flow.response is not None, "the request would have gone to attacker.example"
    assert flow.response.status_code == 500
    assert flow.response.headers[ERROR_HEADER] == "internal-error"
    assert b"failed while routing the request; nothing was sent upstream" in (
        flow.response.content or b"")
    assert "Authorization" not in flow.request.headers
    state = state_of(flow)
    assert state is not None and state.snapshot is sidecar._config.current()
    assert state.connection is None and state.error == "internal-error"
    assert any("injected fault" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert "app-secret" not in caplog.text


def test_without_a_fault_the_same_request_is_refused_as_unrouted(sidecar: Routing) -> None:
    # The control case: the fixture's sidecar really does route (and so would be bypassed).
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "attacker.example", 80
    sidecar.requestheaders(flow)
    assert flow.response is not None
    assert flow.response.headers[ERROR_HEADER] == "no-route"


def test_a_fault_after_routing_keeps_the_state_the_request_was_routed_with(
        sidecar: Routing, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fault strikes after the flow's state is made: the refusal reuses it (its request ID
    # and connection), rather than making a second one.
    monkeypatch.setattr(routing_module.LinkRewriter, "between", _boom)
    flow = tflow.tflow()
    flow.request.host, flow.request.port, flow.request.path = "fhir.example", 80, "/base/x"
    flow.request.headers[REQUEST_ID] = "app-request-7"
    flow.request.headers["Authorization"] = "Bearer app-secret"
    sidecar.requestheaders(flow)
    assert flow.response is not None
    assert flow.response.headers[ERROR_HEADER] == "internal-error"
    assert flow.response.headers[REQUEST_ID] == "app-request-7"
    state = state_of(flow)
    assert state is not None and state.connection is not None
    assert state.connection.name == "fhir"
    assert state.request_id == "app-request-7"
    assert "Authorization" not in flow.request.headers
    assert flow.request.host == "fhir.example" and flow.request.scheme == "http"
