"""The dashboard's delete forms, over plain HTTP with a logged-in session (no browser)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import yaml
from support.sidecar_process import SidecarProcess, free_port, write_config

ADMIN_TOKEN = "forms-admin-token-Qp58"


def test_delete_forms_render_and_delete(tmp_path: Path) -> None:
    admin = f"127.0.0.1:{free_port()}"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "secrets" / "pw").write_text("forms-pw-Lk40\n")
    (tmp_path / "secrets" / "cs").write_text("forms-cs-Zr11\n")
    config = write_config(tmp_path, {
        "admin": {"listen": admin, "token_file": "secrets/admin-token"},
        "basic_auth": {"spare-basic": {"username": "svc", "password_file": "secrets/pw"}},
        "oauth": {"spare-oauth": {"token_url": "https://127.0.0.1:9/token", "client_id": "c",
                                  "client_secret_file": "secrets/cs"}},
        "connections": {"spare-conn": {"url": "https://127.0.0.1:9/fhir"}},
    })
    with SidecarProcess(config, tmp_path / "state"), \
            httpx.Client(base_url=f"http://{admin}", trust_env=False, timeout=30) as client:
        assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code in (200, 303)
        for page, name in (("/basic-auth", "spare-basic"), ("/oauth", "spare-oauth"),
                           ("/connections", "spare-conn")):
            html = client.get(page).text
            form = re.search(r'<form method="post" class="delete">(.*?)</form>', html, re.S)
            assert form is not None, page
            assert f'name="name" value="{name}"' in form.group(1)
            assert f"Delete {name}" in form.group(1)
            csrf = re.search(r'name="_csrf" value="([^"]+)"', form.group(1))
            assert csrf is not None
            client.post(page, data={"_csrf": csrf.group(1), "name": name, "action": "delete"})
            assert name not in client.get(page).text
    assert "spare-basic" not in config.read_text()
    assert "spare-oauth" not in config.read_text()
    assert "spare-conn" not in config.read_text()


def test_saving_a_connection_form_keeps_settings_the_form_does_not_show(tmp_path: Path) -> None:
    admin = f"127.0.0.1:{free_port()}"
    (tmp_path / "admin-token").write_text(ADMIN_TOKEN + "\n")
    config = write_config(tmp_path, {
        "admin": {"listen": admin, "token_file": "admin-token"},
        "connections": {"kept": {"url": "https://127.0.0.1:9/fhir", "read_timeout_seconds": 7,
                                 "rewrite_links": False}},
    })
    with SidecarProcess(config, tmp_path / "state"), \
            httpx.Client(base_url=f"http://{admin}", trust_env=False, timeout=30) as client:
        assert client.post("/login", data={"token": ADMIN_TOKEN}).status_code in (200, 303)
        csrf = re.search(r'name="_csrf" value="([^"]+)"', client.get("/connections").text)
        assert csrf is not None
        saved = client.post("/connections", data={
            "_csrf": csrf.group(1), "name": "kept", "url": "https://127.0.0.1:9/fhir2",
            "listen": "", "auth": "", "verify": "default", "timeout_seconds": "12"})
        assert saved.status_code in (200, 303)
    saved_config = yaml.safe_load(config.read_text())["connections"]["kept"]
    assert saved_config["url"] == "https://127.0.0.1:9/fhir2"  # the form was applied
    assert saved_config["timeout_seconds"] == 12
    assert saved_config["read_timeout_seconds"] == 7
    assert saved_config["rewrite_links"] is False
