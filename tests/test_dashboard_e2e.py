"""The dashboard in a real headless browser (Debian's chromium driven by Playwright): log in,
create a Basic definition, set its password, assign it to a connection, upload CA bundles and
switch the connection to ``custom``; real requests through the sidecar show each change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from support.constants import basic_header
from support.fhir_routes import fhir_upstream
from support.pki import TestPKI
from support.sidecar_process import free_port
from support.sidecars import StartSidecar

from sidecar.testkit.fhir_server import FhirTestServer

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ADMIN_TOKEN = "e2e-admin-token-Hw72"
FIRST_PASSWORD = "e2e-first-Zp11"
SECOND_PASSWORD = "e2e-second-Kc40"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is missing (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def upstream(pki: TestPKI) -> Iterator[FhirTestServer]:
    with fhir_upstream(pki.server(name="e2e-open")) as server:
        yield server


@pytest.fixture
def browser_page() -> Iterator[Page]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(15_000)
            yield page
        finally:
            browser.close()


def test_dashboard_changes_reach_real_requests(tmp_path: Path, pki: TestPKI,
                                               upstream: FhirTestServer,
                                               browser_page: Page,
                                               start_sidecar: StartSidecar) -> None:
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "secrets" / "pw").write_text("unused-pw-Ty31\n")
    settings = {
        "admin": {"listen": admin, "token_file": "secrets/admin-token"},
        "basic_auth": {"old": {"username": "old", "password_file": "secrets/pw"}},
        "egress_proxies": {"corp-proxy": {"url": "http://127.0.0.1:9", "username": "proxysvc",
                                          "password_file": "secrets/pw"}},
        "connections": {"main": {"url": upstream.base_url, "listen": f"127.0.0.1:{port}",
                                 "tls": {"verify": "skip"}}},
    }
    base = f"http://{admin}"

    def through() -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=30, trust_env=False)

    def last_auth() -> str | None:
        seen = upstream.requests_seen
        return seen[-1].headers.get("authorization") if seen else None

    def shot(name: str) -> None:
        page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)

    def expect_done(words: str) -> None:
        sync_api.expect(page.locator("#done")).to_contain_text(words)

    running = start_sidecar(settings, directory=tmp_path)
    config = running.config_path
    through()
    assert last_auth() is None

    # Log in.
    page.goto(f"{base}/")
    sync_api.expect(page.locator("main")).to_contain_text("Log in with the admin token")
    page.click("#login-link")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#login-form button[type=submit]")
    expect_done("logged in")
    shot("1-logged-in")

    # Create a Basic definition, then set (rotate) its password.
    page.goto(f"{base}/basic-auth")
    form = page.locator("#new-basic form")
    form.locator("input[name=name]").fill("web")
    form.locator("input[name=username]").fill("websvc")
    form.locator("input[name=password]").fill(FIRST_PASSWORD)
    form.locator("button[type=submit]").click()
    expect_done("Basic Auth definition web created")
    sync_api.expect(page.locator("#basic-web .secret-state")).to_have_text("set")
    page.click("#edit-basic-web summary")
    page.fill("#edit-basic-web input[name=password]", SECOND_PASSWORD)
    page.click("#edit-basic-web form.edit button[type=submit]")
    expect_done("Basic Auth definition web saved")
    assert FIRST_PASSWORD not in page.content() and SECOND_PASSWORD not in page.content()
    # The config file's definition reads a file: shown read-only, without a form.
    sync_api.expect(page.locator("#edit-basic-old")).to_contain_text("edit the config file")
    assert page.locator("#edit-basic-old form").count() == 0
    shot("2-basic-auth")

    # Assign it to the connection.
    page.goto(f"{base}/")
    page.click("#edit-connection-main summary")
    page.select_option("#edit-connection-main select[name=auth]", "basic:web")
    page.click("#edit-connection-main form.edit button[type=submit]")
    expect_done("connection main saved")
    sync_api.expect(page.locator("#connection-main")).to_contain_text("Basic: web")
    assert through().status_code == 200
    assert last_auth() == basic_header("websvc", SECOND_PASSWORD)
    shot("3-connection-assigned")

    # Upload two CA bundles: the upstream's CA, and one that did not sign it.
    page.goto(f"{base}/ca-bundles")
    for name, bundle in (("corp-ca", pki.ca_bundle_path),
                         ("other-ca", pki.other_ca_bundle_path)):
        form = page.locator("#upload-bundle form")
        form.locator("input[name=name]").fill(name)
        form.locator("input[name=bundle]").set_input_files(str(bundle))
        form.locator("button[type=submit]").click()
        expect_done(f"CA bundle {name} uploaded")
        sync_api.expect(page.locator(f"#bundle-{name}")).to_contain_text("O=")
    # A bundle that is not PEM is refused with a clear message.
    bad = tmp_path / "not-a-bundle.pem"
    bad.write_text("hello\n")
    form = page.locator("#upload-bundle form")
    form.locator("input[name=name]").fill("broken")
    form.locator("input[name=bundle]").set_input_files(str(bad))
    form.locator("button[type=submit]").click()
    sync_api.expect(page.locator("#error")).to_contain_text("contains no PEM certificate")
    shot("4-ca-bundles")

    def switch_to(bundle: str) -> None:
        page.goto(f"{base}/")
        page.click("#edit-connection-main summary")
        page.select_option("#edit-connection-main select[name=verify]", "custom")
        page.select_option("#edit-connection-main select[name=ca_bundle]", bundle)
        page.click("#edit-connection-main form.edit button[type=submit]")
        expect_done("connection main saved")

    switch_to("other-ca")
    refused = through()
    assert refused.headers.get("X-Sidecar-Error") == "upstream-tls"
    switch_to("corp-ca")
    assert through().status_code == 200  # verified against the uploaded bundle
    assert last_auth() == basic_header("websvc", SECOND_PASSWORD)
    page.goto(f"{base}/")
    sync_api.expect(page.locator("#connection-main")).to_contain_text("custom (corp-ca)")
    sync_api.expect(page.locator("#connection-main")).to_contain_text("upstream-tls")
    shot("5-connections")

    # The egress proxies page, from the nav; then via set in the connection form.
    page.click("nav >> text=Egress proxies")
    sync_api.expect(page.locator("#proxy-corp-proxy")).to_contain_text("http://127.0.0.1:9")
    sync_api.expect(page.locator("#proxy-corp-proxy")).to_contain_text("password set")
    assert "unused-pw-Ty31" not in page.content() and "proxysvc" not in page.content()
    shot("6-egress-proxies")
    page.goto(f"{base}/")
    page.click("#edit-connection-main summary")
    page.select_option("#edit-connection-main select[name=via]", "corp-proxy")
    page.click("#edit-connection-main form.edit button[type=submit]")
    expect_done("connection main saved")
    assert "via: corp-proxy" in config.read_text()
    page.goto(f"{base}/egress-proxies")
    sync_api.expect(page.locator("#proxy-corp-proxy")).to_contain_text("main")
    running.stop()

    persisted = config.read_text()
    assert "web" in persisted and "corp-ca" in persisted
    assert SECOND_PASSWORD not in persisted
