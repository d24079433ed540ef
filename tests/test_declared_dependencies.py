"""pyproject.toml declares every distribution the sidecar's code imports.

A package that only arrives as somebody else's dependency (pyOpenSSL and ruamel.yaml through
mitmproxy, joserfc through authlib) disappears or changes under us when they change theirs.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    found = set()
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert name is not None, requirement
        found.add(_normalise(name.group(0)))
    return found


def imported_top_level_modules() -> dict[str, str]:
    """Every top-level module imported anywhere in sidecar/ (also inside functions), with a
    file that imports it."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_imported_distribution_is_declared() -> None:
    declared = declared_distributions()
    by_module = packages_distributions()
    missing = []
    for module, where in sorted(imported_top_level_modules().items()):
        if module == "sidecar" or module in sys.stdlib_module_names:
            continue
        distributions = {_normalise(d) for d in by_module.get(module, [])}
        assert distributions, f"{module} (imported in {where}) belongs to no installed package"
        if not distributions & declared:
            missing.append(f"{module} ({', '.join(sorted(distributions))}; {where})")
    assert missing == [], f"imported but not declared in pyproject.toml: {missing}"


def test_the_yaml_library_is_the_one_the_code_uses() -> None:
    modules = imported_top_level_modules()
    assert "ruamel" in modules and "yaml" not in modules  # one library, one dialect
    assert "pyyaml" not in declared_distributions()
