"""The chart's operations side: disruption budget, autoscaler, alerts, dashboard, `helm test`.

The alerts and the dashboard must only ask for metrics the sidecar really exports (checked
against the live registry of sidecar/observe/metrics.py), and the helm test pod's script is run for
real against a real sidecar's /readyz.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
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

from sidecar.observe.metrics import SidecarMetrics  # noqa: E402

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
        "FhirSidecarAuditBacklog": {"fhir_sidecar_audit_queue_bytes",
                                    "fhir_sidecar_audit_records_total"},
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


# The Service shapes a gateway install can have: connection ports only (the example), the admin
# port too, and neither (a forward proxy only, or a ConfigMap of your own with listenerPorts).
ADMIN_ON_SERVICE = with_values(GATEWAY, service={"exposeAdmin": True})
PROXY_ONLY = with_values(GATEWAY, config={
    **{k: v for k, v in GATEWAY["config"].items() if k != "connections"},
    "proxy": {"listen": "0.0.0.0:8080"},
})
OWN_CONFIG_MAP = with_values(
    {k: v for k, v in GATEWAY.items() if k != "config"},
    existingConfigMap={"name": "fhir-config", "key": "config.yaml",
                       "listenerPorts": [{"name": "epic", "port": 8081}]},
)
SERVICE_SHAPES = {"connection-ports": GATEWAY, "admin-port-too": ADMIN_ON_SERVICE,
                  "proxy-port-only": PROXY_ONLY, "own-configmap": OWN_CONFIG_MAP}


def _test_env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("values", SERVICE_SHAPES.values(), ids=SERVICE_SHAPES.keys())
def test_helm_test_pod_asks_every_port_of_the_gateway_service(values: dict[str, Any]) -> None:
    """Whatever the gateway Service exposes (connection ports, the admin port, neither), the
    test pod is rendered and asks each of its ports; the NetworkPolicy lets it."""
    docs = chart.render(values)
    pod = _test_pod(docs)
    validate(pod)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    service = chart.one(docs, "Service")
    env = _test_env(pod)
    assert env["SERVICE_HOST"] == f"{service['metadata']['name']}.{chart.NAMESPACE}.svc"
    asked = {int(port) for item in env["LISTENER_PORTS"].split(",") if item
             for port in [item.partition("=")[2]]}
    if env["ADMIN_PORT"]:
        asked.add(int(env["ADMIN_PORT"]))
        # The Service's name is one the admin listener answers (anything else gets 421).
        allowed = yaml.safe_load(chart.config_text(docs))["admin"]["allowed_hosts"]
        assert env["SERVICE_HOST"] in allowed
    service_ports = {p["port"] for p in service["spec"]["ports"]}
    assert asked == service_ports
    assert ("admin" in {p["name"] for p in service["spec"]["ports"]}) == bool(env["ADMIN_PORT"])
    container = pod["spec"]["containers"][0]
    assert container["image"] == chart.sidecar_container(docs)["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # With a NetworkPolicy, the test pod may reach every port it asks.
    policy = chart.one(chart.render(with_values(values, networkPolicy={
        "enabled": True, "clients": [{"podSelector": {"matchLabels": {"fhir-client": "true"}}}],
    })), "NetworkPolicy")
    reachable = set()
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            labels = peer.get("podSelector", {}).get("matchLabels", {})
            if "namespaceSelector" not in peer and labels and \
                    labels.items() <= pod["metadata"]["labels"].items():
                reachable |= {p["port"] for p in rule["ports"]}
    assert reachable == service_ports


def test_helm_test_pod_only_in_gateway_mode_and_when_enabled() -> None:
    assert not [d for d in chart.render(SIDECAR) if d["kind"] == "Pod"]
    assert not [d for d in chart.render(with_values(GATEWAY, helmTest={"enabled": False}))
                if d["kind"] == "Pod"]
    policy = chart.one(chart.render(with_values(
        GATEWAY, helmTest={"enabled": False},
        networkPolicy={"enabled": True, "clients": [{"podSelector": {}}]})), "NetworkPolicy")
    assert "helm-test" not in json.dumps(policy)


def _run_test_script(pod: dict[str, Any], env: dict[str, str]
                     ) -> subprocess.CompletedProcess[str]:
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    return subprocess.run([sys.executable, "-c", *container["args"]],
                          env={**os.environ, **_test_env(pod), **env},
                          capture_output=True, text=True, timeout=60, check=False)


class _Upstream:
    """The hospital's FHIR server, as far as the test can tell: a socket that counts who
    connects (and answers nothing)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        count = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                return count
            conn.close()
            count += 1


