"""The dependency rules of design §1, checked so that they keep holding."""

from __future__ import annotations

import ast
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
