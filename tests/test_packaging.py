"""The package and the image as operators receive them: license, metadata, hashed lock, labels.

.ci/image-check builds and runs the real image (buildah, as root) and .ci/helm-checks.sh
replays the Dockerfile's build stage without root; these checks keep the files they use
honest. The built artifacts themselves: tests/test_release.py and .ci/release-check.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
DOCKERFILE = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-") \
        .replace(".", "-")


def test_license_file_and_pep_639_metadata() -> None:
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert PROJECT["license"] == "Apache-2.0"  # an SPDX expression, not a table
    assert PROJECT["license-files"] == ["LICENSE"]
    # PEP 639: a license expression excludes License :: classifiers.
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
    build = PYPROJECT["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in build), build


def test_classifiers_match_the_pythons_ci_tests() -> None:
    assert PROJECT["requires-python"] == ">=3.12"
    versions = {c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert versions == {"3.12", "3.13"}
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for version in versions:
        assert f"python{version}" in ci or f"PY{version.replace('.', '')}" in ci, version


def test_lock_pins_and_hashes_every_dependency() -> None:
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    entries = re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)",
                         lock, re.M)
    requirement_lines = [line for line in lock.splitlines()
                         if line and not line[0].isspace() and not line.startswith("#")]
    assert len(entries) == len(requirement_lines) >= 40, "a pin without a hash"
    pinned = {_name(name) for name, _, _ in entries}
    for dependency in PROJECT["dependencies"]:
        assert _name(dependency) in pinned, f"{dependency} is not in requirements.lock"


def test_dockerfile_installs_the_lock_with_require_hashes() -> None:
    installs = [line for line in DOCKERFILE.splitlines() if "-r requirements.lock" in line]
    assert len(installs) == 1
    assert "--require-hashes" in installs[0] and "--no-deps" in installs[0]
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for copied in ("requirements.lock", "LICENSE"):
        assert f"!{copied}" in ignore, f"{copied} is excluded from the build context"


def test_oci_labels_source_revision_version_licenses() -> None:
    labels = dict(re.findall(r'org\.opencontainers\.image\.(\w+)="([^"]*)"', DOCKERFILE))
    assert {"source", "revision", "version", "licenses"} <= labels.keys()
    assert labels["licenses"] == PROJECT["license"]
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE, re.M))
    assert labels["version"] == "${VERSION}" and args["VERSION"] == PROJECT["version"]
    assert labels["revision"] == "${REVISION}" and "REVISION" in args
    assert labels["source"] == "${SOURCE}" and "SOURCE" in args
    chart = yaml.safe_load((REPO / "helm/fhir-sidecar/Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == chart["version"] == PROJECT["version"]


def test_the_package_is_the_sidecar_package_alone() -> None:
    """The wheel holds `sidecar` (runtime, testkit and demo included) and nothing else: no
    tests/, bench/ or addons/ (docs/release.md)."""
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    assert find == {"include": ["sidecar*"]}
    assert (REPO / "sidecar" / "testkit" / "__init__.py").is_file()
    assert (REPO / "sidecar" / "demo" / "__init__.py").is_file()


def test_no_test_tool_is_a_runtime_dependency() -> None:
    runtime = {_name(r) for r in PROJECT["dependencies"]}
    test_only = {_name(r) for r in PROJECT["optional-dependencies"]["test"]}
    assert runtime & test_only == set()
    assert {"pytest", "ruff", "mypy", "helm-python-sdk", "playwright"} <= test_only
    # The image installs exactly the lock, which is the runtime set's closure: no test tool.
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    pinned = {_name(m) for m in re.findall(r"^([A-Za-z0-9][\w.-]*)==", lock, re.M)}
    assert pinned & {"pytest", "ruff", "mypy", "helm-python-sdk", "playwright",
                     "hypothesis", "schemathesis"} == set()
