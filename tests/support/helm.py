"""Render, lint and exercise the Helm chart offline (helm_python: Helm v4 as a library).

Used by tests/test_helm_chart.py and, as a script, by .ci/helm-checks.sh, so both check the very
same manifests:

    python tests/support/helm.py lint               # helm lint --strict, once per example
    python tests/support/helm.py render OUTDIR      # OUTDIR/<example>.yaml: Helm's own output
    python tests/support/helm.py materialize RENDERED.yaml ROOT [--loopback]
        # write the rendered config.yaml under ROOT with placeholder secrets, keys and CA
        # bundles at the paths the pod would mount; prints the config path (and admin URL)
    python tests/support/helm.py smoke FHIR_SIDECAR_EXE CONFIG ADMIN_URL
        # `fhir-sidecar run` that config: ready event, /healthz /readyz /metrics, exit 0 on TERM

Sidecar-mode values render only a ConfigMap on their own; to check the container users actually
get, they are rendered through a small host chart that includes the sidecar templates in its own
Deployment exactly as docs/kubernetes.md tells users to.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

from ruamel.yaml import YAML

from sidecar.testkit.pki import Authority, IssuedCert
from sidecar.testkit.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "fhir-sidecar"
EXAMPLES_DIR = REPO / "helm" / "values-examples"
RELEASE = "demo"
NAMESPACE = "fhir"
# A version whose offline schemas kubernetes-validate ships; helm lint checks against it too.
KUBE_VERSION = "1.33.0"
# Where the chart mounts everything the config refers to.
MOUNT_ROOT = "/etc/fhir-sidecar/"
TLS_FILE_KEYS = ("ca_bundle", "client_cert", "client_key")

# The host chart's Deployment: the documented way to add the sidecar to your own pod.
HOST_DEPLOYMENT = """\
{{- $sidecar := dict "Values" (index .Values "fhir-sidecar") "Release" .Release }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-app
spec:
  replicas: 1
  selector:
    matchLabels:
      app: {{ .Release.Name }}-app
  template:
    metadata:
      labels:
        app: {{ .Release.Name }}-app
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ include "fhir-sidecar.terminationGracePeriodSeconds"
                                        $sidecar }}
      securityContext:
        runAsNonRoot: true
        seccompProfile:
          type: RuntimeDefault
      {{- if $sidecar.Values.sidecar.native }}
      initContainers:
        {{- include "fhir-sidecar.container" $sidecar | nindent 8 }}
      {{- end }}
      containers:
        - name: app
          image: registry.example.com/my-fhir-app:1.0
          env:
            - name: FHIR_BASE_URL
              value: http://127.0.0.1:8081
          securityContext:
            allowPrivilegeEscalation: false
            capabilities:
              drop: [ALL]
        {{- if not $sidecar.Values.sidecar.native }}
        {{- include "fhir-sidecar.container" $sidecar | nindent 8 }}
        {{- end }}
      volumes:
        {{- include "fhir-sidecar.volumes" $sidecar | nindent 8 }}
