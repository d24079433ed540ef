"""`fhir-sidecar check --no-files`: the config's shape only, for CI that has no secrets.

config/example.yaml and the config of every helm/values-examples file pass it as shipped;
shape errors still fail it; nothing it names is read (a missing secret is no error here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.sidecar_process import write_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "helm" / "values-examples").glob("*.yaml"))


def check(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_SIDECAR_")}
    return subprocess.run([sys.executable, "-m", "sidecar", "check", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def test_example_config_passes_as_shipped() -> None:
    example = REPO / "config" / "example.yaml"
    full = check("-c", str(example))
    assert full.returncode == 2  # its secrets, key and CA bundle are not in the repository
    assert "does not exist" in full.stderr
    shape = check("--no-files", "-c", str(example))
    assert shape.returncode == 0, shape.stderr
    assert "shape valid (2 connections" in shape.stdout
    assert "were not read (--no-files)" in shape.stdout
    assert shape.stderr == ""


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_helm_example_config_passes_as_shipped(example: Path, tmp_path: Path) -> None:
    pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    from support import helm as chart

    rendered = chart.config_text(chart.render(chart.load_values(example)))
    config = tmp_path / "config.yaml"
    config.write_text(rendered, encoding="utf-8")
    result = check("--no-files", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "shape valid" in result.stdout


def test_shape_errors_still_fail_and_missing_files_do_not(tmp_path: Path) -> None:
    path = write_config(tmp_path, {
        "basic_auth": {"b": {"username": "u", "password_file": "no-such-file"}},
        "connections": {"a": {"url": "https://a.example/fhir", "auth": {"oauth": "nope"},
                              "timeout": 3}},
        "shutdown": {"delay_seconds": -1},
    })
    result = check("--no-files", "-c", str(path))
    assert result.returncode == 2
    assert f"{path}: connections.a.timeout: unknown key" in result.stderr
    assert f"{path}: shutdown.delay_seconds:" in result.stderr
    assert "no-such-file" not in result.stderr
    assert "Traceback" not in result.stderr

    references = write_config(tmp_path, {
        "connections": {"a": {"url": "https://a.example/fhir", "auth": {"oauth": "nope"}}}},
        name="refs.yaml")
    result = check("--no-files", "-c", str(references))
    assert result.returncode == 2
    assert f"{references}: connections.a.auth.oauth: no OAuth definition named 'nope'" \
        in result.stderr

    fine = write_config(tmp_path, {"basic_auth": {"b": {"username": "u",
                                                        "password_file": "no-such-file"}}},
                        name="fine.yaml")
    assert check("--no-files", "-c", str(fine)).returncode == 0
    assert check("-c", str(fine)).returncode == 2  # the full check reads it


def test_no_files_cannot_go_online(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"connections": {}})
    result = check("--no-files", "--online", "-c", str(path))
    assert result.returncode == 2
    assert "cannot be combined with --no-files" in result.stderr
