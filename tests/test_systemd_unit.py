"""The systemd unit of contrib/systemd/ and its page, docs/systemd.md.

CI machines run no systemd as PID 1, so the unit is never started by systemd here. What can be
checked is: its settings, `systemd-analyze verify` and `security` (.ci/systemd_verify.py, also
run by .ci/release-check), and its command lines run as systemd would run them, with the
documented config reading its secrets from a credentials directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sidecar.config.models import ShutdownSettings
from sidecar.testkit.ports import free_port

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "contrib" / "systemd" / "fhir-sidecar.service"
DOC = REPO / "docs" / "systemd.md"
CREDENTIALS_DIRECTORY = "/run/credentials/fhir-sidecar.service"
EXE = Path(sys.executable).parent / "fhir-sidecar"


def settings(section: str) -> dict[str, list[str]]:
    """Key -> every value given in [section] (systemd allows repeats), comments left out."""
    found: dict[str, list[str]] = {}
    current = None
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


SERVICE = settings("Service")


def one(key: str) -> str:
    assert len(SERVICE.get(key, [])) == 1, f"{key}= must be set once"
    return SERVICE[key][0]


def test_the_unit_runs_as_a_dynamic_user_in_a_read_only_system() -> None:
    """docs/systemd.md: DynamicUser, ProtectSystem=strict, StateDirectory, no capabilities."""
    expected = {
        "DynamicUser": "yes", "ProtectSystem": "strict", "StateDirectory": "fhir-sidecar",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
        "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "SystemCallArchitectures": "native", "UMask": "0077",
    }
    assert {key: one(key) for key in expected} == expected
    assert set(one("RestrictAddressFamilies").split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}
    filters = SERVICE["SystemCallFilter"]
    assert filters[0] == "@system-service" and "~@privileged" in " ".join(filters[1:])
    assert "User" not in SERVICE and "Group" not in SERVICE  # DynamicUser makes them up


def test_secrets_come_through_load_credential() -> None:
    credentials = dict(value.split(":", 1) for value in SERVICE["LoadCredential"])
    assert set(credentials) == {"fhir-password", "admin-token"}
    assert all(path.startswith("/etc/fhir-sidecar/credentials/")
               for path in credentials.values())
    assert "Environment" not in SERVICE or "PASSWORD" not in " ".join(SERVICE["Environment"])


def test_the_stop_timeout_covers_the_default_shutdown() -> None:
    """SIGTERM drains for shutdown.delay_seconds + drain_seconds: systemd must not kill sooner."""
    defaults = ShutdownSettings()
    assert int(one("TimeoutStopSec")) >= defaults.delay_seconds + defaults.drain_seconds + 5
    assert one("KillSignal") == "SIGTERM"


def _exec_start(state_dir: Path, config: Path) -> list[str]:
    argv = shlex.split(one("ExecStart"))
    assert argv[:2] == ["/opt/fhir-sidecar/bin/fhir-sidecar", "run"]
    assert argv[2:] == ["-c", "/etc/fhir-sidecar/config.yaml", "--state-dir", "${STATE_DIRECTORY}"]
    return [str(EXE), "run", "-c", str(config), "--state-dir", str(state_dir)]


def _docs_config() -> dict[str, object]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1
    config: dict[str, object] = yaml.safe_load(blocks[0])
    return config


def _file_settings(node: object, path: str = "") -> dict[str, str]:
    found = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("_file") and isinstance(value, str):
                found[f"{path}{key}"] = value
            found |= _file_settings(value, f"{path}{key}.")
    return found


def test_the_documented_config_reads_only_credentials_the_unit_loads() -> None:
    files = _file_settings(_docs_config())
    assert files, "the page's config refers to its secrets"
    loaded = {value.split(":", 1)[0] for value in SERVICE["LoadCredential"]}
    for field, path in files.items():
        directory, _, name = path.rpartition("/")
        assert directory == CREDENTIALS_DIRECTORY, field
        assert name in loaded, f"{field}: {name} is not loaded by the unit"
    assert f"`$CREDENTIALS_DIRECTORY` is `{CREDENTIALS_DIRECTORY}`" in DOC.read_text()


def test_the_unit_command_lines_run_the_documented_config(tmp_path: Path) -> None:
    """ExecStart= as systemd runs it (state directory, the credentials where systemd puts
    them, here a temporary copy): ready, serving, ExecReload's SIGHUP reloads, KillSignal's
    SIGTERM exits 0 well within TimeoutStopSec."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "fhir-password").write_text("the password")
    (credentials / "admin-token").write_text("a" * 64)
    admin, listen = free_port(), free_port()
    text = json.dumps(_docs_config()).replace(CREDENTIALS_DIRECTORY, str(credentials))
    text = text.replace("127.0.0.1:9901", f"127.0.0.1:{admin}")
    text = text.replace("127.0.0.1:8081", f"127.0.0.1:{listen}")
    config = tmp_path / "config.yaml"
    config.write_text(text)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    reload = shlex.split(one("ExecReload"))
    assert reload[-2:] == ["-HUP", "$MAINPID"] and Path(reload[0]).name == "kill"

    proc = subprocess.Popen(_exec_start(state, config), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    events: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            events.append(json.loads(line).get("event", "") if line.startswith("{") else line)
            if events[-1] == "ready":
                break
        assert "ready" in events, events
        proc.send_signal(signal.SIGHUP)
        for line in proc.stdout:
            if line.startswith("{") and json.loads(line).get("event") == "config_reloaded":
                break
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=int(one("TimeoutStopSec"))) == 0
        assert time.monotonic() - started < int(one("TimeoutStopSec"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert any(state.iterdir()), "the sidecar keeps its state in --state-dir"


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd); .ci/release-check "
           "installs it and runs the same check")


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / ".ci" / "systemd_verify.py"), str(unit),
                           str(EXE)], capture_output=True, text=True, timeout=120)


