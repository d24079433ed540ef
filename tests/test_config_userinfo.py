"""URLs with a user name or password in them are config errors that never echo the password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PASSWORD = "hunter2-in-url"


@pytest.mark.parametrize(("yaml_text", "field"), [
    (f"connections:\n  epic: {{url: 'https://svc:{PASSWORD}@fhir.example.org/r4'}}\n",
     "connections.epic.url"),
    (f"connections:\n  epic: {{url: 'https://:{PASSWORD}@fhir.example.org/r4?x=1'}}\n",
     "connections.epic.url"),
    (f"connections:\n  epic: {{url: 'ftp://svc:{PASSWORD}@fhir.example.org/r4'}}\n",
     "connections.epic.url"),
    ("oauth:\n  idp: {token_url: 'https://client:" + PASSWORD + "@auth.example.org/token',"
     " client_id: c, client_secret_env: S}\n", "oauth.idp.token_url"),
    ("oauth:\n  idp: {discover_from: 'https://" + PASSWORD + "@fhir.example.org/r4',"
     " client_id: c, client_secret_env: S}\n", "oauth.idp.discover_from"),
    (f"egress_proxies:\n  corp: {{url: 'http://svc:{PASSWORD}@proxy.corp.example:3128'}}\n",
     "egress_proxies.corp.url"),
])
def test_userinfo_in_a_url_is_a_config_error_naming_the_field(tmp_path: Path, yaml_text: str,
                                                              field: str) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml_text)
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "S": "secret"})
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"{config}: {field}: must not contain a user name or password" in output
    assert PASSWORD not in output
    assert "Traceback" not in output


def test_an_at_sign_in_the_path_is_not_userinfo(tmp_path: Path) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text("connections:\n  epic: {url: 'https://fhir.example.org/r4/@home'}\n")
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
