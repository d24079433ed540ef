"""Release artifacts: build them, check them, and keep every copy of the version in step.

    python .ci/release.py version                 # the package version (pyproject.toml)
    python .ci/release.py sync-version [--check]  # write it into every copy / list the drift
    python .ci/release.py build OUTDIR            # wheel, sdist, chart archive, SBOM, SHA256SUMS
    python .ci/release.py check OUTDIR            # check what `build` made (no network needed)

One source: `[project] version` in pyproject.toml. `sync-version` writes it into the copies
that cannot read it (VERSION_COPIES: the chart's version and appVersion, the image tag in the
chart's values and examples, the Dockerfile's VERSION build arg, `sidecar.__version__`, the
docs' image tags) and regenerates the chart README; tests/test_release.py fails on drift.
How a maintainer cuts a release: docs/release.md. Called by .ci/release-check (CI), which also
runs `twine check`, installs the wheel into a fresh venv and runs the demo.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHART = Path("helm/fhir-sidecar")
V = r"(?P<v>[0-9][0-9A-Za-z.+-]*)"  # a version, as it stands in a copy

# (file, pattern): every place outside pyproject.toml that spells the version. Each pattern has
# one group `v`; every file must match at least once. Paths are relative to the repository.
VERSION_COPIES: list[tuple[str, str]] = [
    ("sidecar/__init__.py", rf'^__version__ = "{V}"$'),
    ("Dockerfile", rf"^ARG VERSION={V}$"),
    ("Dockerfile", rf"fhir-sidecar:{V}\b"),
    (f"{CHART}/Chart.yaml", rf"^version: {V}$"),
    (f"{CHART}/Chart.yaml", rf'^appVersion: "{V}"$'),
    (f"{CHART}/values.yaml", rf'^image:\n(?:  .*\n)*?  tag: "{V}"$'),
    *[(f"helm/values-examples/{name}", rf'^(?: *)tag: "{V}"$')
      for name in ("autoscaling.yaml", "custom-ca.yaml", "gateway.yaml", "servicemonitor.yaml",
                   "sidecar.yaml")],
    ("docs/kubernetes.md", rf"fhir-sidecar:{V}\b"),
    ("docs/kubernetes.md", rf'^ *tag: "{V}"$'),
    ("docs/kubernetes.md", rf"^ *- name: fhir-sidecar\n *version: {V}$"),
]


def project_version(repo: Path = REPO) -> str:
    version: str = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    return version


def version_drift(repo: Path = REPO, *, write: bool = False) -> list[str]:
    """Each copy whose version is not pyproject's (rewritten to it when `write`)."""
    version = project_version(repo)
    drift = []
    texts: dict[str, str] = {}
    for name, pattern in VERSION_COPIES:
        text = texts.setdefault(name, (repo / name).read_text(encoding="utf-8"))
        matches = list(re.finditer(pattern, text, re.M))
        if not matches:
            drift.append(f"{name}: no version where /{pattern}/ expects one")
            continue
        for match in reversed(matches):
            if match["v"] != version:
                line = text.count("\n", 0, match.start("v")) + 1
                drift.append(f"{name}:{line}: {match['v']} (the package is {version})")
                text = text[:match.start("v")] + version + text[match.end("v"):]
        texts[name] = text
    if write and drift:
        for name, text in texts.items():
            (repo / name).write_text(text, encoding="utf-8")
        subprocess.run([sys.executable, str(repo / ".ci" / "chart_readme.py")], check=True)
    return drift


# ---- building -------------------------------------------------------------------------------


def build(out: Path, repo: Path = REPO) -> None:
    """The wheel and sdist (`python -m build`), the chart archive and the SBOM, into out."""
    import helm_python

    version = project_version(repo)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(repo)], check=True,
                   stdout=subprocess.DEVNULL)
    # helm package, as a library (helm-python-sdk: Helm v4's own packaging code, no binary);
    # version and appVersion from the one source.
    helm_python.package(repo / CHART, destination=out, version=version, app_version=version)
    subprocess.run(
        [str(Path(sys.executable).parent / "cyclonedx-py"), "requirements",
         "--pyproject", str(repo / "pyproject.toml"), "--mc-type", "application",
         "--output-reproducible", "--output-format", "JSON",
         "--output-file", str(out / f"fhir-sidecar-{version}.cdx.json"),
         str(repo / "requirements.lock")],
        check=True,
    )
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                   for p in sorted(artifacts(out, version).values()))
    (out / "SHA256SUMS").write_text(sums)