@needs_systemd_analyze
def test_systemd_analyze_accepts_the_unit() -> None:
    checked = _verify(UNIT)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK" in checked.stdout


@needs_systemd_analyze
def test_systemd_analyze_refuses_a_misspelt_or_weaker_unit(tmp_path: Path) -> None:
    text = UNIT.read_text(encoding="utf-8")
    (tmp_path / "typo").mkdir()
    misspelt = tmp_path / "typo" / UNIT.name
    misspelt.write_text(text.replace("ProtectSystem=strict", "ProtectSytem=strict"))
    checked = _verify(misspelt)
    assert checked.returncode == 1 and "Unknown key 'ProtectSytem'" in checked.stderr
    (tmp_path / "weak").mkdir()
    weaker = tmp_path / "weak" / UNIT.name
    weaker.write_text("\n".join(line for line in text.splitlines() if not line.startswith((
        "DynamicUser=", "CapabilityBoundingSet=", "SystemCallFilter=", "PrivateUsers=",
        "RestrictNamespaces="))))
    checked = _verify(weaker)
    assert checked.returncode == 1 and "exposure above" in checked.stderr


NO_HOME = """
import pwd, sys
def no_entry(uid):
    raise KeyError(uid)
pwd.getpwuid = no_entry  # a UID without a passwd entry, like a DynamicUser without nss-systemd
from sidecar.cli import main
sys.argv = ["fhir-sidecar", *sys.argv[1:]]
sys.exit(main())
"""


def test_without_a_home_directory_only_the_state_directory_must_be_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/systemd.md: the dynamic user has no home; `run` then needs --state-dir (exit 2
    saying so without it), and nothing crashes on the way."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOME", "XDG_STATE_HOME", "FHIR_SIDECAR_STATE_DIR")}
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", NO_HOME, *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("fhir-sidecar "), version.stderr
    run = cli("run", "-c", str(config))
    assert run.returncode == 2
    assert "no state directory: give --state-dir or set FHIR_SIDECAR_STATE_DIR" in run.stderr
    assert "Traceback" not in run.stderr

    from sidecar.config import settings

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("FHIR_SIDECAR_STATE_DIR", raising=False)
    import pwd

    def no_entry(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    assert settings.RuntimeSettings().state_dir is None
    monkeypatch.setenv("FHIR_SIDECAR_STATE_DIR", str(tmp_path / "state"))
    assert settings.RuntimeSettings().state_dir == tmp_path / "state"
