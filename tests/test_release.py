"""The release artifacts and the one version (docs/release.md).

`.ci/release-check` builds the real artifacts on every CI run and checks them with
`.ci/release.py`; these tests make sure those checks can fail: each is run on a good artifact
and on one broken the way a real mistake would break it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


release = _load("ci_release", REPO / ".ci" / "release.py")
VERSION = release.project_version()


# ---- one version ----------------------------------------------------------------------------


def test_every_copy_of_the_version_follows_pyproject() -> None:
    """docs/release.md: "Every other copy follows it" (chart version and appVersion, image
    tags, the Dockerfile's VERSION, sidecar.__version__)."""
    assert release.version_drift() == []
    import sidecar

    assert sidecar.__version__ == VERSION


def _copy_for_sync(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    names = {"pyproject.toml", ".ci/chart_readme.py", *(n for n, _ in release.VERSION_COPIES)}
    for name in names:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "helm", repo / "helm", dirs_exist_ok=True)
    return repo


def test_sync_version_finds_and_rewrites_every_copy(tmp_path: Path) -> None:
    repo = _copy_for_sync(tmp_path)
    pyproject = repo / "pyproject.toml"
    pyproject.write_text(re.sub(r'^version = ".*"$', 'version = "9.8.7"',
                                pyproject.read_text(), count=1, flags=re.M))
    drift = release.version_drift(repo)
    drifted_files = {line.split(":", 1)[0] for line in drift}
    assert drifted_files == {name for name, _ in release.VERSION_COPIES}
    assert all(f"{VERSION} (the package is 9.8.7)" in line for line in drift)

    assert release.version_drift(repo, write=True) == drift
    assert release.version_drift(repo) == []
    readme = (repo / "helm/fhir-sidecar/README.md").read_text()
    assert readme.startswith("# fhir-sidecar (Helm chart 9.8.7, app 9.8.7)")
    chart = (repo / "helm/fhir-sidecar/Chart.yaml").read_text()
    assert 'version: 9.8.7\nappVersion: "9.8.7"' in chart


def test_a_copy_that_loses_its_version_is_reported(tmp_path: Path) -> None:
    repo = _copy_for_sync(tmp_path)
    init = repo / "sidecar/__init__.py"
    init.write_text(init.read_text().replace("__version__ = ", "VERSION = "))
    assert release.version_drift(repo) == [
        f'sidecar/__init__.py: no version where /{release.VERSION_COPIES[0][1]}/ expects one']


# ---- the wheel --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real wheel, as `python -m build` makes it (pip runs the same build backend)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(REPO)], check=True, timeout=300)
    (found,) = out.glob("*.whl")
    return found


def _rewrite(wheel: Path, target: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of the wheel with files replaced (bytes), added, or removed (None)."""
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w") as out:
        for item in source.infolist():
            if item.filename in change:
                continue
            out.writestr(item, source.read(item))
        for name, data in change.items():
            if data is not None:
                out.writestr(name, data)
    return target


def test_the_wheel_holds_the_runtime_and_the_demo_and_no_tests(wheel: Path) -> None:
    """docs/release.md: the wheel holds the runtime, sidecar/testkit and sidecar/demo; no
    tests/, no bench/, and only the runtime dependencies are required."""
    assert wheel.name == f"fhir_sidecar-{VERSION}-py3-none-any.whl"
    assert release.check_wheel(wheel) == []
    with zipfile.ZipFile(wheel) as opened:
        names = set(opened.namelist())
        meta = opened.read(f"fhir_sidecar-{VERSION}.dist-info/METADATA").decode()
    assert {"sidecar/testkit/fhir_server.py", "sidecar/demo/runner.py",
            "sidecar/admin/templates/base.html"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    runtime = [line for line in meta.splitlines()
               if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in runtime if re.search(r"pytest|ruff|mypy|helm|playwright", line)]


def test_the_wheel_check_fails_on_each_kind_of_mistake(wheel: Path, tmp_path: Path) -> None:
    meta_name = f"fhir_sidecar-{VERSION}.dist-info/METADATA"
    with zipfile.ZipFile(wheel) as opened:
        meta = opened.read(meta_name)
    mistakes: dict[str, dict[str, bytes | None]] = {
        "test files": {"tests/test_x.py": b""},
        "benchmarks": {"sidecar/bench/run.py": b""},
        "a forgotten data file": {"sidecar/admin/templates/base.html": None},
        "the demo's server": {"sidecar/testkit/fhir_server.py": None},
        "a test-only requirement": {
            meta_name: meta.replace(b"\n\n", b"\nRequires-Dist: pytest>=8\n\n", 1)},
    }
    for what, change in mistakes.items():
        broken = _rewrite(wheel, tmp_path / f"{len(what)}-{wheel.name}", change)
        assert release.check_wheel(broken) != [], what


# ---- the chart archive ------------------------------------------------------------------------


def test_the_chart_archive_follows_the_package_version(tmp_path: Path) -> None:
    import helm_python

    good = Path(helm_python.package(REPO / "helm/fhir-sidecar", destination=tmp_path / "good",
                                    version=VERSION, app_version=VERSION))
    assert good.name == f"fhir-sidecar-{VERSION}.tgz"
    assert release.check_chart(good) == []
    drifted = Path(helm_python.package(REPO / "helm/fhir-sidecar", destination=tmp_path / "bad",
                                       version="9.9.9", app_version=VERSION))
    problems = release.check_chart(drifted)
    assert problems and f"all must be {VERSION}" in problems[-1]


# ---- the SBOM -------------------------------------------------------------------------------


def _sbom_of_the_lock() -> dict[str, object]:
    """What cyclonedx-py makes of requirements.lock (the fields the check reads)."""
    components = [
        {"name": name, "version": version, "purl": f"pkg:pypi/{name}@{version}",
         "externalReferences": [{"type": "distribution", "hashes": [
             {"alg": "SHA-256", "content": h} for h in sorted(hashes)]}]}
        for name, (version, hashes) in release.lock_pins().items()
    ]
    return {"bomFormat": "CycloneDX", "specVersion": "1.6",
            "metadata": {"component": {"name": "fhir-sidecar", "version": VERSION}},
            "components": components}


def test_the_sbom_check_wants_exactly_the_locked_packages_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "sbom.json"
    good = _sbom_of_the_lock()
    path.write_text(json.dumps(good))
    assert release.check_sbom(path) == []
    components = good["components"]
    assert isinstance(components, list) and len(components) >= 40

    for what, broken in {
        "a package missing": {**good, "components": components[1:]},
        "another version": {**good, "components": [
            {**components[0], "version": "0.0.1"}, *components[1:]]},
        "a hash missing": {**good, "components": [
            {**components[0], "externalReferences": []}, *components[1:]]},
        "another root": {**good, "metadata": {"component": {"name": "fhir-sidecar",
                                                            "version": "0.0.0"}}},
    }.items():
        path.write_text(json.dumps(broken))
        assert release.check_sbom(path) != [], what


# ---- the changelog ----------------------------------------------------------------------------


def test_the_changelog_starts_with_unreleased_then_this_release() -> None:
    """CHANGELOG.md follows Keep a Changelog: Unreleased on top, then the package version."""
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert release.check_changelog(text, VERSION) == []
    assert release.check_changelog(text, "9.9.9") != []
    unreleased_last = text.replace("## [Unreleased]", "## [9.9.8] - 2001-01-01", 1)
    assert release.check_changelog(unreleased_last, VERSION) != []
    assert release.check_changelog(text.replace("### Added", "### New", 1), VERSION) != []


def test_sha256sums_are_checked(tmp_path: Path) -> None:
    out = tmp_path / "dist"
    out.mkdir()
    for path in release.artifacts(out, VERSION).values():
        path.write_bytes(path.name.encode())
    (out / "SHA256SUMS").write_text("".join(
        f"{hashlib.sha256(p.name.encode()).hexdigest()}  {p.name}\n"
        for p in release.artifacts(out, VERSION).values()))
    assert release.check_sums(out, VERSION) == []
    release.artifacts(out, VERSION)["sbom"].write_bytes(b"changed")
    assert release.check_sums(out, VERSION) == [
        f"SHA256SUMS: fhir-sidecar-{VERSION}.cdx.json does not match"]


# ---- CI runs it -------------------------------------------------------------------------------


def test_ci_builds_the_image_and_the_release_after_the_other_checks() -> None:
    run = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    steps = [line for line in run.splitlines() if line and not line.lstrip().startswith("#")]
    order = [next(i for i, line in enumerate(steps) if needle in line) for needle in (
        ".ci/helm-checks.sh", ".ci/image-check", ".ci/release-check", 'wait "$PY312_PID"')]
    assert order == sorted(order)
    for script in ("image-check", "release-check"):
        path = REPO / ".ci" / script
        assert path.stat().st_mode & 0o111, f".ci/{script} is not executable"
        text = path.read_text(encoding="utf-8")
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
