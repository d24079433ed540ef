"""helm/fhir-sidecar/README.md is generated from values.yaml's comments and must not drift."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / ".ci" / "chart_readme.py"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_readme", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_committed_chart_readme_matches_values_yaml() -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_every_value_has_a_row_with_type_default_and_meaning() -> None:
    import yaml

    values = yaml.safe_load((REPO / "helm/fhir-sidecar/values.yaml").read_text())
    readme = (REPO / "helm/fhir-sidecar/README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines()
            if line.startswith("| `")}
    for top in values:
        assert top in rows or any(k.startswith(f"{top}.") for k in rows), top
    assert "| `config.shutdown` | object or null | " \
           '`{"delay_seconds": 5, "drain_seconds": 30}`' in rows["config.shutdown"]
    assert rows["autoscaling.targetCPUUtilizationPercentage"].startswith(
        "| `autoscaling.targetCPUUtilizationPercentage` | integer | `70` | ")


def test_an_undocumented_value_is_an_error_and_a_stale_readme_is_drift(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = generator()
    text = "# Documented.\na: 1\nb:\n  # Inside.\n  c: true\n  d: x\n"
    rows, problems = readme.rows(text, {"properties": {"a": {"type": ["integer", "null"]}}})
    assert problems == ["b.d: no comment above it in values.yaml"]
    assert rows[0] == "| `a` | integer or null | `1` | Documented. |"
    assert rows[1] == "| `b.c` | boolean | `true` | Inside. |"

    stale = tmp_path / "README.md"
    stale.write_text("old\n")
    monkeypatch.setattr(readme, "README", stale)
    assert readme.main(["--check"]) == 1
    assert readme.main([]) == 0 and readme.main(["--check"]) == 0
