"""The image check of CI (.ci/image-check, .ci/image_run.py; docs/kubernetes.md#the-image-in-ci).

The check itself builds and runs the real image (as root, with buildah); these tests keep what
it relies on honest: its budgets are the documented ones, its write detector sees writes, and
the Dockerfile has the one base image it stands in for.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
SCRIPT = (REPO / ".ci" / "image-check").read_text(encoding="utf-8")
DOCS = (REPO / "docs" / "kubernetes.md").read_text(encoding="utf-8")


def _image_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_image_run", REPO / ".ci" / "image_run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_image_run"] = module
    spec.loader.exec_module(module)
    return module


image_run = _image_run()


def _budget(name: str) -> int:
    match = re.search(rf"^{name}=(\d+)", SCRIPT, re.M)
    assert match, name
    return int(match[1])


def test_the_size_budgets_are_the_documented_ones_and_above_the_measurement() -> None:
    rows = re.findall(r"^\| (the whole image|the Dockerfile's own layers)[^|]*\| ([\d.]+) MB \| "
                      r"(\d+) MB \|$", DOCS, re.M)
    assert [(what, int(budget)) for what, _, budget in rows] == [
        ("the whole image", _budget("IMAGE_BUDGET_MB")),
        ("the Dockerfile's own layers", _budget("OWN_LAYERS_BUDGET_MB")),
    ]
    for _, measured, budget in rows:
        assert float(measured) < int(budget)


def test_the_dockerfile_has_one_base_image_for_both_stages() -> None:
    """image-check stands a Debian base in for it, under its name (one name for all stages)."""
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", (REPO / "Dockerfile").read_text(), re.M)
    assert len(froms) == 2
    assert {image for image, _ in froms} == {"python:3.13-slim"}
    assert "--include=ca-certificates,python3.13,python3.13-venv,python-is-python3" in \
        SCRIPT.replace("BASE_PACKAGES=", "--include=")


def test_image_check_installs_its_tools_or_fails_and_is_never_skipped() -> None:
    assert 'apt-get install -y -q "${missing[@]}"' in SCRIPT
    assert "this check is not skipped" in SCRIPT
    assert "skip" not in SCRIPT.replace("this check is not skipped", "")
    assert "--format docker" in SCRIPT and "--isolation chroot" in SCRIPT
    assert "-v \"$HOST_CA:$HOST_CA:ro\"" in SCRIPT


def test_the_write_detector_sees_created_changed_and_removed_paths(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    for directory in ("etc", "tmp", "var/lib/fhir-sidecar", "proc", "usr/bin"):
        (root / directory).mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0\n")
    (root / "usr" / "bin" / "python").write_text("#!")
    before = image_run.snapshot(root)

    # Inside the state directory and under /proc: not the image's, not reported.
    (root / "var/lib/fhir-sidecar" / "mitmproxy").mkdir()
    (root / "proc" / "self").mkdir()
    assert image_run.diff(before, image_run.snapshot(root)) == []

    (root / "tmp" / "scratch").write_text("x")
    (root / "etc" / "passwd").write_text("root:x:0:0\nmore\n")
    (root / "usr" / "bin" / "python").unlink()
    os.chmod(root / "etc", 0o700)
    changes = image_run.diff(before, image_run.snapshot(root))
    assert "created /tmp/scratch" in changes
    assert "changed /etc/passwd" in changes
    assert "removed /usr/bin/python" in changes
    assert "changed /etc" in changes  # its mode
    assert "changed /tmp" in changes  # a directory changes when an entry comes or goes


def test_the_run_drops_to_the_images_user_without_privileges(tmp_path: Path) -> None:
    inspect = {"Docker": {"config": {
        "User": "10001:10001", "Env": ["PATH=/opt/fhir-sidecar/bin:/usr/bin"],
        "WorkingDir": "/var/lib/fhir-sidecar", "Entrypoint": ["fhir-sidecar"], "Cmd": ["run"],
        "Healthcheck": {"Test": ["CMD", "python", "-c", "pass"]}}}}
    image = image_run.Image(tmp_path, inspect, tmp_path / "config", tmp_path / "state")
    argv = image.argv(["fhir-sidecar", "run"])
    setpriv = argv[argv.index("/usr/bin/setpriv"):]
    assert setpriv == ["/usr/bin/setpriv", "--reuid=10001", "--regid=10001", "--clear-groups",
                       "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
                       "fhir-sidecar", "run"]
    mounts = argv[argv.index("-c") + 1]
    assert f"--bind -o ro '{tmp_path / 'config'}' '{tmp_path}/etc/fhir-sidecar/config'" in mounts
    assert f"--root='{tmp_path}' --wd='/var/lib/fhir-sidecar'" in mounts
