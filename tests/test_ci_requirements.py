"""In CI a missing tool fails the run; on a developer's machine it skips (issue 26).

The egress tests need tinyproxy. Skipped, they would let a run pass that never checked where
the proxy's credentials go; ``.ci/run`` sets ``FHIR_SIDECAR_CI=1`` so that cannot happen.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.requirements import in_ci, missing

TESTS = Path(__file__).parent


@pytest.mark.parametrize(("env", "expected"), [
    ({}, False),
    ({"FHIR_SIDECAR_CI": "1"}, True),
    ({"CI": "true"}, True),
    ({"CI": "false"}, False),
    ({"CI": "0", "FHIR_SIDECAR_CI": ""}, False),
])
def test_ci_is_told_by_its_variables(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                     expected: bool) -> None:
    for name in ("FHIR_SIDECAR_CI", "CI"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert in_ci() is expected
    outcome = pytest.fail.Exception if expected else pytest.skip.Exception
    with pytest.raises(outcome, match="the tool is missing"):
        missing("the tool is missing")


def test_the_ci_script_sets_the_variable() -> None:
    script = (TESTS.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "\nexport FHIR_SIDECAR_CI=1\n" in script
    # ... before any test runs (the background 3.12 run inherits it too).
    assert script.index("export FHIR_SIDECAR_CI=1") < script.index("-m pytest")


@pytest.mark.parametrize(("ci", "code"), [("1", 1), ("", 0)])
def test_without_tinyproxy_the_egress_tests_fail_in_ci_and_skip_elsewhere(ci: str,
                                                                         code: int) -> None:
    env = {**os.environ, "FHIR_SIDECAR_TEST_TINYPROXY": "/nonexistent/tinyproxy",
           "FHIR_SIDECAR_CI": ci, "CI": ""}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--no-cov", "-q", "-p", "no:randomly",
         "-p", "no:cacheprovider", str(TESTS / "test_egress_proxy.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    last = output.strip().splitlines()[-1]
    if ci:
        assert "error" in last and "passed" not in last, last
        assert "tinyproxy is not installed" in output
    else:
        assert "skipped" in last and "error" not in last and "failed" not in last, last
