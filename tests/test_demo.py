"""The embedded default: ``fhir-sidecar demo --once`` works with nothing but the repo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_once(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo", "--once", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "200  GET" in out and "201  POST" in out
    assert "OAuth client credentials): Patient" in out
    assert "upstream-tls: connection 'demo-default'" in out
    assert "no-route:" in out
    assert "with its OAuth bearer token" in out and " 0 with its OAuth" not in out
    # Secrets the demo generated never appear in what it prints.
    for secret in (tmp_path / "secrets").iterdir():
        assert secret.read_text().strip() not in out + result.stderr
    assert "Traceback" not in result.stderr