def test_helm_test_script_gets_only_answers_the_sidecar_makes_itself(tmp_path: Path) -> None:
    """The test pod's script, for real, against a real sidecar with admin, connection and
    forward-proxy listeners: it passes; the FHIR server never even sees a connection (so no
    credentials can leave); it fails on a draining sidecar, on a port where nothing listens
    and on a port where something other than the sidecar answers."""
    pod = _test_pod(chart.render(ADMIN_ON_SERVICE))
    upstream = _Upstream()
    admin, epic, root, proxy = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "password").write_text("hospital-secret")
    config = write_config(tmp_path, {
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "proxy": {"listen": f"127.0.0.1:{proxy}"},
        "basic_auth": {"b": {"username": "hospital", "password_file": "password"}},
        "connections": {
            "epic": {"url": f"https://127.0.0.1:{upstream.port}/fhir",
                     "listen": f"127.0.0.1:{epic}", "auth": {"basic": "b"}},
            # No base path: "/.." still climbs above "/".
            "root": {"url": f"https://localhost:{upstream.port}",
                     "listen": f"127.0.0.1:{root}", "auth": {"basic": "b"}},
        },
        "shutdown": {"delay_seconds": 60},
    })
    listeners = f"epic={epic},root={root},proxy={proxy}"
    env = {"SERVICE_HOST": "127.0.0.1", "ADMIN_PORT": str(admin), "LISTENER_PORTS": listeners,
           "DEADLINE_SECONDS": "10"}
    sidecar = SidecarProcess(config, tmp_path / "state").start()
    try:
        passed = _run_test_script(pod, env)
        assert passed.returncode == 0, passed.stderr
        assert f"admin (127.0.0.1:{admin}): GET /readyz: 200" in passed.stdout
        for name in ("epic", "root", "proxy"):
            assert f"{name} (127.0.0.1:" in passed.stdout
        assert passed.stdout.count("400 bad-request, answered by the sidecar itself") == 3
        assert upstream.connections() == 0
        assert "hospital-secret" not in passed.stdout + sidecar.output

        # Without the admin port on the Service, the listeners alone still make a test.
        alone = _run_test_script(pod, {**env, "ADMIN_PORT": ""})
        assert alone.returncode == 0, alone.stderr
        assert "readyz" not in alone.stdout

        sidecar.signal(signal.SIGTERM)  # draining: /readyz answers 503 for the 60 s delay
        sidecar.wait_for_event("draining")
        failed = _run_test_script(pod, {**env, "DEADLINE_SECONDS": "1"})
        assert failed.returncode == 1
        assert f"admin (127.0.0.1:{admin}): failed: GET /readyz answered 503" in failed.stderr
    finally:
        sidecar.signal(signal.SIGINT)  # cuts the delay short
        assert sidecar.stop() == 0
    assert upstream.connections() == 0

    nothing = _run_test_script(pod, {**env, "ADMIN_PORT": "", "DEADLINE_SECONDS": "1",
                                     "LISTENER_PORTS": f"epic={free_port()}"})
    assert nothing.returncode == 1 and "epic (127.0.0.1:" in nothing.stderr
    wait_until(lambda: sidecar.events("stopped"), 10, message="the sidecar to stop")


def test_helm_test_script_fails_when_something_else_answers() -> None:
    """An answer the sidecar did not make (a plain 400 without X-Sidecar-Error, or a 200) is a
    failure: the probe must be refused by the sidecar itself."""
    pod = _test_pod(chart.render(GATEWAY))

    def handler(status: int, header: str | None) -> type[http.server.BaseHTTPRequestHandler]:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b'{"resourceType": "OperationOutcome"}'
                self.send_response(status)
                if header:
                    self.send_header("X-Sidecar-Error", header)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    for status, header in ((400, None), (200, None), (400, "no-route")):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(status, header))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            result = _run_test_script(pod, {
                "SERVICE_HOST": "127.0.0.1", "ADMIN_PORT": "", "DEADLINE_SECONDS": "1",
                "LISTENER_PORTS": f"other={server.server_address[1]}"})
        finally:
            server.shutdown()
            server.server_close()
        assert result.returncode == 1, (status, header, result.stdout)
        assert f"answered {status} (X-Sidecar-Error: {header})" in result.stderr


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
