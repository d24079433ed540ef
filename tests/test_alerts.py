"""The chart's alerts (helm/fhir-sidecar/templates/prometheusrule.yaml) as Prometheus runs
them: ``promtool check rules`` on the rendered rules, and ``promtool test rules`` with
tests/alerts/alerts-test.yaml, where every alert fires on its failure and stays silent on a
healthy series and on a single blip. Every alert has a ``for:``, a ``severity`` and a
``runbook_url`` whose anchor docs/runbooks.md has, and reads only metrics the sidecar exports.

promtool is Debian's ``prometheus`` package: in CI (``CI=true``, where .ci/run installs it) a
missing promtool fails these tests; elsewhere they are skipped without it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")

from support.alert_rules import UNIT_TESTS, require_promtool, rules_file, run_promtool
from support.promql import exported_names, metric_names

from sidecar.observe.metrics import SidecarMetrics

REPO = Path(__file__).resolve().parents[1]
RUNBOOKS = REPO / "docs" / "runbooks.md"
NEW = {"FhirSidecarCredentialsRejected", "FhirSidecarUpstreamErrors",
       "FhirSidecarUpstreamUnreachable", "FhirSidecarDown"}


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of the headings: lower case, punctuation dropped, spaces to -."""
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.M):
        text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        found.add(text.replace(" ", "-"))
    return found


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    path = rules_file(tmp_path_factory.mktemp("alerts"))
    groups = json.loads(path.read_text(encoding="utf-8"))["groups"]
    return path, [rule for group in groups for rule in group["rules"]]


def test_every_alert_has_for_severity_and_a_runbook_that_exists(
        rules: tuple[Path, list[dict[str, Any]]]) -> None:
    _, found = rules
    names = {rule["alert"] for rule in found}
    assert names >= NEW, names
    anchors = github_anchors(RUNBOOKS.read_text(encoding="utf-8"))
    exported = exported_names(SidecarMetrics().registry)
    for rule in found:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "docs/runbooks.md" and anchor in anchors, (name, url)
        assert anchor == name.lower()  # one section per alert, named after it
        reads = metric_names(rule["expr"])
        if name == "FhirSidecarDown":
            assert reads == {"up"}  # Prometheus' own series of the scrape target
        else:
            assert reads and reads <= exported, (name, reads - exported)
    read = set().union(*(metric_names(r["expr"]) for r in found))
    assert {"fhir_sidecar_upstream_rejections_total",
            "fhir_sidecar_upstream_responses_total"} <= read


def test_the_runbook_url_follows_the_value() -> None:
    from support import helm as chart

    values = chart.load_values(chart.EXAMPLES_DIR / "gateway.yaml")
    values["prometheusRule"] = {"enabled": True, "scrapeJob": "sidecars",
                                "runbookUrl": "https://git.example/fhir-sidecar/runbooks"}
    rule = chart.one(chart.render(values), "PrometheusRule")
    found = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert found["FhirSidecarDown"]["annotations"]["runbook_url"] == \
        "https://git.example/fhir-sidecar/runbooks#fhirsidecardown"
    assert 'job="sidecars"' in found["FhirSidecarDown"]["expr"]


def test_promtool_checks_the_rules_and_runs_their_unit_tests(
        rules: tuple[Path, list[dict[str, Any]]]) -> None:
    require_promtool()
    path, found = rules
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(found)} rules found" in checked.stdout
    tested = run_promtool("test", "rules", str(path.parent / UNIT_TESTS.name))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Each alert is tested firing and silent.
    text = UNIT_TESTS.read_text(encoding="utf-8")
    for rule in found:
        name = rule["alert"]
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", text), name
        assert re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", text), name


def test_a_wrong_expectation_fails_promtool(rules: tuple[Path, list[dict[str, Any]]],
                                           tmp_path: Path) -> None:
    require_promtool()
    path, _ = rules
    (tmp_path / "rules.yaml").write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    broken = UNIT_TESTS.read_text(encoding="utf-8").replace(
        "alertname: FhirSidecarUpstreamErrors\n        exp_alerts: []",
        "alertname: FhirSidecarUpstreamErrors\n        exp_alerts: [{exp_labels: {a: b}}]", 1)
    (tmp_path / "alerts-test.yaml").write_text(broken, encoding="utf-8")
    result = run_promtool("test", "rules", str(tmp_path / "alerts-test.yaml"))
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr
