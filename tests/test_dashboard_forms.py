"""The dashboard's forms over plain HTTP with a logged-in session (no browser): definitions made
in the dashboard can be deleted there; definitions the config file makes read files on the host
and stay read-only; a form never smuggles in a file path."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import yaml
from support.sidecar_process import free_port
from support.sidecars import StartSidecar

ADMIN_TOKEN = "forms-admin-token-Qp58"
CONFIG_PASSWORD = "forms-pw-Lk40"


def _csrf(html: str) -> str:
    found = re.search(r'name="_csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def test_delete_forms_render_and_delete(tmp_path: Path, start_sidecar: StartSidecar) -> None:
    admin = f"127.0.0.1:{free_port()}"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "secrets" / "pw").write_text(CONFIG_PASSWORD + "\n")
    config = start_sidecar({
        "admin": {"listen": admin, "token_file": "secrets/admin-token"},
        "basic_auth": {"from-config": {"username": "svc", "password_file": "secrets/pw"}},
        "connections": {"spare-conn": {"url": "https://127.0.0.1:9/fhir"}},
    }, directory=tmp_path).config_path
    with httpx.Client(base_url=f"http://{admin}", trust_env=False, timeout=30,
                      follow_redirects=True) as client:
        assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code in (200, 303)
        csrf = _csrf(client.get("/basic-auth").text)
        made = client.post("/basic-auth", data={"_csrf": csrf, "action": "save",
                                                "name": "spare-basic", "username": "u",
                                                "password": "forms-new-pw-Hh31"})
        assert made.status_code == 200 and "created" in made.text, made.text
        made = client.post("/oauth", data={"_csrf": csrf, "action": "save",
                                           "name": "spare-oauth", "client_id": "c",
                                           "token_url": "https://127.0.0.1:9/token",
                                           "client_secret": "forms-cs-Zr11"})
        assert made.status_code == 200 and "created" in made.text, made.text

        for page, name in (("/basic-auth", "spare-basic"), ("/oauth", "spare-oauth"),
                           ("/connections", "spare-conn")):
            html = client.get(page).text
            form = re.search(rf'<form method="post" class="delete">(\s*<input[^>]*>)*\s*'
                             rf'<input type="hidden" name="name" value="{name}">(.*?)</form>',
                             html, re.S)
            assert form is not None, page
            assert f"Delete {name}" in form.group(0)
            client.post(page, data={"_csrf": _csrf(form.group(0)), "name": name,
                                    "action": "delete"})
            assert name not in client.get(page).text

        # The config file's definition is shown, read-only: no edit or delete form, and a
        # forged delete is refused.
        html = client.get("/basic-auth").text
        assert 'id="edit-basic-from-config"' in html and "edit the config file" in html
        assert 'name="name" value="from-config"' not in html
        forged = client.post("/basic-auth", data={"_csrf": csrf, "name": "from-config",
                                                  "action": "delete"})
        assert forged.status_code == 409 and "comes from the config file" in forged.text
        # A form field naming a file is refused, whether or not the file exists.
        for path in (str(tmp_path / "secrets" / "pw"), str(tmp_path / "no-such-file")):
            smuggled = client.post("/basic-auth", data={"_csrf": csrf, "action": "save",
                                                        "name": "smuggled", "username": "u",
                                                        "password_file": path})
            assert smuggled.status_code == 422 and "password_file" in smuggled.text
            assert CONFIG_PASSWORD not in smuggled.text
    text = config.read_text()
    assert "spare-basic" not in text and "spare-oauth" not in text
    assert "spare-conn" not in text and "smuggled" not in text
    assert "from-config" in text


def test_saving_a_connection_form_keeps_settings_the_form_does_not_show(
        tmp_path: Path, start_sidecar: StartSidecar) -> None:
    admin = f"127.0.0.1:{free_port()}"
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    config = start_sidecar({
        "admin": {"listen": admin, "token_file": "admin-token"},
        "connections": {"kept": {"url": "https://127.0.0.1:9/fhir", "read_timeout_seconds": 7,
                                 "rewrite_links": False},
                        "implicit": {"url": "https://127.0.0.1:9/fhir"}},
    }, directory=tmp_path).config_path
    with httpx.Client(base_url=f"http://{admin}", trust_env=False, timeout=30) as client:
        assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code in (200, 303)
        csrf = re.search(r'name="_csrf" value="([^"]+)"', client.get("/connections").text)
        assert csrf is not None
        saved = client.post("/connections", data={
            "_csrf": csrf.group(1), "name": "kept", "url": "https://127.0.0.1:9/fhir2",
            "listen": "", "auth": "", "verify": "default", "timeout_seconds": "12"})
        assert saved.status_code in (200, 303)
        saved = client.post("/connections", data={
            "_csrf": csrf.group(1), "name": "implicit", "url": "https://127.0.0.1:9/fhir3",
            "listen": "", "auth": "", "verify": "default"})
        assert saved.status_code in (200, 303)
    # Defaults the file left implicit are not written into it by a form save.
    implicit = yaml.safe_load(config.read_text())["connections"]["implicit"]
    assert implicit["url"] == "https://127.0.0.1:9/fhir3"  # the form was applied
    assert not {"rewrite_links", "read_timeout_seconds"} & set(implicit), implicit
    saved_config = yaml.safe_load(config.read_text())["connections"]["kept"]
    assert saved_config["url"] == "https://127.0.0.1:9/fhir2"  # the form was applied
    assert saved_config["timeout_seconds"] == 12
    assert saved_config["read_timeout_seconds"] == 7
    assert saved_config["rewrite_links"] is False
