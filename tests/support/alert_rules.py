"""The chart's alerting rules as a plain Prometheus rule file, and promtool to check them.

``rules_file(directory)`` renders the chart's PrometheusRule (gateway example, release ``demo`` in
namespace ``fhir``) and writes its groups as ``rules.yaml``, beside a copy of the unit tests
(tests/alerts/alerts-test.yaml, which name that file). Run as a script (``.ci/helm-checks.sh``
does) it then runs ``promtool check rules`` and ``promtool test rules`` and exits with their
status. promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # as a script: `support` is importable

from support import helm as chart  # noqa: E402

UNIT_TESTS = HERE.parent / "alerts" / "alerts-test.yaml"
PROMTOOL = "promtool"


def promtool() -> str | None:
    return shutil.which(PROMTOOL)


def require_promtool() -> str:
    """promtool's path; in CI (``CI=true``) a missing promtool fails the test, elsewhere it
    skips it."""
    import pytest

    found = promtool()
    if found is None:
        message = "promtool is not installed (apt-get install prometheus; .ci/run does)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def rules_file(directory: Path) -> Path:
    values = chart.load_values(chart.EXAMPLES_DIR / "gateway.yaml")
    values["prometheusRule"] = {"enabled": True}
    rule = chart.one(chart.render(values), "PrometheusRule")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "rules.yaml"
    import json  # JSON is YAML: no YAML writer needed

    path.write_text(json.dumps({"groups": rule["spec"]["groups"]}, indent=1), encoding="utf-8")
    shutil.copy(UNIT_TESTS, directory / UNIT_TESTS.name)
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool() or PROMTOOL, *args], capture_output=True, text=True,
                          timeout=120)


def main(argv: list[str]) -> int:
    directory = Path(argv[0])
    rules = rules_file(directory)
    for args in (("check", "rules", str(rules)),
                 ("test", "rules", str(directory / UNIT_TESTS.name))):
        result = run_promtool(*args)
        print(result.stdout + result.stderr, end="")
        if result.returncode != 0:
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
