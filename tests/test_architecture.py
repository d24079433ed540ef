"""The dependency rules (docs/architecture.md#dependency-rules), checked so that they hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sidecar"


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_only_the_proxy_adapter_imports_mitmproxy() -> None:
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "proxy" not in p.relative_to(PACKAGE).parts
                 and any(m == "mitmproxy" or m.startswith("mitmproxy.")
                         for m in imported_modules(p))]
    assert offenders == []


def test_nothing_imports_the_addon_but_entry_points() -> None:
    entry_points = {"runner.py", "proxy/master.py"}
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if str(p.relative_to(PACKAGE)) not in entry_points
                 and p.name != "addon.py"
                 and "sidecar.proxy.addon" in imported_modules(p)]
    assert offenders == []


def test_a_basic_only_sidecar_does_not_load_the_oauth_client_stack(tmp_path: Path) -> None:
    # httpx and authlib cost ~7 MiB of RSS at ready and ~0.1 s of start-up; only OAuth
    # definitions (and the 401 retry of a bearer token) need them.
    config = tmp_path / "sidecar.yaml"
    config.write_text("basic_auth:\n  b: {username: u, password_file: pw}\n"
                      "connections:\n  c: {url: 'https://fhir.example.org/fhir',"
                      " listen: '127.0.0.1:0', auth: {basic: b}}\n")
    (tmp_path / "pw").write_text("secret\n")
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "import sidecar.cli, sidecar.runner\n"
        "from sidecar.live import LiveConfig\n"
        "LiveConfig(Path(sys.argv[1]))\n"
        "print(sorted(m for m in ('httpx', 'authlib', 'sidecar.credentials.oauth')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
