"""Egress proxies in the admin API and the dashboard, against the real ``fhir-sidecar run``
process and a real tinyproxy: the read-only proxy resource, ``via`` set and removed through the
API and the forms (and effective at once: the next request tunnels), and attacks: no proxy
password or Proxy-Authorization value in any answer, no write for a ``via`` naming nothing."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from support.fhir_routes import fhir_upstream
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar
from support.tinyproxy import Tinyproxy

from sidecar.testkit.fhir_server import FhirTestServer

ADMIN_TOKEN = "egress-admin-token-Wq81"
PROXY_USER = "svc-proxy-Kd20"
PROXY_PASSWORD = "proxy-pw-Zu73"
ENV_PASSWORD = "proxy-env-pw-Ha46"
PASSWORD_ENV = "EGRESS_ADMIN_TEST_PROXY_PW"
SECRETS = (PROXY_PASSWORD, ENV_PASSWORD)


def leak_forms() -> list[bytes]:
    """Every way a proxy secret could show: plain, as Basic credentials, as userinfo."""
    found: list[bytes] = [PROXY_USER.encode()]
    for secret in SECRETS:
        pair = f"{PROXY_USER}:{secret}".encode()
        found += [secret.encode(), pair, base64.b64encode(pair),
                  base64.urlsafe_b64encode(pair), secret.encode().hex().encode()]
    return found


def assert_no_leak(raw: bytes) -> None:
    for form in leak_forms():
        assert form not in raw, f"a proxy credential ({form[:6]!r}...) is in an answer"


def disk_state(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*"))
            if p.is_file() and "mitmproxy" not in p.parts and "tinyproxy" not in p.parts}


class Setup:
    def __init__(self, tmp: Path, pki: TestPKI, proxy: Tinyproxy, upstream: FhirTestServer,
                 start: StartSidecar) -> None:
        self.tmp, self.proxy, self.upstream = tmp, proxy, upstream
        self.port = free_port()
        self.admin = f"127.0.0.1:{free_port()}"
        (tmp / "secrets").mkdir()
        (tmp / "secrets" / "admin-token").write_text(ADMIN_TOKEN + "\n")
        (tmp / "secrets" / "proxy-password").write_text(PROXY_PASSWORD + "\n")
        self.running = start({
            "admin": {"listen": self.admin, "token_file": "secrets/admin-token"},
            "egress_proxies": {
                "corp": {"url": proxy.url, "username": PROXY_USER,
                         "password_file": "secrets/proxy-password"},
                "tls-proxy": {"url": f"https://localhost:{free_port()}", "username": PROXY_USER,
                              "password_env": PASSWORD_ENV,
                              "tls": {"verify": "custom",
                                      "ca_bundle": str(pki.ca_bundle_path)}},
                "open": {"url": f"http://127.0.0.1:{free_port()}/"},
            },
            "connections": {
                "main": {"url": upstream.base_url, "listen": f"127.0.0.1:{self.port}",
                         "tls": {"verify": "skip"}},
                "fixed": {"url": "https://127.0.0.1:9/fhir", "via": "open",
                          "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}},
            },
        }, directory=tmp, env={PASSWORD_ENV: ENV_PASSWORD})
        self.path = self.running.config_path
        self.process = self.running.process
        self.client = httpx.Client(base_url=f"http://{self.admin}", trust_env=False,
                                   timeout=30, follow_redirects=True)
        self.auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def get(self, path: str) -> httpx.Response:
        response = self.client.get(path, headers=self.auth)
        assert_no_leak(response.content)
        return response

    def put(self, path: str, body: Any) -> httpx.Response:
        response = self.client.put(path, json=body, headers=self.auth)
        assert_no_leak(response.content)
        return response

    def through(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}/metadata", timeout=30, trust_env=False)

    def config(self) -> dict[str, Any]:
        loaded: dict[str, Any] = yaml.safe_load(self.path.read_text())
        return loaded


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
          start_module_sidecar: StartSidecar) -> Iterator[Setup]:
    tmp = Path(tmp_path_factory.mktemp("egress-admin"))
    with Tinyproxy(tmp / "tinyproxy", auth=(PROXY_USER, PROXY_PASSWORD)) as proxy, \
            fhir_upstream(pki.server(name="egress-admin-upstream")) as upstream:
        s = Setup(tmp, pki, proxy, upstream, start_module_sidecar)
        with s.client:
            yield s
        s.running.stop()  # before the proxy and upstream go, and to read the whole log
        assert_no_leak(s.process.output.encode())


@pytest.fixture(autouse=True)
def config_is_restored(setup: Setup) -> Iterator[None]:
    """The module's sidecar is shared and its tests write through the API: each one must
    leave the config file as it found it, or the next test (in a random order) sees its state."""
    before = without_empty_sections(setup.config())
    yield
    after = without_empty_sections(setup.config())
    assert after == before


def without_empty_sections(config: dict[str, Any]) -> dict[str, Any]:
    # Deleting the last OAuth definition leaves `oauth: {}`, which means the same as none.
    return {key: value for key, value in config.items() if value != {}}


def test_the_api_lists_proxies_without_any_credential(setup: Setup) -> None:
    listed = setup.get("/api/egress-proxies")
    assert listed.status_code == 200
    items = {p["name"]: p for p in listed.json()["items"]}
    assert set(items) == {"corp", "tls-proxy", "open"}
    assert items["corp"] == {
        "name": "corp", "url": setup.proxy.url, "username_set": True, "password": "set",
        "password_source": "file", "tls_verify": None,
        "read_only": items["corp"]["read_only"], "used_by": []}
    assert "config file" in items["corp"]["read_only"]
    assert items["tls-proxy"]["password_source"] == "env"
    assert items["tls-proxy"]["password"] == "set"
    assert items["tls-proxy"]["tls_verify"] == "custom"
    assert items["open"]["username_set"] is False
    assert items["open"]["password"] == "not used"
    assert items["open"]["password_source"] is None
    assert items["open"]["used_by"] == ["fixed"]
    one = setup.get("/api/egress-proxies/tls-proxy")
    assert one.status_code == 200 and one.json() == items["tls-proxy"]
    assert setup.get("/api/egress-proxies/nothing").status_code == 404
    assert setup.get("/api/connections/fixed").json()["via"] == "open"


def test_reading_proxies_is_open_on_a_loopback_listener_like_other_reads(
        setup: Setup) -> None:
    # The admin listener is on loopback: reads are open there, as for every other resource.
    anonymous = setup.client.get("/api/egress-proxies")
    assert anonymous.status_code == 200
    assert_no_leak(anonymous.content)


def test_proxies_cannot_be_changed_through_the_api(setup: Setup) -> None:
    before = disk_state(setup.tmp)
    for method in ("PUT", "POST", "DELETE"):
        answer = setup.client.request(method, "/api/egress-proxies/corp", headers=setup.auth,
                                      json={"url": "http://evil.example:3128"})
        assert answer.status_code == 405, (method, answer.text)
        body = answer.json()
        assert set(body) == {"error", "problems"} and "config file" in body["error"]
        assert answer.headers["Allow"] == "GET"
    assert setup.client.post("/api/egress-proxies", headers=setup.auth,
                             json={}).status_code == 405
    assert disk_state(setup.tmp) == before


def test_via_set_through_the_api_tunnels_the_next_request(setup: Setup) -> None:
    body = {"url": setup.upstream.base_url, "listen": f"127.0.0.1:{setup.port}",
            "tls": {"verify": "skip"}}
    before = len(setup.proxy.connects())
    saved = setup.put("/api/connections/main", {**body, "via": "corp"})
    assert saved.status_code == 200, saved.text
    assert saved.json()["via"] == "corp"
    assert setup.config()["connections"]["main"]["via"] == "corp"
    assert "main" in setup.get("/api/egress-proxies/corp").json()["used_by"]
    assert setup.through().status_code == 200
    assert setup.proxy.connects()[before:] == [urlsplit(setup.upstream.base_url).netloc]

    # A PUT replaces the whole definition: leaving via out is a direct connection again.
    saved = setup.put("/api/connections/main", body)
    assert saved.status_code == 200 and saved.json()["via"] is None
    assert "via" not in setup.config()["connections"]["main"]
    count = len(setup.proxy.connects())
    assert setup.through().status_code == 200
    assert len(setup.proxy.connects()) == count

    setup.put("/api/connections/main", {**body, "via": "corp"})
    saved = setup.put("/api/connections/main", {**body, "via": None})  # null: the same
    assert saved.status_code == 200 and saved.json()["via"] is None
    assert "via" not in setup.config()["connections"]["main"]


def test_via_naming_no_proxy_is_refused_and_nothing_is_written(setup: Setup) -> None:
    before = disk_state(setup.tmp)
    attempts = [
        ("/api/connections/main", {"url": setup.upstream.base_url, "via": "ghost"}),
        ("/api/connections/new-conn", {"url": setup.upstream.base_url, "via": "ghost"}),
        ("/api/connections/new-conn", {"url": setup.upstream.base_url, "via": 7}),
        ("/api/oauth/new-oauth", {"client_id": "c", "token_url": "https://127.0.0.1:9/t",
                                  "client_secret": "egress-cs-Pr19", "via": "ghost"}),
    ]
    for path, body in attempts:
        refused = setup.put(path, body)
        assert refused.status_code == 422, (path, refused.text)
        problems = refused.json()["problems"]
        assert any(p.startswith("via:") and "no egress proxy" in p for p in problems), problems
        assert "corp" in problems[0]  # the known proxies are named
    assert disk_state(setup.tmp) == before
    assert not (setup.tmp / "state" / "secrets").exists() or not any(
        "new-oauth" in p.name for p in (setup.tmp / "state" / "secrets").iterdir())


def test_oauth_definitions_take_via(setup: Setup) -> None:
    body = {"client_id": "c", "token_url": "https://127.0.0.1:9/token",
            "client_secret": "egress-cs-Mm52", "via": "open"}
    made = setup.put("/api/oauth/via-oauth", body)
    assert made.status_code == 201, made.text
    assert made.json()["via"] == "open"
    assert setup.config()["oauth"]["via-oauth"]["via"] == "open"
    assert "oauth:via-oauth" in setup.get("/api/egress-proxies/open").json()["used_by"]
    # The client secret is kept when omitted (it is write-only); via is not (it is readable).
    body.pop("client_secret")
    body.pop("via")
    saved = setup.put("/api/oauth/via-oauth", body)
    assert saved.status_code == 200 and saved.json()["via"] is None
    assert saved.json()["client_secret"] == "set"
    assert setup.client.delete("/api/oauth/via-oauth", headers=setup.auth).status_code == 204


def _csrf(html: str) -> str:
    found = re.search(r'name="_csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def test_the_dashboard_shows_proxies_and_sets_via(setup: Setup) -> None:
    with httpx.Client(base_url=f"http://{setup.admin}", trust_env=False, timeout=30,
                      follow_redirects=True) as browser:
        assert browser.post("/login", data={"token": ADMIN_TOKEN}).status_code == 200
        page = browser.get("/egress-proxies")
        assert page.status_code == 200
        assert_no_leak(page.content)
        assert '<a href="/egress-proxies" aria-current="page">Egress proxies</a>' in page.text
        row = re.search(r'<tr id="proxy-corp">(.*?)</tr>', page.text, re.S)
        assert row is not None and setup.proxy.url in row.group(1)
        assert "password set (from file)" in row.group(1)
        assert 'id="proxy-tls-proxy"' in page.text and "custom" in page.text
        assert "name=\"name\"" not in page.text  # no form: read-only
        csrf = _csrf(page.text)
        forged = browser.post("/egress-proxies", data={"_csrf": csrf, "name": "corp",
                                                       "action": "delete"})
        assert forged.status_code == 405

        connections = browser.get("/connections")
        assert_no_leak(connections.content)
        select = re.search(r'<select name="via">(.*?)</select>', connections.text, re.S)
        assert select is not None
        assert re.findall(r'<option value="([^"]*)"', select.group(1)) == [
            "", "corp", "open", "tls-proxy"]
        form = {"_csrf": csrf, "action": "save", "name": "main",
                "url": setup.upstream.base_url, "listen": f"127.0.0.1:{setup.port}",
                "auth": "", "verify": "skip", "via": "corp"}
        saved = browser.post("/connections", data=form)
        assert saved.status_code == 200 and "saved" in saved.text, saved.text
        assert setup.config()["connections"]["main"]["via"] == "corp"
        shown = browser.get("/connections").text
        assert re.search(r'<option value="corp" selected>', shown)
        before = disk_state(setup.tmp)
        refused = browser.post("/connections", data={**form, "via": "ghost"})
        assert refused.status_code == 422 and "no egress proxy named" in refused.text
        assert disk_state(setup.tmp) == before
        saved = browser.post("/connections", data={**form, "via": ""})
        assert saved.status_code == 200
        assert "via" not in setup.config()["connections"]["main"]

        oauth = browser.post("/oauth", data={
            "_csrf": csrf, "action": "save", "name": "form-oauth", "client_id": "c",
            "token_url": "https://127.0.0.1:9/token", "client_secret": "egress-cs-Qa08",
            "via": "open"})
        assert oauth.status_code == 200 and "created" in oauth.text, oauth.text
        assert setup.config()["oauth"]["form-oauth"]["via"] == "open"
        oauth_page = browser.get("/oauth")
        assert_no_leak(oauth_page.content)
        assert '<option value="open" selected>' in oauth_page.text
        browser.post("/oauth", data={"_csrf": csrf, "name": "form-oauth", "action": "delete"})


def test_a_proxy_url_with_userinfo_is_refused_without_showing_it(
        tmp_path: Path, start_sidecar: StartSidecar) -> None:
    """The config refuses user:password@ in a proxy URL; a reload that tries it is rejected,
    and no answer (API, dashboard, metrics) nor the log shows the userinfo in any form."""
    admin = f"127.0.0.1:{free_port()}"
    proxy_port = free_port()
    running = start_sidecar({
        "admin": {"listen": admin},
        "egress_proxies": {"corp": {"url": f"http://127.0.0.1:{proxy_port}"}},
        "connections": {"main": {"url": "https://127.0.0.1:9/fhir", "via": "corp"}},
    }, directory=tmp_path)
    config, process = running.config_path, running.process
    with httpx.Client(base_url=f"http://{admin}", trust_env=False, timeout=30) as client:
        data = yaml.safe_load(config.read_text())
        data["egress_proxies"]["corp"]["url"] = (
            f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{proxy_port}")
        config.write_text(yaml.safe_dump(data))
        wait_until(lambda: "egress_proxies.corp.url" in client.get("/").text, 60,
                   message="the reload with userinfo to be rejected")
        answers = [client.get(path) for path in
                   ("/", "/egress-proxies", "/api/egress-proxies",
                    "/api/egress-proxies/corp", "/api/connections/main", "/metrics")]
        for answer in answers:
            assert answer.status_code == 200, answer.request.url
            assert_no_leak(answer.content)
        assert "must not contain a user name or password" in answers[0].text
        assert client.get("/api/egress-proxies/corp").json()["url"] == \
            f"http://127.0.0.1:{proxy_port}"  # the last good config stays live
    running.stop()
    assert_no_leak(process.output.encode())
