"""The egress proxy keys of the config file: shape errors name the file, field and problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PASSWORD = "pr0xy-pw-never-shown"


def _check(tmp_path: Path, yaml_text: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml_text)
    (tmp_path / "proxy-password").write_text(PASSWORD + "\n")
    return subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", str(config), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "S": "secret"})


CONNECTION = "connections:\n  epic: {url: 'https://fhir.example.org/r4', via: corp}\n"


@pytest.mark.parametrize(("yaml_text", "field", "words"), [
    ("connections:\n  epic: {url: 'https://fhir.example.org/r4', via: corp}\n",
     "connections.epic.via", "no egress proxy named 'corp' (none are defined)"),
    ("egress_proxies:\n  other: {url: 'http://p.example:3128'}\n"
     "oauth:\n  idp: {token_url: 'https://a.example/t', client_id: c, client_secret_env: S,"
     " via: corp}\n", "oauth.idp.via", "no egress proxy named 'corp' (defined: other)"),
    ("egress_proxies:\n  corp: {url: 'socks5://p.example:1080'}\n" + CONNECTION,
     "egress_proxies.corp.url", "is not an absolute http(s) URL"),
    ("egress_proxies:\n  corp: {url: 'http://p.example:3128/path'}\n" + CONNECTION,
     "egress_proxies.corp.url", "without a path"),
    ("egress_proxies:\n  corp: {url: 'http://p.example:3128', tls: {verify: skip}}\n"
     + CONNECTION, "egress_proxies.corp", "tls is only used with an https:// proxy URL"),
    ("egress_proxies:\n  corp: {url: 'http://p.example:3128', username: u}\n" + CONNECTION,
     "egress_proxies.corp", "proxy password: set one of password_file, password_env"),
    ("egress_proxies:\n  corp: {url: 'http://p.example:3128', password_env: S}\n" + CONNECTION,
     "egress_proxies.corp", "a proxy password needs username"),
    ("egress_proxies:\n  corp: {url: 'http://p.example:3128', username: u, password: x}\n"
     + CONNECTION, "egress_proxies.corp.password", "unknown key"),
    ("egress_proxies:\n  corp: {url: 'http://p.example:3128', username: u,"
     " password_file: missing-file}\n" + CONNECTION, "egress_proxies.corp.password_file", ""),
])
def test_egress_proxy_config_errors_name_the_field(tmp_path: Path, yaml_text: str, field: str,
                                                   words: str) -> None:
    result = _check(tmp_path, yaml_text)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    line = next((x for x in output.splitlines()
                 if x.startswith(f"{tmp_path / 'sidecar.yaml'}: {field}: ")), None)
    assert line is not None, output
    assert words in line
    assert "Traceback" not in output


def test_a_valid_egress_proxy_config_passes_check_and_never_shows_the_password(
        tmp_path: Path) -> None:
    result = _check(tmp_path, "egress_proxies:\n  corp: {url: 'http://p.example:3128',"
                              " username: svc, password_file: proxy-password}\n" + CONNECTION)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert PASSWORD not in output
