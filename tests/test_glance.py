"""Health and trends through the real sidecar (docs/admin-api.md#health-and-trends): requests
and upstream-tls errors driven through ``fhir-sidecar run`` to real TLS upstreams turn the
lights red, then amber once the connection answers again; the sparkline's SVG points draw the
counts the API reports; CA bundles that expire soon are amber and red; a token endpoint that
does not answer turns an OAuth connection red; a removed and re-added connection starts
fresh."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.glance import bundle_with_soon_expiring_ca, spark_counts, svg_of
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until, write_config
from support.sidecars import StartSidecar
from support.upstreams import Upstreams

DEADLINE = 60.0


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port with nothing listening (held bound, never listened on)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


class Glance:
    def __init__(self, tmp: Path, pki: TestPKI, upstreams: Upstreams, closed_port: int):
        self.tmp = tmp
        self.admin = f"127.0.0.1:{free_port()}"
        self.ports = {"main": free_port(), "wrong-ca": free_port(), "soon": free_port(),
                      "later": free_port(), "oauth-down": free_port(), "mtls": free_port()}
        (tmp / "secrets").mkdir()
        (tmp / "secrets" / "pw").write_text(UPSTREAM_PASSWORD + "\n")
        (tmp / "secrets" / "client").write_text("glance-client-secret-Kx20\n")
        good, other_ca = upstreams.get("good"), upstreams.get("other_ca")
        client = pki.client_identity(name="glance-client")
        trusted = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
        self.trusted, self.other_ca = trusted, other_ca
        self.other_ca_bundle = str(pki.other_ca_bundle_path)

        def conn(name: str, url: str, tls: dict[str, Any], **auth: str) -> dict[str, Any]:
            return {"url": url, "listen": f"127.0.0.1:{self.ports[name]}",
                    "auth": auth or {"basic": "up"}, "tls": tls, "timeout_seconds": 10}

        self.connections = {
            "main": conn("main", good.base_url, trusted),
            "wrong-ca": conn("wrong-ca", other_ca.base_url, trusted),
            "soon": conn("soon", good.base_url, {
                "verify": "custom",
                "ca_bundle": str(bundle_with_soon_expiring_ca(pki, "glance-soon", 3.5))}),
            "later": conn("later", good.base_url, {
                "verify": "custom",
                "ca_bundle": str(bundle_with_soon_expiring_ca(pki, "glance-later", 20.5))}),
            "oauth-down": conn("oauth-down", good.base_url, trusted, oauth="down"),
            "mtls": conn("mtls", upstreams.get("mtls").base_url, {
                **trusted, "client_cert": str(client.cert), "client_key": str(client.key)}),
        }
        self.config = {
            "admin": {"listen": self.admin},
            "basic_auth": {"up": {"username": UPSTREAM_USER, "password_file": "secrets/pw"}},
            "oauth": {"down": {"token_url": f"https://127.0.0.1:{closed_port}/token",
                               "client_id": "glance", "client_secret_file": "secrets/client",
                               "tls": trusted}},
            "connections": dict(self.connections),
        }
        self.path = write_config(tmp, self.config)
        self.api = httpx.Client(base_url=f"http://{self.admin}", trust_env=False, timeout=30)

    def send(self, name: str, count: int) -> list[httpx.Response]:
        return [httpx.get(f"http://127.0.0.1:{self.ports[name]}/metadata", timeout=30,
                          trust_env=False) for _ in range(count)]

    def connection(self, name: str) -> dict[str, Any]:
        found = self.api.get(f"/api/connections/{name}")
        assert found.status_code == 200, found.text
        body: dict[str, Any] = found.json()
        return body

    def reconfigure(self, connections: dict[str, Any]) -> None:
        generation = self.api.get("/readyz?verbose=1").json()["config"]["generation"]
        self.config["connections"] = connections
        write_config(self.tmp, self.config)
        wait_until(lambda: self.api.get("/readyz?verbose=1").json()["config"]["generation"]
                   > generation, DEADLINE, message="the reload")


@pytest.fixture
def glance(tmp_path: Path, pki: TestPKI, upstreams: Upstreams,
           closed_port: int, start_sidecar: StartSidecar) -> Iterator[Glance]:
    setup = Glance(tmp_path, pki, upstreams, closed_port)
    start_sidecar(setup.config, directory=tmp_path)
    with setup.api:
        yield setup


def test_lights_and_sparklines_follow_real_requests(glance: Glance) -> None:
    # Nothing sent yet: green and idle, an empty hour.
    idle = glance.connection("main")
    assert idle["health"] == {"light": "green", "reason": "no requests in the last 5 min",
                              "reasons": []}
    assert len(idle["trend"]["requests"]) == 60 and sum(idle["trend"]["requests"]) == 0

    assert {r.status_code for r in glance.send("main", 3)} == {200}
    refused = glance.send("wrong-ca", 4)
    assert {r.headers.get("X-Sidecar-Error") for r in refused} == {"upstream-tls"}

    main = glance.connection("main")
    assert main["health"]["light"] == "green"
    assert main["health"]["reason"] == "no errors in the last 5 min"
    assert sum(main["trend"]["requests"]) == 3 and sum(main["trend"]["errors"]) == 0
    wrong = glance.connection("wrong-ca")
    assert wrong["health"]["light"] == "red", wrong["health"]
    assert wrong["health"]["reason"].startswith("failing: upstream-tls"), wrong["health"]
    assert "4 upstream-tls in 5 min" in wrong["health"]["reason"]
    assert wrong["status"]["errors_recent"] == {"upstream-tls": 4}
    assert sum(wrong["trend"]["requests"]) == 4 and sum(wrong["trend"]["errors"]) == 4

    # The dashboard draws the same: the light's colour and the sparkline's points.
    page = glance.api.get("/").text
    assert '<tr id="connection-wrong-ca">' in page
    assert 'data-live="health" data-light="red"' in _row(page, "wrong-ca")
    assert 'data-live="health" data-light="green"' in _row(page, "main")
    for name, requests, errors in (("main", 3, 0), ("wrong-ca", 4, 4)):
        svg = svg_of(page, name)
        drawn_requests = spark_counts(svg["requests"], int(svg["peak"]))
        drawn_errors = spark_counts(svg["errors"], int(svg["peak"]))
        assert len(drawn_requests) == len(drawn_errors) == 60
        assert sum(drawn_requests) == requests and sum(drawn_errors) == errors, svg
        assert max(drawn_requests) == int(svg["peak"])  # the busiest minute is the top
    # /readyz?verbose=1 shows the same light and reason, for probes and scripts.
    ready = glance.api.get("/readyz?verbose=1").json()["connections"]
    assert ready["wrong-ca"]["health"] == {"light": "red", "reason": wrong["health"]["reason"]}
    assert ready["main"]["health"] == {"light": "green", "reason": main["health"]["reason"]}
    # The live fragment that the page's script fetches carries the same cells.
    live = glance.api.get("/connections/live")
    assert live.status_code == 200
    assert 'data-live="health" data-light="red"' in _row(live.text, "wrong-ca")
    assert sum(spark_counts(svg_of(live.text, "wrong-ca")["errors"],
                            int(svg_of(live.text, "wrong-ca")["peak"]))) == 4

    # The connection now trusts its server's CA: it answers again, the errors stay counted.
    fixed = dict(glance.connections)
    fixed["wrong-ca"] = {**fixed["wrong-ca"],
                         "tls": {"verify": "custom", "ca_bundle": glance.other_ca_bundle}}
    glance.reconfigure(fixed)
    assert {r.status_code for r in glance.send("wrong-ca", 2)} == {200}
    recovered = glance.connection("wrong-ca")
    assert recovered["health"]["light"] == "amber", recovered["health"]
    assert recovered["health"]["reason"] == \
        "4 upstream-tls in the last 5 min; answered since"
    assert sum(recovered["trend"]["requests"]) == 6 and sum(recovered["trend"]["errors"]) == 4

    # Removed, then added again under the same name: its history is gone.
    without = {k: v for k, v in fixed.items() if k != "wrong-ca"}
    glance.reconfigure(without)
    assert glance.api.get("/api/connections/wrong-ca").status_code == 404
    glance.reconfigure(fixed)
    again = glance.connection("wrong-ca")
    assert sum(again["trend"]["requests"]) == 0 and again["status"]["errors_recent"] == {}
    assert again["health"]["light"] == "green"


def test_certificate_expiry_and_token_lights(glance: Glance) -> None:
    soon, later = glance.connection("soon"), glance.connection("later")
    assert soon["certificates"]["ca_bundle"]["days_left"] == 3
    assert soon["certificates"]["ca_bundle"]["light"] == "red"
    assert soon["health"]["light"] == "red"
    assert soon["health"]["reason"] == "CA bundle expires in 3 days"
    assert later["certificates"]["ca_bundle"]["days_left"] == 20
    assert later["certificates"]["ca_bundle"]["light"] == "amber"
    assert later["health"] == {"light": "amber", "reason": "CA bundle expires in 20 days",
                               "reasons": ["CA bundle expires in 20 days"]}
    main = glance.connection("main")
    assert main["certificates"]["ca_bundle"]["light"] == "green"  # ten years
    assert main["certificates"]["client_cert"] is None
    assert main["token"] is None
    mtls = glance.connection("mtls")
    assert mtls["certificates"]["client_cert"]["light"] == "green"
    assert mtls["certificates"]["client_cert"]["days_left"] in (363, 364)  # a year, less a bit
    assert {r.status_code for r in glance.send("mtls", 1)} == {200}
    # Expiring CA bundles still verify: requests work, and the light stays what the dates say.
    assert {r.status_code for r in glance.send("soon", 2)} == {200}
    assert glance.connection("soon")["health"]["light"] == "red"

    # The token endpoint refuses connections: no token can be had, the light is red.
    def token_failed() -> dict[str, Any] | None:
        conn = glance.connection("oauth-down")
        token = conn["token"]
        return conn if token["last_error"] else None

    down = wait_until(token_failed, DEADLINE, interval=0.2, message="a failed token request")
    assert down["token"]["usable"] is False and down["token"]["definition"] == "down"
    assert down["health"]["light"] == "red"
    assert down["health"]["reason"] == "no usable OAuth token: the last token request failed"
    ready = glance.api.get("/readyz?verbose=1").json()["connections"]
    assert ready["oauth-down"]["health"]["light"] == "red"
    assert ready["soon"]["health"] == {"light": "red", "reason": "CA bundle expires in 3 days"}
    assert "glance-client-secret" not in str(down)
    page = glance.api.get("/").text
    assert 'data-live="health" data-light="red"' in _row(page, "oauth-down")
    assert 'data-light="red" data-days="3"' in _row(page, "soon")
    assert 'data-light="amber" data-days="20"' in _row(page, "later")
    assert re.search(r'data-light="green" data-days="36[34]">client cert: <time datetime="'
                     r'[0-9T:-]+Z" title="[0-9: -]+ UTC">36[34] days left</time>',
                     _row(page, "mtls"))


def _row(html: str, connection: str) -> str:
    start = html.index(f'<tr id="connection-{connection}">')
    return html[start:html.index("</tr>", start)]
