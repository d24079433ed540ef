"""Health and trends in a real headless browser (Debian's chromium driven by Playwright): log
in, read the status lights of a working connection (green), of one whose CA does not trust its
server (red) and of one whose CA bundle expires in 20 days (amber), the sparkline SVG (and
that the page refreshes it by itself), relative times with the exact UTC time on hover, the
OAuth token's lifetime bar (the real oidc-provider), and the days left of a CA bundle that
expires soon; then the same in read-only mode. Screenshots of each
page go to the test's tmp folder (docs/admin-api.md#health-and-trends)."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.glance import bundle_with_soon_expiring_ca
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port
from support.sidecars import StartSidecar

CHROMIUM = Path("/usr/bin/chromium")
ADMIN_TOKEN = "glance-admin-token-Rt62"
DEADLINE_MS = 60_000
COLOURS = {"green": "rgb(46, 125, 50)", "amber": "rgb(249, 168, 37)", "red": "rgb(198, 40, 40)"}
EXACT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")
PAGES = (("connections", "/"), ("basic-auth", "/basic-auth"), ("oauth", "/oauth"),
         ("ca-bundles", "/ca-bundles"))

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


def test_lights_trends_times_and_expiry_in_the_browser(
        tmp_path: Path, pki: TestPKI, upstreams: Any, oauth_provider: OAuthTestProvider,
        browser_page: Any, start_sidecar: StartSidecar) -> None:
    page = browser_page
    problems: list[str] = []  # script errors and refused resources (the CSP) fail the test
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error"
            and "404" not in m.text else None)  # 404s: named by the next line, with the URL
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400
            and not r.url.endswith("/favicon.ico") else None)  # the dashboard has no icon
    good, other_ca = upstreams.get("good"), upstreams.get("other_ca")
    admin = f"127.0.0.1:{free_port()}"
    ports = {"main": free_port(), "wrong-ca": free_port()}
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
            "main": {"url": good.base_url, "listen": f"127.0.0.1:{ports['main']}",
                     "auth": {"basic": "up"}, "tls": trusted},
            "wrong-ca": {"url": other_ca.base_url, "listen": f"127.0.0.1:{ports['wrong-ca']}",
                         "auth": {"basic": "up"}, "tls": trusted},
            "tokens": {"url": good.base_url, "auth": {"oauth": "prov"}, "tls": trusted}},
    }
    base = f"http://{admin}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    soon_bundle = bundle_with_soon_expiring_ca(pki, "browser-soon", 5.5)
    later_bundle = bundle_with_soon_expiring_ca(pki, "browser-later", 20.5)

    def send(name: str, count: int) -> set[int]:
        return {httpx.get(f"http://127.0.0.1:{ports[name]}/metadata", timeout=30,
                          trust_env=False).status_code for _ in range(count)}

    def row(name: str) -> Any:
        return page.locator(f"#connection-{name}")

    def expect_light(name: str, light: str) -> None:
        cell = row(name).locator("td.health")
        sync_api.expect(cell).to_have_attribute("data-light", light)
        colour = cell.locator(".light").evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour == COLOURS[light], (name, colour)

    def expect_exact_on_hover(moment: Any, words: str) -> None:
        sync_api.expect(moment).to_have_text(re.compile(words))
        moment.hover()
        assert EXACT.match(moment.get_attribute("title") or ""), moment.get_attribute("title")
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", moment.get_attribute("datetime"))

    def check_pages(label: str, wrong_ca_errors: int) -> None:
        page.goto(f"{base}/")
        expect_light("main", "green")
        expect_light("wrong-ca", "red")
        sync_api.expect(row("wrong-ca").locator("td.health .reason")).to_contain_text(
            "failing: upstream-tls")
        expect_light("soon", "red")  # its CA bundle expires in 5 days
        expect_light("later", "amber")  # its CA bundle expires in 20 days
        sync_api.expect(row("later").locator("td.health .reason")).to_contain_text(
            "CA bundle expires in 20 days")
        sync_api.expect(row("later").locator(".expiry")).to_have_attribute("data-light", "amber")
        sync_api.expect(row("soon").locator(".expiry")).to_have_attribute("data-light", "red")
        sync_api.expect(row("soon").locator(".expiry")).to_contain_text("CA: 5 days left")
        expect_exact_on_hover(row("soon").locator(".expiry time"), r"^5 days left$")
        # Sparklines: one per connection, with both series of 60 minutes.
        assert page.locator("svg.sparkline").count() == 5
        spark = row("wrong-ca").locator("svg.sparkline")
        sync_api.expect(spark).to_have_attribute("data-errors", str(wrong_ca_errors))
        for series in ("requests", "errors"):
            points = spark.locator(f"polyline.{series}").get_attribute("points") or ""
            assert len(points.split()) == 60, points
        # Relative times, the exact UTC time on hover.
        expect_exact_on_hover(row("wrong-ca").locator("td.last-error time"),
                              r"^(just now|\d+ s ago|\d+ min ago)$")
        bar = row("tokens").locator("svg.token-bar")
        sync_api.expect(bar).to_have_class(re.compile(r"\busable\b"))
        assert 0 < int(bar.get_attribute("data-percent") or "0") <= 100
        expect_exact_on_hover(row("tokens").locator("td.token time"), r"^in \d+ (min|s)$")
        # The rows refresh by themselves: new requests show up without reloading the page.
        before = int(row("main").locator("svg.sparkline").get_attribute("data-requests") or 0)
        assert send("main", 2) == {200}
        sync_api.expect(row("main").locator("svg.sparkline")).to_have_attribute(
            "data-requests", str(before + 2), timeout=DEADLINE_MS)
        page.screenshot(path=str(shots / f"{label}-connections.png"), full_page=True)

        page.goto(f"{base}/oauth")
        expect_exact_on_hover(page.locator("#oauth-prov time").first, r"^in \d+ (min|s)$")
        page.goto(f"{base}/ca-bundles")
        expiry = page.locator("#bundle-soon-ca td.bundle-expiry .expiry")
        sync_api.expect(expiry).to_have_attribute("data-light", "red")
        sync_api.expect(expiry).to_have_text("5 days left")
        expect_exact_on_hover(expiry.locator("time"), r"^5 days left$")
        sync_api.expect(page.locator("#bundle-corp-ca td.bundle-expiry .expiry")
                        ).to_have_attribute("data-light", "green")
        for name, path in PAGES:
            page.goto(f"{base}{path}")
            page.screenshot(path=str(shots / f"{label}-{name}.png"), full_page=True)

    running = start_sidecar(settings, directory=tmp_path)
    config = running.config_path
    api = httpx.Client(base_url=f"{base}/api", trust_env=False, timeout=30,
                       headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    for name, bundle in (("soon-ca", soon_bundle), ("later-ca", later_bundle),
                         ("corp-ca", pki.ca_bundle_path)):
        uploaded = api.put(f"/ca-bundles/{name}", content=bundle.read_bytes(),
                           headers={"Content-Type": "application/x-pem-file"})
        assert uploaded.status_code == 201, uploaded.text
    # A definition whose secret the API caller gives: a config-file secret would be refused
    # under another CA bundle (docs/admin-api.md#credentials-go-only-to-known-upstreams).
    made = api.put("/basic-auth/api-made", json={"username": UPSTREAM_USER,
                                                 "password": UPSTREAM_PASSWORD})
    assert made.status_code == 201, made.text
    ports["soon"] = free_port()
    made = api.put("/connections/soon", json={
        "url": good.base_url, "listen": f"127.0.0.1:{ports['soon']}",
        "auth": {"basic": "api-made"}, "tls": {"verify": "custom", "ca_bundle": "soon-ca"}})
    assert made.status_code == 201, made.text
    ports["later"] = free_port()
    made = api.put("/connections/later", json={
        "url": good.base_url, "listen": f"127.0.0.1:{ports['later']}",
        "auth": {"basic": "api-made"}, "tls": {"verify": "custom", "ca_bundle": "later-ca"}})
    assert made.status_code == 201, made.text
    assert send("main", 2) == {200}
    assert send("later", 1) == {200}
    assert send("soon", 1) == {200}
    assert send("wrong-ca", 3) == {502}

    page.goto(f"{base}/")
    page.click("#login-link")
    page.fill("#token", ADMIN_TOKEN)
    page.click("#login-form button[type=submit]")
    sync_api.expect(page.locator("#done")).to_contain_text("logged in")
    assert page.locator("form.edit").count() > 0  # writable: the forms are shown
    check_pages("1-writable", 3)

    mode = config.stat().st_mode
    os.chmod(config, 0o444)
    try:
        page.goto(f"{base}/")
        sync_api.expect(page.locator("#read-only")).to_contain_text("read-only")
        assert page.locator("form.edit").count() == 0  # no forms in read-only mode
        assert send("wrong-ca", 3) == {502}
        check_pages("2-read-only", 6)
    finally:
        os.chmod(config, stat.S_IMODE(mode))
    api.close()
    running.stop()

    assert sorted(p.name for p in shots.iterdir()) == sorted(
        f"{label}-{name}.png" for label in ("1-writable", "2-read-only")
        for name, _ in PAGES)
    assert problems == []
    assert ADMIN_TOKEN not in page.content()