def artifacts(out: Path, version: str) -> dict[str, Path]:
    return {
        "wheel": out / f"fhir_sidecar-{version}-py3-none-any.whl",
        "sdist": out / f"fhir_sidecar-{version}.tar.gz",
        "chart": out / f"fhir-sidecar-{version}.tgz",
        "sbom": out / f"fhir-sidecar-{version}.cdx.json",
    }


# ---- checking -------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _norm(re.split(r"[<>=!~\[; (]", requirement.strip(), maxsplit=1)[0])


def package_files(repo: Path = REPO) -> set[str]:
    """The files of the sidecar package as they sit in the repository (no caches)."""
    return {str(p.relative_to(repo)) for p in (repo / "sidecar").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def check_wheel(path: Path, repo: Path = REPO) -> list[str]:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    version = project["version"]
    problems = []
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        dist_info = f"fhir_sidecar-{version}.dist-info"
        meta = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    tops = {name.split("/", 1)[0] for name in names}
    if tops != {"sidecar", dist_info}:
        problems.append(f"top-level entries {sorted(tops - {dist_info})}, only sidecar/ belongs")
    missing = sorted(package_files(repo) - names)
    if missing:
        problems.append(f"package files missing from the wheel: {missing[:10]}")
    for needed in ("sidecar/testkit/fhir_server.py", "sidecar/testkit/pki.py",
                   "sidecar/demo/runner.py", "sidecar/py.typed", f"{dist_info}/licenses/LICENSE"):
        if needed not in names:
            problems.append(f"{needed} is not in the wheel")
    strays = sorted(n for n in names if re.search(r"(^|/)(tests|bench)/|\.pyc$|__pycache__", n))
    if strays:
        problems.append(f"test, benchmark or cache files in the wheel: {strays[:10]}")
    if meta["Version"] != version:
        problems.append(f"wheel version {meta['Version']}, pyproject.toml {version}")
    required = {_requirement_name(r) for r in meta.get_all("Requires-Dist") or []
                if "extra ==" not in r}
    declared = {_requirement_name(r) for r in project["dependencies"]}
    test_only = {_requirement_name(r) for extra in project.get("optional-dependencies", {})
                 .values() for r in extra} - declared
    if required != declared:
        problems.append(f"Requires-Dist {sorted(required)} is not pyproject's dependencies "
                        f"{sorted(declared)}")
    if required & test_only:
        problems.append("test-only dependencies required at run time: "
                        f"{sorted(required & test_only)}")
    if not re.search(r"^fhir-sidecar = sidecar\.cli:main$", entry_points, re.M):
        problems.append("no `fhir-sidecar` console script")
    return problems


def check_sdist(path: Path, repo: Path = REPO) -> list[str]:
    version = project_version(repo)
    top = f"fhir_sidecar-{version}"
    problems = []
    with tarfile.open(path) as sdist:
        names = {m.name for m in sdist.getmembers() if m.isfile()}
    for needed in ("pyproject.toml", "README.md", "LICENSE", "PKG-INFO", "sidecar/cli.py",
                   "sidecar/testkit/fhir_server.py"):
        if f"{top}/{needed}" not in names:
            problems.append(f"{needed} is not in the sdist")
    strays = sorted(n for n in names if not n.startswith(f"{top}/") or re.search(
        r"(^|/)(\.git|\.venv[^/]*|node_modules|mutants|bench/results|__pycache__)/|\.pyc$", n))
    if strays:
        problems.append(f"files that do not belong in the sdist: {strays[:10]}")
    missing = sorted(f for f in package_files(repo) if f"{top}/{f}" not in names)
    if missing:
        problems.append(f"package files missing from the sdist: {missing[:10]}")
    return problems


def _helmignored(rel: str, patterns: Iterable[str]) -> bool:
    import fnmatch

    parts = rel.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            if pattern.rstrip("/") in parts[:-1]:
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def check_chart(path: Path, repo: Path = REPO) -> list[str]:
    import helm_python
    from ruamel.yaml import YAML

    version = project_version(repo)
    yaml = YAML(typ="safe", pure=True)
    problems = []
    chart_dir = repo / CHART
    ignore = [line.strip() for line in (chart_dir / ".helmignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    expected = {f"fhir-sidecar/{p.relative_to(chart_dir)}" for p in chart_dir.rglob("*")
                if p.is_file() and not _helmignored(str(p.relative_to(chart_dir)), ignore)}
    with tarfile.open(path) as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile()}
        chart = yaml.load(archive.extractfile(members["fhir-sidecar/Chart.yaml"]))  # type: ignore[arg-type]
        values = yaml.load(archive.extractfile(members["fhir-sidecar/values.yaml"]))  # type: ignore[arg-type]
        if set(members) != expected:
            problems.append(f"chart archive: missing {sorted(expected - set(members))}, "
                            f"extra {sorted(set(members) - expected)}")
        with tempfile.TemporaryDirectory() as tmp:
            archive.extractall(tmp, filter="data")
            gateway = yaml.load((repo / "helm/values-examples/gateway.yaml").read_text())
            report = helm_python.lint(Path(tmp) / "fhir-sidecar", gateway, strict=True,
                                      kube_version="v1.33.0")
            problems += [f"helm lint of the archive: {e}" for e in report.get("errors") or []]
            problems += [f"helm lint of the archive: {m['error']}" for m in report["messages"]
                         if m["severity"] >= 2]
    if (chart["version"], str(chart["appVersion"]), values["image"]["tag"]) != (version,) * 3:
        problems.append(f"chart version {chart['version']}, appVersion {chart['appVersion']}, "
                        f"image.tag {values['image']['tag']}: all must be {version}")
    return problems


def lock_pins(repo: Path = REPO) -> dict[str, tuple[str, set[str]]]:
    """requirements.lock: {name: (version, {sha256, ...})}."""
    text = (repo / "requirements.lock").read_text()
    pins = {}
    entry = r"^([A-Za-z0-9][\w.-]*)==(\S+)((?: \\\n\s+--hash=sha256:[0-9a-f]{64})+)"
    for match in re.finditer(entry, text, re.M):
        pins[_norm(match[1])] = (match[2], set(re.findall(r"sha256:([0-9a-f]{64})", match[3])))
    return pins


def check_sbom(path: Path, repo: Path = REPO) -> list[str]:
    version = project_version(repo)
    bom = json.loads(path.read_text())
    problems = []
    kind, spec = bom.get("bomFormat"), str(bom.get("specVersion", ""))
    if kind != "CycloneDX" or not spec.startswith("1."):
        problems.append(f"not a CycloneDX 1.x document: {kind} {spec}")
    root = bom.get("metadata", {}).get("component", {})
    if (root.get("name"), root.get("version")) != ("fhir-sidecar", version):
        problems.append(f"the SBOM describes {root.get('name')} {root.get('version')}, "
                        f"not fhir-sidecar {version}")
    pins = lock_pins(repo)
    listed: dict[str, tuple[str, set[str]]] = {}
    for component in bom.get("components", []):
        hashes = {h["content"] for ref in component.get("externalReferences", [])
                  for h in ref.get("hashes", []) if h.get("alg") == "SHA-256"}
        hashes |= {h["content"] for h in component.get("hashes", []) if h.get("alg") == "SHA-256"}
        listed[_norm(component["name"])] = (component.get("version", ""), hashes)
        purl = f"pkg:pypi/{_norm(component['name'])}@{component.get('version')}"
        if component.get("purl") != purl:
            problems.append(f"{component['name']}: purl {component.get('purl')}")
    if listed.keys() != pins.keys():
        problems.append("SBOM components differ from requirements.lock: missing "
                        f"{sorted(pins.keys() - listed.keys())}, "
                        f"extra {sorted(listed.keys() - pins.keys())}")
    for name in sorted(pins.keys() & listed.keys()):
        if listed[name][0] != pins[name][0] or listed[name][1] != pins[name][1]:
            problems.append(f"{name}: SBOM has {listed[name][0]} with {len(listed[name][1])} "
                            f"hashes, the lock {pins[name][0]} with {len(pins[name][1])}")
    return problems


CHANGELOG_SECTIONS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def check_changelog(text: str, version: str) -> list[str]:
    """Keep a Changelog 1.1.0: Unreleased on top, then this release, newest first."""
    problems = []
    if not text.startswith("# Changelog\n"):
        problems.append("CHANGELOG.md must start with '# Changelog'")
    if "https://keepachangelog.com/en/1.1.0/" not in text:
        problems.append("CHANGELOG.md does not say it follows Keep a Changelog 1.1.0")
    releases = re.findall(r"^## (.*)$", text, re.M)
    if not releases or releases[0] != "[Unreleased]":
        problems.append(f"the first section must be '## [Unreleased]', not {releases[:1]}")
    dated = releases[1:]
    pattern = re.compile(r"\[(\d+\.\d+\.\d+(?:[-.+][0-9A-Za-z.]+)?)\] - (\d{4}-\d{2}-\d{2})")
    for heading in dated:
        if not pattern.fullmatch(heading):
            problems.append(f"'## {heading}': want '## [X.Y.Z] - YYYY-MM-DD'")
    versions = [m[1] for h in dated if (m := pattern.fullmatch(h))]
    if not versions or versions[0] != version:
        problems.append(f"the newest release in CHANGELOG.md is {versions[:1]}, the package is "
                        f"{version}")
    dates = [m[2] for h in dated if (m := pattern.fullmatch(h))]
    if dates != sorted(dates, reverse=True):
        problems.append("releases are not newest first")
    for sub in re.findall(r"^### (.*)$", text, re.M):
        if sub not in CHANGELOG_SECTIONS:
            problems.append(f"'### {sub}' is not a Keep a Changelog section "
                            f"({', '.join(sorted(CHANGELOG_SECTIONS))})")
    return problems


def check(out: Path, repo: Path = REPO) -> list[str]:
    version = project_version(repo)
    found = artifacts(out, version)
    absent = [str(p) for p in found.values() if not p.is_file()]
    if absent:
        return [f"not built: {absent}"]
    problems = [f"wheel: {p}" for p in check_wheel(found["wheel"], repo)]
    problems += [f"sdist: {p}" for p in check_sdist(found["sdist"], repo)]
    problems += [f"chart: {p}" for p in check_chart(found["chart"], repo)]
    problems += [f"sbom: {p}" for p in check_sbom(found["sbom"], repo)]
    problems += [f"CHANGELOG.md: {p}"
                 for p in check_changelog((repo / "CHANGELOG.md").read_text(), version)]
    problems += version_drift(repo)
    return problems + check_sums(out, version)


def check_sums(out: Path, version: str) -> list[str]:
    sums = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, _, name = line.partition("  ")
        sums[name] = digest
    return [f"SHA256SUMS: {p.name} does not match" for p in artifacts(out, version).values()
            if sums.get(p.name) != hashlib.sha256(p.read_bytes()).hexdigest()]


def _main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "version" and not args:
        print(project_version())
        return 0
    if command == "sync-version" and args in ([], ["--check"]):
        drift = version_drift(write=not args)
        for line in drift:
            print(line)
        if args and drift:
            print(f"run `python .ci/release.py sync-version` to write {project_version()} "
                  "into these copies", file=sys.stderr)
            return 1
        return 0
    if command == "build" and len(args) == 1:
        build(Path(args[0]))
        return 0
    if command == "check" and len(args) == 1:
        out = Path(args[0])
        problems = check(out)
        for line in problems:
            print(f"release-check: FAILED: {line}", file=sys.stderr)
        if not problems:
            for p in sorted(artifacts(out, project_version()).values()):
                print(f"ok: {p.name} ({p.stat().st_size / 1e3:.0f} kB)")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
