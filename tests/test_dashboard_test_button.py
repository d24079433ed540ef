"""The dashboard's Test buttons in a real headless browser (Debian's chromium driven by
Playwright): log in, press Test on a working connection, on one whose CA does not trust its
server and on an OAuth definition (the real oidc-provider), and read the steps; then the same
in read-only mode, where the forms are hidden and Test still works. Screenshots of each page go
to the test's tmp folder."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar

CHROMIUM = Path("/usr/bin/chromium")
ADMIN_TOKEN = "button-admin-token-Qw19"
DEADLINE = 60.0

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is missing (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def browser_page() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def press_test(page: Any, kind: str, name: str) -> dict[str, tuple[str, str]]:
    """Press the Test button of ``kind``/``name`` and read the steps shown: {step: (status,
    text)}. A press within a second of the last test of that name is answered "Not tested"
    (the rate limit); it is pressed again once the page says so, until a deadline."""
    area = page.locator(f"#test-result-{kind}-{name}")
    summary = area.locator(".test-summary")
    deadline = time.monotonic() + DEADLINE
    while True:
        page.click(f"#test-{kind}-{name}")
        sync_api.expect(summary).not_to_have_text("Testing…", timeout=DEADLINE * 1000)
        text = summary.text_content() or ""
        if not (text.startswith("Not tested") and "ago" in text) or \
                time.monotonic() > deadline:
            break
        page.wait_for_timeout(300)  # the page said: too soon; press again shortly
    assert not text.startswith("Not tested"), text
    found = {}
    for item in area.locator("li.step").all():
        found[item.get_attribute("data-step")] = (item.get_attribute("data-status"),
                                                  item.text_content() or "")
    return found


def test_test_buttons_show_the_steps(tmp_path: Path, pki: TestPKI, upstreams: Any,
                                     oauth_provider: OAuthTestProvider,
                                     browser_page: Any, start_sidecar: StartSidecar) -> None:
    page = browser_page
    good, other_ca = upstreams.get("good"), upstreams.get("other_ca")
    admin = f"127.0.0.1:{free_port()}"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (secrets / "pw").write_text(UPSTREAM_PASSWORD + "\n")
    (secrets / "client").write_text(str(oauth_provider.clients["basic"].secret) + "\n")
    trusted = {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}
    settings = {
        "admin": {"listen": admin, "token_file": "secrets/admin-token"},
        "basic_auth": {"up": {"username": UPSTREAM_USER, "password_file": "secrets/pw"}},
        "oauth": {"prov": {"token_url": oauth_provider.token_url,
                           "client_id": oauth_provider.clients["basic"].client_id,
                           "client_secret_file": "secrets/client",
                           "scopes": list(oauth_provider.scopes),
                           "tls": {"verify": "custom",
                                   "ca_bundle": str(oauth_provider.ca_bundle)}}},
        "connections": {
            "main": {"url": good.base_url, "auth": {"basic": "up"}, "tls": trusted},
            "wrong-ca": {"url": other_ca.base_url, "auth": {"basic": "up"}, "tls": trusted}},
    }
    base = f"http://{admin}"
    shots = tmp_path / "screenshots"
    shots.mkdir()

    def shot(name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    def check_connections(label: str) -> None:
        page.goto(f"{base}/")
        working = press_test(page, "connections", "main")
        assert [status for status, _ in working.values()] == ["ok"] * 4, working
        assert "localhost resolved to 127.0.0.1" in working["connect"][1]
        assert "TLSv1." in working["tls"][1] and "certificate: CN=localhost" in working["tls"][1]
        assert "basic_auth.up" in working["credentials"][1]
        assert "200 OK: CapabilityStatement, FHIR 4.0.1" in working["metadata"][1]
        sync_api.expect(page.locator("#test-result-connections-main .test-summary")
                        ).to_contain_text("Works")
        refused = press_test(page, "connections", "wrong-ca")
        assert refused["connect"][0] == "ok"
        assert refused["tls"][0] == "failed"
        assert "is not signed by a CA in" in refused["tls"][1], refused["tls"]
        assert refused["credentials"][0] == refused["metadata"][0] == "skipped"
        sync_api.expect(page.locator("#test-result-connections-wrong-ca .test-summary")
                        ).to_contain_text("Failed")
        shot(f"{label}-connections")

    def check_oauth(label: str) -> None:
        page.goto(f"{base}/oauth")
        # The sidecar's own first fetch (counted on arrival) must not land inside the count.
        wait_until(lambda: oauth_provider.stats()["token_requests"] >= 1, DEADLINE,
                   message="the sidecar's first token request")
        before = oauth_provider.stats()["token_requests"]
        found = press_test(page, "oauth", "prov")
        assert [status for status, _ in found.values()] == ["ok"] * 3, found
        assert "fetched a new token" in found["credentials"][1]  # the page asks fresh=1
        assert oauth_provider.stats()["token_requests"] == before + 1
        shot(f"{label}-oauth")

    running = start_sidecar(settings, directory=tmp_path)
    config = running.config_path
    # Before logging in, the buttons are there but need a session.
    page.goto(f"{base}/")
    sync_api.expect(page.locator("#connection-main button.test-button")).to_be_disabled()
    page.click("#login-link")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#login-form button[type=submit]")
    sync_api.expect(page.locator("#done")).to_contain_text("logged in")
    assert page.locator("form.edit").count() > 0  # writable: the forms are shown

    check_connections("1-writable")
    check_oauth("2-writable")

    mode = config.stat().st_mode
    os.chmod(config, 0o444)
    try:
        page.goto(f"{base}/")
        sync_api.expect(page.locator("#read-only")).to_contain_text("read-only")
        assert page.locator("form.edit").count() == 0  # no forms in read-only mode
        check_connections("3-read-only")
        check_oauth("4-read-only")
    finally:
        os.chmod(config, stat.S_IMODE(mode))
    running.stop()

    assert sorted(p.name for p in shots.iterdir()) == [
        "1-writable-connections.png", "2-writable-oauth.png", "3-read-only-connections.png",
        "4-read-only-oauth.png"]
    assert ADMIN_TOKEN not in page.content()