"""


def _helm() -> Any:
    import helm_python  # late: callers that only materialize need no Helm

    return helm_python


def _yaml() -> YAML:
    # ruamel.yaml, the sidecar's own YAML 1.2 reader: materialize and smoke run in the image's
    # environment (.ci/helm-checks.sh), which has the runtime dependencies only, not PyYAML.
    return YAML(typ="safe", pure=True)


# ---- rendering ----------------------------------------------------------------------------


def examples() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.yaml"))


def load_values(path: Path) -> dict[str, Any]:
    return _yaml().load(path.read_text(encoding="utf-8")) or {}


def parse(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for name, text in sorted(rendered.items()):
        if not name.endswith("NOTES.txt"):
            docs += [d for d in _yaml().load_all(text) if d]
    return docs


def render_texts(values: dict[str, Any]) -> dict[str, str]:
    """`helm template`: template path -> text. Raises helm_python.HelmError on bad values."""
    with _helm().Chart.load(CHART_DIR) as chart:
        rendered: dict[str, str] = chart.render(
            values, name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    return rendered


def render_texts_in_host(values: dict[str, Any]) -> dict[str, str]:
    """Render sidecar values (the `fhir-sidecar:` key of a parent chart) in a host chart."""
    with tempfile.TemporaryDirectory(prefix="fhir-sidecar-host-") as tmp:
        host = Path(tmp) / "my-fhir-app"
        (host / "templates").mkdir(parents=True)
        (host / "Chart.yaml").write_text(
            "apiVersion: v2\nname: my-fhir-app\nversion: 1.0.0\n", encoding="utf-8"
        )
        (host / "templates" / "deployment.yaml").write_text(HOST_DEPLOYMENT, encoding="utf-8")
        shutil.copytree(CHART_DIR, host / "charts" / "fhir-sidecar")
        with _helm().Chart.load(host) as chart:
            rendered: dict[str, str] = chart.render(
                {"fhir-sidecar": values}, name=RELEASE, namespace=NAMESPACE, is_install=True
            )
    return rendered


def render_example_texts(values: dict[str, Any]) -> dict[str, str]:
    """Values rendered the way their users render them (sidecar mode: inside a host chart)."""
    if values.get("mode") == "sidecar":
        return render_texts_in_host(values)
    return render_texts(values)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    return parse(render_example_texts(values))


def lint(values: dict[str, Any]) -> list[str]:
    """`helm lint --strict`; returns the problems (warnings count, as with --strict)."""
    report = _helm().lint(
        CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    problems = [
        f"{m.get('path', '')}: {m.get('error', '')}"
        for m in report.get("messages") or []
        if m.get("severity", 0) >= 2
    ]
    return problems + [str(e) for e in report.get("errors") or []]


# ---- looking into rendered manifests ------------------------------------------------------


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = pod_spec(docs)
    found = [
        c
        for c in spec.get("initContainers", []) + spec["containers"]
        if c["name"] == "fhir-sidecar"
    ]
    assert len(found) == 1, "expected exactly one fhir-sidecar container"
    return found[0]


def config_text(docs: list[dict[str, Any]]) -> str:
    """The rendered config.yaml (other ConfigMaps, such as the Grafana dashboard, aside)."""
    found = [d for d in docs if d.get("kind") == "ConfigMap" and "config.yaml" in d["data"]]
    assert len(found) == 1, f"expected one ConfigMap with config.yaml, got {len(found)}"
    text: str = found[0]["data"]["config.yaml"]
    return text


def file_refs(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(field path, file path) for every file the config names (`*_file` and TLS files)."""
    refs: list[tuple[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                sub = f"{path}.{key}" if path else str(key)
                if isinstance(value, str) and (key.endswith("_file") or key in TLS_FILE_KEYS):
                    refs.append((sub, value))
                else:
                    walk(value, sub)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")

    walk(config, "")
    return refs


# ---- a config the way the pod would see it -------------------------------------------------


class _Material:
    """Placeholder secrets, keys and PEMs of the right kind, made once per materialize call."""

    @functools.cached_property
    def ca(self) -> Authority:
        return Authority("fhir-sidecar chart test CA")

    @functools.cached_property
    def client(self) -> IssuedCert:
        return self.ca.issue(
            common_name="fhir-sidecar-client.example", san=["fhir-sidecar-client.example"]
        )

    def for_field(self, field: str, owner: dict[str, Any]) -> bytes:
        key = field.rsplit(".", 1)[-1]
        if key == "ca_bundle":
            return self.ca.cert_pem
        if key == "client_cert":
            pem = self.client.chain_pem
            if owner.get("client_key") in (None, owner.get("client_cert")):
                pem += self.client.key_pem
            return pem
        if key == "client_key":
            return self.client.key_pem
        if key == "private_key_file":
            return _private_key_pem(str(owner.get("signing_alg", "RS384")))
        return b"placeholder-secret\n"


def _private_key_pem(alg: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key: Any = (
        ec.generate_private_key(ec.SECP384R1())
        if alg.startswith("ES")
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _owner(config: dict[str, Any], field: str) -> dict[str, Any]:
    node: Any = config
    for part in field.split(".")[:-1]:
        node = node[part]
    return dict(node)


def materialize(text: str, root: Path, *, loopback: bool = False) -> tuple[Path, str]:
    """Write config `text` (as rendered) under `root` the way the pod would see it.

    Every path under /etc/fhir-sidecar/ moves under root/etc/fhir-sidecar/ and gets a placeholder
    file of the right kind. With `loopback`, every listener moves to a free 127.0.0.1 port so the
    config can really run here. Returns (config path, admin base URL).
    """
    config: dict[str, Any] = _yaml().load(text) or {}
    base = root / MOUNT_ROOT.strip("/")
    material = _Material()
    for field, path in file_refs(config):
        if not path.startswith(MOUNT_ROOT):
            continue  # a file from the image itself (e.g. the system CA bundle)
        target = base / PurePosixPath(path).relative_to(MOUNT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(material.for_field(field, _owner(config, field)))
        _set(config, field, str(target))
    if loopback:
        listeners = [("admin",), ("proxy",)] + [
            ("connections", n) for n in config.get("connections", {})
        ]
        for where in listeners:
            section = _get(config, where)
            if isinstance(section, dict) and section.get("listen"):
                section["listen"] = f"127.0.0.1:{free_port()}"
    config_path = base / "config" / "config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    # JSON is YAML 1.2 too, and needs no YAML writer in the image's environment.
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    admin = (config.get("admin") or {}).get("listen", "127.0.0.1:9901")
    return config_path, f"http://{admin}"


def _get(config: dict[str, Any], where: tuple[str, ...]) -> Any:
    node: Any = config
    for part in where:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(config: dict[str, Any], field: str, value: str) -> None:
    *parents, last = field.split(".")
    node: Any = config
    for part in parents:
        node = node[part]
    node[last] = value


# ---- a short real run ----------------------------------------------------------------------


def smoke(exe: str, config: Path, admin_url: str, state_dir: Path, timeout: float = 30) -> None:
    """Start `exe run -c config`: it must log its ready event, answer the admin endpoints and
    exit 0 on SIGTERM. Raises RuntimeError (after printing the sidecar's output) otherwise."""
    env = dict(os.environ, FHIR_SIDECAR_STATE_DIR=str(state_dir))
    proc = subprocess.Popen(
        [exe, "run", "-c", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        _wait_ready(proc, lines, timeout)
        for path in ("/healthz", "/readyz", "/metrics"):
            status = _status(admin_url + path)
            if status is None:
                raise RuntimeError(f"nothing listens at {admin_url}{path} (want 200)")
            if status != 200:
                raise RuntimeError(f"{admin_url}{path} answered {status} (want 200)")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
        if code != 0:
            raise RuntimeError(f"exit code {code} after SIGTERM (want 0)")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        lines += proc.communicate()[0].splitlines()
        print("\n".join(lines[-40:]), file=sys.stderr)
        raise
    proc.communicate()


def _wait_ready(proc: subprocess.Popen[str], lines: list[str], timeout: float) -> None:
    """Read the JSON log until its `"event": "ready"` line (all listeners bound)."""
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            try:
                if json.loads(line).get("event") == "ready":
                    ready.set()
                    return
            except (ValueError, AttributeError):
                pass

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        raise RuntimeError(f"no ready event within {timeout:.0f} s (exit code {proc.poll()})")


def _status(url: str) -> int | None:
    """HTTP status of GET url; None when nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


# ---- command line (for .ci/helm-checks.sh) -------------------------------------------------


def _main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "lint" and not args:
        failed = False
        for path in examples():
            problems = lint(load_values(path))
            print(f"helm lint --strict ({path.name}): {'; '.join(problems) or 'ok'}")
            failed = failed or bool(problems)
        return 1 if failed else 0
    if command == "render" and len(args) == 1:
        out = Path(args[0])
        out.mkdir(parents=True, exist_ok=True)
        for path in examples():
            # Helm's own text (not a re-dump), so the validators see exactly what Helm made.
            texts = render_example_texts(load_values(path))
            texts = {
                k: v for k, v in sorted(texts.items()) if not k.endswith("NOTES.txt") and v.strip()
            }
            body = "".join(f"---\n# Source: {k}\n{v.strip()}\n" for k, v in texts.items())
            (out / path.name).write_text(body, encoding="utf-8")
            kinds = ", ".join(d["kind"] for d in parse(texts))
            print(f"helm template ({path.name}): {kinds}")
        return 0
    if command == "materialize" and len(args) in (2, 3):
        text = Path(args[0]).read_text(encoding="utf-8")
        docs = [d for d in _yaml().load_all(text) if d]
        config_path, admin_url = materialize(
            config_text(docs), Path(args[1]), loopback="--loopback" in args[2:]
        )
        print(config_path, admin_url)
        return 0
    if command == "smoke" and len(args) == 3:
        with tempfile.TemporaryDirectory(prefix="fhir-sidecar-state-") as state:
            smoke(args[0], Path(args[1]), args[2], Path(state))
        checked = "/healthz, /readyz, /metrics answered 200"
        print(f"smoke run: ready; {checked}; exit 0 on SIGTERM ({args[1]})")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
