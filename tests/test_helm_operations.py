"""The chart's operations side: disruption budget, autoscaler, alerts, dashboard, `helm test`.

The alerts and the dashboard must only ask for metrics the sidecar really exports (checked
against the live registry of sidecar/metrics.py), and the helm test pod's script is run for
real against a real sidecar's /readyz.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

helm_python = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)"
)

from support import helm as chart  # noqa: E402
from support.promql import exported_names, metric_names  # noqa: E402
from support.sidecar_process import SidecarProcess, free_port, wait_until, write_config  # noqa: E402

from sidecar.metrics import SidecarMetrics  # noqa: E402

GATEWAY = chart.load_values(chart.EXAMPLES_DIR / "gateway.yaml")
SIDECAR = chart.load_values(chart.EXAMPLES_DIR / "sidecar.yaml")
EXPORTED = exported_names(SidecarMetrics().registry)


def with_values(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    values = copy.deepcopy(base)
    values.update(changes)
    return values


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return [d["kind"] for d in docs]


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, chart.KUBE_VERSION, strict=True)


# ---- PodDisruptionBudget and HorizontalPodAutoscaler ----------------------------------------


def test_a_disruption_budget_only_with_more_than_one_replica() -> None:
    docs = chart.render(with_values(GATEWAY, replicaCount=2))
    pdb = chart.one(docs, "PodDisruptionBudget")
    validate(pdb)
    assert pdb["spec"]["maxUnavailable"] == 1
    pod_labels = chart.one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    assert "PodDisruptionBudget" not in kinds(chart.render(with_values(GATEWAY, replicaCount=1)))
    # A single pod cannot keep serving through a drain: a budget would only block the drain.
    assert "PodDisruptionBudget" not in kinds(chart.render(SIDECAR))


def test_autoscaler_on_cpu_replaces_the_replica_count() -> None:
    values = with_values(GATEWAY, replicaCount=1, autoscaling={
        "enabled": True, "minReplicas": 3, "maxReplicas": 9, "targetCPUUtilizationPercentage": 60})
    docs = chart.render(values)
    hpa = chart.one(docs, "HorizontalPodAutoscaler")
    validate(hpa)
    deployment = chart.one(docs, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}]
    # The autoscaler owns the replica count; the Deployment must not fight it on upgrades.
    assert "replicas" not in deployment["spec"]
    assert chart.one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "HorizontalPodAutoscaler" not in kinds(chart.render(GATEWAY))


@pytest.mark.parametrize(("change", "message"), [
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "autoscaling.minReplicas (5) is larger than autoscaling.maxReplicas (2)"),
    ({"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}},
     "set resources.requests.cpu"),
    ({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": 0}},
     "/autoscaling/targetCPUUtilizationPercentage"),
    ({"prometheusRule": {"enabled": True, "certificateExpiryDays": 0}},
     "/prometheusRule/certificateExpiryDays"),
], ids=["min above max", "no cpu request", "zero target", "zero expiry days"])
def test_bad_operations_values_are_refused(change: dict[str, Any], message: str) -> None:
    values = copy.deepcopy(GATEWAY)
    for key, value in change.items():
        values[key] = {**values.get(key, {}), **value} if key != "resources" else value
    with pytest.raises(helm_python.HelmError) as failure:
        chart.render_texts(values)
    assert message in str(failure.value)


# ---- alerts and dashboard --------------------------------------------------------------------


def test_the_metric_name_check_can_fail() -> None:
    assert metric_names('sum by (le) (rate(fhir_sidecar_nope_total{a="b"}[5m]))') == {
        "fhir_sidecar_nope_total"}
    assert "fhir_sidecar_nope_total" not in EXPORTED
    assert "fhir_sidecar_requests_total" in EXPORTED
    assert "fhir_sidecar_client_cert_expiry_timestamp_seconds" in EXPORTED


def _rules(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rule = chart.one(docs, "PrometheusRule")
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


@pytest.mark.parametrize("base", [GATEWAY, SIDECAR], ids=["gateway", "sidecar"])
def test_alerts_cover_tokens_tls_reloads_and_certificate_expiry(base: dict[str, Any]) -> None:
    docs = chart.render(with_values(base, prometheusRule={"enabled": True,
                                                          "labels": {"release": "kps"}}))
    assert chart.one(docs, "PrometheusRule")["metadata"]["labels"]["release"] == "kps"
    rules = _rules(docs)
    reads = {name: metric_names(rule["expr"]) for name, rule in rules.items()}
    assert reads == {
        "FhirSidecarCredentialsRejected": {"fhir_sidecar_upstream_rejections_total",
                                           "fhir_sidecar_upstream_responses_total"},
        "FhirSidecarUpstreamErrors": {"fhir_sidecar_upstream_responses_total"},
        "FhirSidecarUpstreamUnreachable": {"fhir_sidecar_request_errors_total",
                                           "fhir_sidecar_requests_total"},
        "FhirSidecarDown": {"up"},  # Prometheus' own series of the scrape target
        "FhirSidecarTokenRequestsFailing": {"fhir_sidecar_token_requests_total"},
        "FhirSidecarUpstreamTlsFailing": {"fhir_sidecar_upstream_tls_failures_total"},
        "FhirSidecarConfigReloadFailing": {"fhir_sidecar_config_reloads_total"},
        "FhirSidecarCaBundleExpiresSoon": {"fhir_sidecar_ca_bundle_expiry_timestamp_seconds"},
        "FhirSidecarClientCertificateExpiresSoon": {
            "fhir_sidecar_client_cert_expiry_timestamp_seconds",
            "fhir_sidecar_oauth_client_cert_expiry_timestamp_seconds"},
    }
    for name, names in reads.items():
        assert names - {"up"} <= EXPORTED, f"{name} reads metrics the sidecar does not export"
    for name in ("FhirSidecarCaBundleExpiresSoon", "FhirSidecarClientCertificateExpiresSoon"):
        assert rules[name]["expr"].endswith("- time() < 14 * 86400"), rules[name]["expr"]
    assert 'result!="success"' in rules["FhirSidecarTokenRequestsFailing"]["expr"]
    assert 'result="failure"' in rules["FhirSidecarConfigReloadFailing"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        # Prometheus, not Helm, fills these in: Helm must have left them as written.
        assert "$labels." in rule["annotations"]["summary"]
    assert "PrometheusRule" not in kinds(chart.render(GATEWAY))


def test_expiry_alerts_follow_certificate_expiry_days() -> None:
    docs = chart.render(with_values(GATEWAY, prometheusRule={"enabled": True,
                                                             "certificateExpiryDays": 30}))
    rules = _rules(docs)
    assert rules["FhirSidecarCaBundleExpiresSoon"]["expr"].endswith("< 30 * 86400")
    # Both halves of the client certificate alert (connections, OAuth definitions).
    assert rules["FhirSidecarClientCertificateExpiresSoon"]["expr"].count("< 30 * 86400") == 2


def _dashboard(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    config_maps = [d for d in docs if d["kind"] == "ConfigMap"
                   and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(config_maps) == 1
    (text,) = config_maps[0]["data"].values()
    return config_maps[0], json.loads(text)


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


@pytest.mark.parametrize("base", [GATEWAY, SIDECAR], ids=["gateway", "sidecar"])
def test_dashboard_parses_and_reads_only_exported_metrics(base: dict[str, Any]) -> None:
    docs = chart.render(with_values(base, grafanaDashboard={
        "enabled": True, "annotations": {"grafana_folder": "FHIR"}}))
    config_map, dashboard = _dashboard(docs)
    validate(config_map)
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "FHIR"}
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in ("Requests by connection and status class", "Latency p50 / p99",
                   "token: time until expiry", "TLS failures by reason", "Config reloads",
                   "Errors by kind", "Error ratio", "Credentials refused",
                   "Token request latency"):
        assert any(wanted in t for t in titles), (wanted, titles)
    expressions = _expressions(dashboard)
    assert len(expressions) >= 8
    for expr in expressions:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= EXPORTED, f"{sorted(names - EXPORTED)} in {expr!r} are not exported"
    read = set().union(*(metric_names(e) for e in expressions))
    assert {"fhir_sidecar_requests_total", "fhir_sidecar_request_duration_seconds_bucket",
            "fhir_sidecar_token_expiry_timestamp_seconds",
            "fhir_sidecar_upstream_tls_failures_total",
            "fhir_sidecar_config_reloads_total", "fhir_sidecar_request_errors_total",
            "fhir_sidecar_upstream_rejections_total", "fhir_sidecar_upstream_responses_total",
            "fhir_sidecar_token_request_duration_seconds_bucket"} <= read
    # A connection variable, and every series with a connection label follows it.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    query = variables["connection"]["query"]["query"]
    assert metric_names(query) == {"fhir_sidecar_requests_total"}
    assert query.replace(" ", "").endswith(",connection)"), query
    assert variables["connection"]["includeAll"] and variables["connection"]["multi"]
    for expr in expressions:
        if "by (connection" in expr:
            assert 'connection=~"$connection"' in expr, expr
    latency = next(p for p in dashboard["panels"] if p["title"].startswith("Latency"))
    quantiles = [re.match(r"histogram_quantile\((0\.\d+),", t["expr"]) for t in latency["targets"]]
    assert [m[1] for m in quantiles if m] == ["0.5", "0.99"]
    assert not [d for d in docs if d["metadata"].get("labels", {}).get("grafana_dashboard")
                and d is not config_map]
    assert not [d for d in chart.render(base) if d["kind"] == "ConfigMap"
                and d["metadata"]["labels"].get("grafana_dashboard")]


# ---- helm test -------------------------------------------------------------------------------


def _test_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert len(pods) == 1
    return pods[0]


# The helm test asks through the Service's admin port, which is there only when asked for.
ADMIN_ON_SERVICE = with_values(GATEWAY, service={"exposeAdmin": True})


def test_helm_test_pod_asks_readyz_through_the_gateway_service() -> None:
    docs = chart.render(ADMIN_ON_SERVICE)
    pod = _test_pod(docs)
    # The Service's name is one the admin listener answers (anything else gets 421).
    assert f"{chart.one(docs, 'Service')['metadata']['name']}.{chart.NAMESPACE}.svc" in (
        yaml.safe_load(chart.config_text(docs))["admin"]["allowed_hosts"])
    validate(pod)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = chart.one(docs, "Service")
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    admin_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "admin")
    assert env["READYZ_URL"] == (f"http://{service['metadata']['name']}."
                                 f"{chart.NAMESPACE}.svc:{admin_port}/readyz")
    container = pod["spec"]["containers"][0]
    assert container["image"] == chart.sidecar_container(docs)["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # With a NetworkPolicy, the test pod (and only it, besides adminClients) may ask.
    policy = chart.one(docs, "NetworkPolicy")
    admin_rules = [r for r in policy["spec"]["ingress"]
                   if {"port": admin_port, "protocol": "TCP"} in r["ports"]]
    selectors = [peer["podSelector"]["matchLabels"] for r in admin_rules for peer in r["from"]]
    assert {**pod["metadata"]["labels"], **selectors[0]} == pod["metadata"]["labels"]
    assert selectors[0]["app.kubernetes.io/component"] == "helm-test"

    assert not [d for d in chart.render(SIDECAR) if d["kind"] == "Pod"]
    assert not [d for d in chart.render(GATEWAY) if d["kind"] == "Pod"]  # not asked for


def _run_test_script(pod: dict[str, Any], url: str, deadline: str
                     ) -> subprocess.CompletedProcess[str]:
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    env = {**os.environ, "READYZ_URL": url, "DEADLINE_SECONDS": deadline}
    return subprocess.run([sys.executable, "-c", *container["args"]], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_helm_test_script_passes_on_a_ready_sidecar_and_fails_otherwise(tmp_path: Path) -> None:
    pod = _test_pod(chart.render(ADMIN_ON_SERVICE))
    admin = free_port()
    config = write_config(tmp_path, {
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "connections": {"a": {"url": "https://a.example/fhir",
                              "listen": f"127.0.0.1:{free_port()}"}},
        "shutdown": {"delay_seconds": 60},
    })
    sidecar = SidecarProcess(config, tmp_path / "state").start()
    try:
        url = f"http://127.0.0.1:{admin}/readyz"
        passed = _run_test_script(pod, url, "10")
        assert passed.returncode == 0, passed.stderr
        assert f"{url}: 200" in passed.stdout
        sidecar.signal(signal.SIGTERM)  # draining: /readyz answers 503 for the 60 s delay
        sidecar.wait_for_event("draining")
        failed = _run_test_script(pod, url, "1")
        assert failed.returncode == 1
        assert "not ready: HTTP Error 503" in failed.stderr
    finally:
        sidecar.signal(signal.SIGINT)  # cuts the delay short
        assert sidecar.stop() == 0
    nothing = _run_test_script(pod, f"http://127.0.0.1:{free_port()}/readyz", "1")
    assert nothing.returncode == 1 and "not ready" in nothing.stderr
    wait_until(lambda: sidecar.events("stopped"), 10, message="the sidecar to stop")


def test_examples_render_every_operations_object() -> None:
    """So that .ci/helm-checks.sh validates them against the Kubernetes schemas."""
    rendered_kinds: set[str] = set()
    for path in chart.examples():
        rendered_kinds.update(kinds(chart.render(chart.load_values(path))))
    assert {"PodDisruptionBudget", "HorizontalPodAutoscaler", "PrometheusRule", "Pod"} <= \
        rendered_kinds


@pytest.mark.parametrize("base", [GATEWAY, SIDECAR], ids=["gateway", "sidecar"])
def test_notes_point_only_at_documents_that_exist(base: dict[str, Any]) -> None:
    texts = chart.render_texts(base)
    notes = next(v for k, v in texts.items() if k.endswith("NOTES.txt"))
    documents = re.findall(r"[\w./-]+\.md\b", notes)
    assert documents, notes
    for document in documents:
        assert (chart.REPO / document).is_file(), f"NOTES.txt names {document}, which is missing"
    headings = [line.lstrip("#").strip() for document in documents
                for line in (chart.REPO / document).read_text(encoding="utf-8").splitlines()
                if line.startswith("#")]
    for section in re.findall(r'section "([^"]+)"', notes):
        assert section in headings, f"{documents} have no section {section!r}"
