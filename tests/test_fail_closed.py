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

from sidecar.errors import ERROR_HEADER
from sidecar.live import LiveConfig
from sidecar.observe import NullObserver
from sidecar.proxy import request_routing as routing_module
from sidecar.proxy.config_source import SidecarConfig
from sidecar.proxy.request_log import RequestLog
from sidecar.proxy.request_routing import Routing


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
        assert sidecar.requestheaders(flow) is None

    assert flow.response is not None, "the request would have gone to attacker.example"
    assert flow.response.status_code == 500
    assert flow.response.headers[ERROR_HEADER] == "internal-error"
    assert b"nothing was sent upstream" in (flow.response.content or b"")
    assert "Authorization" not in flow.request.headers
    assert any("injected fault" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    assert "app-secret" not in caplog.text


def test_without_a_fault_the_same_request_is_refused_as_unrouted(sidecar: Routing) -> None:
    # The control case: the fixture's sidecar really does route (and so would be bypassed).
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "attacker.example", 80
    sidecar.requestheaders(flow)
    assert flow.response is not None
    assert flow.response.headers[ERROR_HEADER] == "no-route"
