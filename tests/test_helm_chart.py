"""The Helm chart, rendered offline for every example values file (helm/values-examples/).

What users rely on: Secrets are never mounted with subPath (it would hide rotations), probes hit
the admin port the config really listens on, the container is non-root with a read-only root
filesystem, bad values are refused with a clear message, and the config the chart renders passes
`fhir-sidecar check` with the files the pod would have mounted.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

helm_python = pytest.importorskip(
    "helm_python", reason="helm-python-sdk is not installed (pip install helm-python-sdk)"
)

from support import helm as chart  # noqa: E402  (after the skip: it needs no helm, but is moot)
from support.sidecar_process import SidecarProcess  # noqa: E402

EXAMPLES = {path.stem: path for path in chart.examples()}
GATEWAYS = [name for name, path in EXAMPLES.items() if chart.load_values(path)["mode"] == "gateway"]


@functools.cache
def rendered(example: str) -> list[dict[str, Any]]:
    return chart.render(chart.load_values(EXAMPLES[example]))


def config_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(chart.config_text(docs))
    return config


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def test_examples_cover_both_shapes_and_extras() -> None:
    assert {"sidecar", "gateway", "servicemonitor", "custom-ca"} <= set(EXAMPLES)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_lint_strict_passes(example: str) -> None:
    assert chart.lint(chart.load_values(EXAMPLES[example])) == []


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_no_secret_is_mounted_with_subpath(example: str) -> None:
    spec = chart.pod_spec(rendered(example))
    secret_volumes = {
        v["name"]
        for v in spec["volumes"]
        if "secret" in v or any("secret" in s for s in v.get("projected", {}).get("sources", []))
    }
    assert secret_volumes, "the examples all use Secrets; none were found"
    for container in spec.get("initContainers", []) + spec["containers"]:
        for mount in container.get("volumeMounts", []):
            if mount["name"] in secret_volumes:
                assert "subPath" not in mount and "subPathExpr" not in mount, mount
    # The sidecar's config and CA bundles must follow edits too: no subPath anywhere on it.
    for mount in chart.sidecar_container(rendered(example))["volumeMounts"]:
        assert "subPath" not in mount and "subPathExpr" not in mount, mount


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_probes_point_at_the_admin_port(example: str) -> None:
    docs = rendered(example)
    container = chart.sidecar_container(docs)
    admin_listen = config_of(docs)["admin"]["listen"]
    # Kubelet probes connect to the pod IP: a loopback admin listener would fail them all.
    assert admin_listen.rsplit(":", 1)[0] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path
        port = ports.get(get["port"], get["port"])
        assert port == port_of(admin_listen), f"{probe} goes to {port}, admin is {admin_listen}"


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_runs_as_non_root_with_a_read_only_root_filesystem(example: str) -> None:
    docs = rendered(example)
    spec = chart.pod_spec(docs)
    container = chart.sidecar_container(docs)
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert (sc.get("seccompProfile") or spec["securityContext"]["seccompProfile"]) == {
        "type": "RuntimeDefault"
    }
    assert sc.get("runAsUser", 1) != 0
    # The one writable place the process needs: its state dir (mitmproxy's confdir), plus /tmp.
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for writable in (env["FHIR_SIDECAR_STATE_DIR"], "/tmp"):
        assert "emptyDir" in volumes[mounts[writable]["name"]]
        assert not mounts[writable].get("readOnly")
    if example in GATEWAYS:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_every_file_the_config_names_is_mounted(example: str) -> None:
    docs = rendered(example)
    container = chart.sidecar_container(docs)
    mount_paths = [PurePosixPath(m["mountPath"]) for m in container["volumeMounts"]]
    refs = chart.file_refs(config_of(docs))
    assert refs
    for field, path in refs:
        assert any(PurePosixPath(path).is_relative_to(m) for m in mount_paths), (field, path)
    # And the config itself is where the container is told to read it.
    config_path = PurePosixPath(container["args"][container["args"].index("-c") + 1])
    assert any(config_path.parent == m for m in mount_paths)


@pytest.mark.parametrize("example", GATEWAYS)
def test_gateway_service_exposes_each_listener(example: str) -> None:
    docs = rendered(example)
    config = config_of(docs)
    listeners = {port_of(c["listen"]) for c in config["connections"].values() if "listen" in c}
    service = chart.one(docs, "Service")
    service_ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert listeners <= set(service_ports)
    container_ports = {
        p["name"]: p["containerPort"] for p in chart.sidecar_container(docs)["ports"]
    }
    for port, entry in service_ports.items():
        assert container_ports[entry["targetPort"]] == port
    labels = chart.one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_servicemonitor_scrapes_metrics_on_the_admin_port() -> None:
    docs = rendered("servicemonitor")
    monitor = chart.one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "admin"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    service = chart.one(docs, "Service")
    assert "admin" in {p["name"] for p in service["spec"]["ports"]}
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )


@pytest.mark.parametrize("example", GATEWAYS)
def test_admin_port_is_on_the_service_only_when_asked(example: str) -> None:
    values = chart.load_values(EXAMPLES[example])
    monitored = values.get("serviceMonitor", {}).get("enabled", False)
    docs = rendered(example)
    ports = {p["name"] for p in chart.one(docs, "Service")["spec"]["ports"]}
    allowed = config_of(docs)["admin"].get("allowed_hosts", [])
    assert ("admin" in ports) == monitored, ports
    assert bool(allowed) == monitored
    # Probes reach the pod's admin port without the Service either way.
    assert "admin" in {p["name"] for p in chart.sidecar_container(docs)["ports"]}

    asked = copy.deepcopy(values)
    asked.setdefault("service", {})["exposeAdmin"] = True
    asked_docs = chart.render(asked)
    assert "admin" in {p["name"] for p in chart.one(asked_docs, "Service")["spec"]["ports"]}
    service = chart.one(asked_docs, "Service")["metadata"]["name"]
    hosts = config_of(asked_docs)["admin"]["allowed_hosts"]
    assert service in hosts and any(
        h.startswith(f"{service}.") and h.endswith(".svc") for h in hosts
    )


@pytest.mark.parametrize("example", GATEWAYS)
def test_gateway_listeners_answer_the_services_names(example: str) -> None:
    # Apps call http://<service>:<port>: that Host must not get 421 misdirected
    # (docs/callers.md); the Service maps each listener's own port, so the names are enough.
    docs = rendered(example)
    service = chart.one(docs, "Service")["metadata"]["name"]
    config = config_of(docs)
    listeners = {name: conn for name, conn in config.get("connections", {}).items()
                 if conn.get("listen")}
    assert listeners or config.get("proxy", {}).get("listen"), "a gateway with no listener"
    for conn in listeners.values():
        assert service in conn["allowed_hosts"]
        assert any(h.startswith(f"{service}.") and h.endswith(".svc")
                   for h in conn["allowed_hosts"])
    if config.get("proxy", {}).get("listen"):
        assert service in config["proxy"]["allowed_hosts"]


def test_the_cluster_key_set_token_is_mounted_only_when_asked() -> None:
    values = chart.load_values(EXAMPLES["gateway"])
    docs = chart.render(values)
    volumes = chart.one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert not any("projected" in v for v in volumes)
    asked = copy.deepcopy(values)
    asked["callerKeysToken"] = {"enabled": True, "audience": "https://kubernetes.default.svc"}
    pod = chart.one(chart.render(asked), "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # never the default token
    [kube] = [v for v in pod["volumes"] if v["name"] == "fhir-sidecar-kube"]
    sources = kube["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["audience"] == "https://kubernetes.default.svc"
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    mounts = chart.sidecar_container(chart.render(asked))["volumeMounts"]
    assert {"name": "fhir-sidecar-kube", "mountPath": "/var/run/secrets/fhir-sidecar/kube",
            "readOnly": True} in mounts


def test_the_tracing_values_become_the_config_tracing_section() -> None:
    values = chart.load_values(EXAMPLES["gateway"])
    assert "tracing" not in config_of(chart.render(values))
    asked = copy.deepcopy(values)
    asked["tracing"] = {"endpoint": "http://otel-collector.observability:4318",
                        "sampleRatio": 0.25, "serviceName": "ehr-gateway"}
    assert config_of(chart.render(asked))["tracing"] == {
        "endpoint": "http://otel-collector.observability:4318", "sample_ratio": 0.25,
        "service_name": "ehr-gateway"}


def test_sidecar_listeners_answer_only_their_own_address() -> None:
    sidecars = [name for name, path in EXAMPLES.items()
                if chart.load_values(path)["mode"] != "gateway"]
    assert sidecars
    for example in sidecars:
        for conn in config_of(rendered(example)).get("connections", {}).values():
            assert "allowed_hosts" not in conn, example


def test_network_policy_limits_who_may_use_the_credentials() -> None:
    docs = rendered("gateway")
    policy = chart.one(docs, "NetworkPolicy")["spec"]
    rule = policy["ingress"][0]
    # The clients, and besides them only this release's `helm test` pod (whose request the
    # sidecar refuses itself: tests/test_helm_operations.py).
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"fhir-client": "true"}}},
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "fhir-sidecar",
                                         "app.kubernetes.io/instance": chart.RELEASE,
                                         "app.kubernetes.io/component": "helm-test"}}},
    ]
    assert {p["port"] for p in rule["ports"]} == {8081, 8082}


JWKS_HOST = "keys.fhir.example.org"
INGRESS_CONTROLLERS = [{"namespaceSelector": {"matchLabels": {"name": "ingress-nginx"}}}]


def jwks_ingress_values() -> dict[str, Any]:
    values = chart.load_values(EXAMPLES["gateway"])
    values["jwksIngress"] = {
        "enabled": True,
        "host": JWKS_HOST,
        "className": "nginx",
        "tls": [{"secretName": "jwks-tls", "hosts": [JWKS_HOST]}],
        "controllers": INGRESS_CONTROLLERS,
    }
    # A private_key_jwt definition, so the published set has a key in it.
    values["config"]["oauth"]["epic-jwt"] = {
        "token_url": "https://127.0.0.1:9/token",
        "client_id": "epic-backend",
        "client_auth": "private_key_jwt",
        "private_key_file": "/etc/fhir-sidecar/secrets/epic/jwt-key.pem",
    }
    return values


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_no_ingress_unless_asked(example: str) -> None:
    assert "Ingress" not in {d["kind"] for d in rendered(example)}


def test_jwks_ingress_routes_only_the_key_set_to_the_admin_port() -> None:
    docs = chart.render(jwks_ingress_values())
    assert chart.lint(jwks_ingress_values()) == []
    ingress = chart.one(docs, "Ingress")["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"secretName": "jwks-tls", "hosts": [JWKS_HOST]}]
    [rule] = ingress["rules"]
    assert rule["host"] == JWKS_HOST
    [path] = rule["http"]["paths"]
    # Exact: a Prefix path would also hand /api, the dashboard and /metrics to the Internet.
    assert (path["path"], path["pathType"]) == ("/.well-known/jwks.json", "Exact")
    backend = path["backend"]["service"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    jwks_service = services[backend["name"]]
    [port] = [p for p in jwks_service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
    container = chart.sidecar_container(docs)
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    admin_port = port_of(config_of(docs)["admin"]["listen"])
    assert container_ports[port["targetPort"]] == admin_port
    labels = chart.one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert jwks_service["spec"]["selector"].items() <= labels.items()
    # The Service every app uses still does not carry the admin port.
    gateway = services[chart.one(docs, "Deployment")["metadata"]["name"]]
    assert "admin" not in {p["name"] for p in gateway["spec"]["ports"]}
    # The admin listener answers the Ingress's Host (others get 421).
    assert JWKS_HOST in config_of(docs)["admin"]["allowed_hosts"]
    # The NetworkPolicy lets the ingress controller, and only it, reach the admin port.
    policy = chart.one(docs, "NetworkPolicy")["spec"]
    admin_rules = [r for r in policy["ingress"] if {p["port"] for p in r["ports"]} == {admin_port}]
    assert [r["from"] for r in admin_rules] == [INGRESS_CONTROLLERS]


def test_jwks_ingress_host_gets_the_key_set_from_the_rendered_config(tmp_path: Path) -> None:
    docs = chart.render(jwks_ingress_values())
    config_path, admin_url = chart.materialize(chart.config_text(docs), tmp_path, loopback=True)
    with SidecarProcess(config_path, tmp_path / "state").start():
        published = httpx.get(
            f"{admin_url}/.well-known/jwks.json", headers={"Host": JWKS_HOST}, timeout=10
        )
        assert published.status_code == 200, published.text
        assert [k["use"] for k in published.json()["keys"]] == ["sig"]
        assert "d" not in published.json()["keys"][0]
        other = httpx.get(
            f"{admin_url}/.well-known/jwks.json", headers={"Host": "attacker.example"}, timeout=10
        )
        assert other.status_code == 421


def test_sidecar_listens_on_loopback_only() -> None:
    docs = rendered("sidecar")
    config = config_of(docs)
    assert all(c["listen"].startswith("127.0.0.1:") for c in config["connections"].values())
    # Only the admin port (for the probes) is declared on the pod.
    assert [p["name"] for p in chart.sidecar_container(docs)["ports"]] == ["admin"]
    assert "Service" not in {d["kind"] for d in docs}


def test_native_sidecar_is_an_always_restarting_init_container() -> None:
    values = chart.load_values(EXAMPLES["sidecar"])
    values["sidecar"] = {"native": True}
    spec = chart.pod_spec(chart.render(values))
    assert [c["name"] for c in spec["initContainers"]] == ["fhir-sidecar"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert "startupProbe" in spec["initContainers"][0]  # gates the app's start on /readyz


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_grace_period_covers_the_shutdown_delay_and_drain(example: str) -> None:
    docs = rendered(example)
    shutdown = config_of(docs)["shutdown"]
    # The chart's default: keep serving 5 s after SIGTERM while endpoints are removed.
    assert shutdown == {"delay_seconds": 5, "drain_seconds": 30}
    assert chart.pod_spec(docs)["terminationGracePeriodSeconds"] == 5 + 30 + 5


def test_grace_period_follows_config_shutdown() -> None:
    values = chart.load_values(EXAMPLES["gateway"])
    values["config"]["shutdown"] = {"delay_seconds": 2.5, "drain_seconds": 60}
    assert chart.pod_spec(chart.render(values))["terminationGracePeriodSeconds"] == 68
    values["terminationGracePeriodSeconds"] = 120  # more is allowed
    assert chart.pod_spec(chart.render(values))["terminationGracePeriodSeconds"] == 120


def test_image_tag_and_user_match_chart_and_dockerfile() -> None:
    chart_meta = yaml.safe_load((chart.CHART_DIR / "Chart.yaml").read_text())
    defaults = yaml.safe_load((chart.CHART_DIR / "values.yaml").read_text())
    assert defaults["image"]["tag"] == chart_meta["appVersion"]
    dockerfile = (chart.REPO / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user is not None, "the Dockerfile must set a numeric USER (runAsNonRoot checks it)"
    assert int(user[1]) == defaults["containerSecurityContext"]["runAsUser"]
    assert "FHIR_SIDECAR_STATE_DIR=/var/lib/fhir-sidecar" in dockerfile


# Each case: (what, change to the gateway example's values, words the error must contain).
BAD_VALUES = [
    ("unknown mode", {"mode": "sidekick"}, "'/mode': value must be one of"),
    (
        "root filesystem writable",
        {"containerSecurityContext": {"readOnlyRootFilesystem": False}},
        "readOnlyRootFilesystem': value must be true",
    ),
    (
        "run as root",
        {"podSecurityContext": {"runAsNonRoot": False}},
        "runAsNonRoot': value must be true",
    ),
    (
        "privilege escalation",
        {"containerSecurityContext": {"allowPrivilegeEscalation": True}},
        "allowPrivilegeEscalation': value must be false",
    ),
    (
        "capabilities kept",
        {"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
        "value must be 'ALL'",
    ),
    (
        "admin port not a number",
        {"admin": {"port": "http"}},
        "'/admin/port': got string, want integer",
    ),
    ("misspelt top-level key", {"replicas": 3}, "additional properties 'replicas' not allowed"),
    (
        "rewrite_links not a boolean",
        {"config": {"connections": {"epic": {"url": "https://x", "rewrite_links": "yes"}}}},
        "rewrite_links': got string, want boolean",
    ),
    (
        "misspelt connection key",
        {"config": {"connections": {"epic": {"url": "https://x", "timeout_second": 5}}}},
        "'/config/connections/epic': additional properties 'timeout_second' not allowed",
    ),
    (
        "misspelt TLS key",
        {"config": {"oauth": {"cerner": {"tls": {"verfiy": "skip"}}}}},
        "additional properties 'verfiy' not allowed",
    ),
    (
        "misspelt config section",
        {"config": {"conections": {}}},
        "additional properties 'conections' not allowed",
    ),
    (
        "bad connection name",
        {"config": {"connections": {"Epic FHIR": {"url": "https://x"}}}},
        "'/config/connections': additional properties 'Epic FHIR' not allowed",
    ),
    (
        "subPath on a secret",
        {"secrets": [{"name": "x", "secretName": "y", "subPath": "password"}]},
        "additional properties 'subPath' not allowed",
    ),
    (
        "loopback listener in a gateway",
        {"config": {"connections": {"epic": {"listen": "127.0.0.1:8081"}}}},
        "config.connections.epic.listen binds to 127.0.0.1, which the gateway Service cannot reach",
    ),
    (
        "admin.listen given",
        {"config": {"admin": {"listen": "127.0.0.1:9901"}}},
        "remove config.admin.listen",
    ),
    (
        "file from an unmounted secret",
        {
            "config": {
                "basic_auth": {"epic-basic": {"password_file": "/etc/fhir-sidecar/secrets/nope/pw"}}
            }
        },
        'password_file is "/etc/fhir-sidecar/secrets/nope/pw", but nothing is mounted there',
    ),
    (
        "relative secret path",
        {"config": {"basic_auth": {"epic-basic": {"password_file": "pw"}}}},
        'is the relative path "pw"',
    ),
    (
        "CA bundle from two sources",
        {"caBundles": [{"name": "ca", "configMap": "a", "secret": "b"}]},
        'caBundles entry "ca" needs exactly one of configMap or secret',
    ),
    (
        "listener on the admin port",
        {"config": {"connections": {"epic": {"listen": "0.0.0.0:9901"}}}},
        "uses port 9901, which is admin.port",
    ),
    (
        "grace period shorter than the drain",
        {"terminationGracePeriodSeconds": 20},
        "terminationGracePeriodSeconds is 20, less than config.shutdown.delay_seconds + "
        "drain_seconds + 5 = 40",
    ),
    (
        "negative shutdown delay",
        {"config": {"shutdown": {"delay_seconds": -1}}},
        "/config/shutdown/delay_seconds",
    ),
    ("open network policy", {"networkPolicy": {"clients": []}}, "networkPolicy.clients is empty"),
    (
        "JWK Set Ingress without a host",
        {"jwksIngress": {"enabled": True, "controllers": INGRESS_CONTROLLERS}},
        "jwksIngress.enabled needs jwksIngress.host",
    ),
    (
        "JWK Set Ingress blocked by the NetworkPolicy",
        {"jwksIngress": {"enabled": True, "host": JWKS_HOST}},
        "jwksIngress.controllers is empty while networkPolicy.enabled",
    ),
    (
        "JWK Set Ingress in sidecar mode",
        {
            "mode": "sidecar",
            "sidecar": {"exposeListeners": True},
            "networkPolicy": {"enabled": False},
            "jwksIngress": {"enabled": True, "host": JWKS_HOST},
        },
        "jwksIngress needs mode: gateway",
    ),
    (
        "JWK Set Ingress host with a path",
        {"jwksIngress": {"host": "keys.example.org/x"}},
        "/jwksIngress/host",
    ),
    (
        "sidecar exposing credentials",
        {"mode": "sidecar"},
        "in sidecar mode listeners must use 127.0.0.1",
    ),
]


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(("what", "change", "message"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_values_are_rejected_with_a_clear_message(
    what: str, change: dict[str, Any], message: str
) -> None:
    values = _merge(chart.load_values(EXAMPLES["gateway"]), change)
    with pytest.raises(helm_python.HelmError) as failure:
        chart.render_texts(values)
    assert message in str(failure.value)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_rendered_config_passes_fhir_sidecar_check(example: str, tmp_path: Path) -> None:
    config_path, _ = chart.materialize(chart.config_text(rendered(example)), tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_SIDECAR_")}
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "-c", str(config_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_materialize_runs_with_the_runtime_dependencies_only(tmp_path: Path) -> None:
    # .ci/helm-checks.sh runs `helm.py materialize` with the image's Python environment, which
    # holds the package's runtime dependencies only: no PyYAML, no helm-python-sdk.
    manifest = tmp_path / "gateway.yaml"
    manifest.write_text(
        "".join(
            f"---\n{text}\n"
            for name, text in chart.render_texts(chart.load_values(EXAMPLES["gateway"])).items()
            if not name.endswith("NOTES.txt")
        ),
        encoding="utf-8",
    )
    blocked = "import runpy, sys; sys.modules['yaml'] = None; sys.modules['helm_python'] = None; "
    script = str(chart.REPO / "tests" / "support" / "helm.py")
    code = f"{blocked}sys.argv = {[script, 'materialize', str(manifest), str(tmp_path / 'fs')]!r}; "
    code += f"runpy.run_path({script!r}, run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    config_path = Path(result.stdout.split()[0])
    assert config_of(rendered("gateway"))["connections"].keys() == (
        yaml.safe_load(config_path.read_text(encoding="utf-8"))["connections"].keys()
    )
