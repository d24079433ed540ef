"""Run a built image's entrypoint from its mounted root filesystem and check it (.ci/image-check).

    python .ci/image_run.py ROOTFS IMAGE_CONFIG.json

ROOTFS is the image's root filesystem, mounted by `buildah mount`; IMAGE_CONFIG.json is
`buildah inspect --type image`'s output. There is no container engine here (`podman run` does
not work on these machines), so the script does what one would, by hand: a private mount
namespace with /proc, /dev and the config directory (read-only, as the chart and
`docker run -v ...:ro` mount it), a chroot into ROOTFS, then `setpriv` to the image's USER with
no supplementary groups, no capabilities and no new privileges (what the chart's
securityContext asks for), and the image's Env, WorkingDir, Entrypoint and Cmd.

Upstream: the test kit's TLS FHIR server on loopback (its own CA, trusted through the
connection's `verify: custom` bundle) that demands HTTP Basic credentials. Checked:

- the sidecar logs its ready event; the process runs as the image's USER (10001), with no
  capabilities and no_new_privs;
- a request without credentials (and one carrying the app's own, wrong ones) goes through, and
  the upstream received exactly the configured Basic credentials;
- the image's HEALTHCHECK command exits 0 while it runs, and not 0 once it has stopped;
- `check -c FILE` (the documented `docker run IMAGE check`) exits 0;
- SIGTERM: exit 0;
- nothing on the root filesystem outside /var/lib/fhir-sidecar was created, changed or
  removed (every path's type, mode, owner, size and mtime/ctime, before and after).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sidecar.testkit.auth_checks import basic_auth_check
from sidecar.testkit.fhir_server import FhirTestServer
from sidecar.testkit.pki import DemoPKI
from sidecar.testkit.ports import free_port

STATE_DIR = "/var/lib/fhir-sidecar"  # the image's one writable place (docs/kubernetes.md)
CONFIG_DIR = "/etc/fhir-sidecar/config"
# Mount points the run adds; their contents are not the image's.
NOT_THE_IMAGE = ("/proc", "/dev", "/sys")
USERNAME = "svc-fhir"
PASSWORD = "image check: pa55 w/ spaces & colons:"  # a secret with the awkward characters


def fail(message: str) -> None:
    print(f"image-check: FAILED: {message}", file=sys.stderr)
    raise SystemExit(1)


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under root except the state dir and mount points: what a write would change."""
    skip = {STATE_DIR, *NOT_THE_IMAGE}
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = "/" + os.path.relpath(dirpath, root).removeprefix(".").lstrip("/")
        kept = []
        for name in dirnames:
            rel = f"{rel_dir.rstrip('/')}/{name}"
            if rel in skip:
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in [*kept, *filenames]:
            rel = f"{rel_dir.rstrip('/')}/{name}"
            st = os.lstat(os.path.join(dirpath, name))
            seen[rel] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid, st.st_size,
                         st.st_mtime_ns, st.st_ctime_ns)
        st = os.lstat(dirpath)  # a directory's mtime changes when an entry comes or goes
        seen[rel_dir] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid, None,
                         st.st_mtime_ns, st.st_ctime_ns)
    return seen


def diff(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> list[str]:
    out = [f"created {p}" for p in sorted(after.keys() - before.keys())]
    out += [f"removed {p}" for p in sorted(before.keys() - after.keys())]
    out += [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
    return out


class Image:
    """The image's runtime settings, and how to start a command in it as a container would."""

    def __init__(self, rootfs: Path, inspect: dict[str, Any], config_dir: Path,
                 volume: Path) -> None:
        cfg = inspect["Docker"]["config"]  # --format docker: HEALTHCHECK lives here
        self.rootfs = rootfs
        self.config_dir = config_dir
        self.volume = volume
        self.user = cfg.get("User") or "0:0"
        self.env = dict(item.split("=", 1) for item in cfg.get("Env") or [])
        self.workdir = cfg.get("WorkingDir") or "/"
        self.entrypoint: list[str] = cfg.get("Entrypoint") or []
        self.cmd: list[str] = cfg.get("Cmd") or []
        self.healthcheck: list[str] = (cfg.get("Healthcheck") or {}).get("Test") or []

    def argv(self, command: list[str]) -> list[str]:
        uid, _, gid = self.user.partition(":")
        if not (uid.isdigit() and gid.isdigit()):
            fail(f"the image's USER is {self.user!r}; it must be numeric UID:GID")
        root = str(self.rootfs)
        # The mounts live in a private mount namespace: they vanish with its last process.
        mounts = (
            f"mount -t proc proc '{root}/proc' && "
            f"mount --rbind /dev '{root}/dev' && mount --make-rslave '{root}/dev' && "
            f"mount --bind -o ro '{self.config_dir}' '{root}{CONFIG_DIR}' && "
            f"mount --bind '{self.volume}' '{root}{STATE_DIR}' && "
            f'exec unshare --root=\'{root}\' --wd=\'{self.workdir}\' "$@"'
        )
        return [
            "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mounts, "sh",
            # From here on inside the image: its own setpriv, its own interpreter.
            "/usr/bin/setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *command,
        ]

    def start(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(command), env={**self.env, **env}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )

    def run(self, command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
        proc = self.start(command, env)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out


def read_log(proc: subprocess.Popen[str], lines: list[str], ready: threading.Event) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        try:
            if json.loads(line).get("event") == "ready":
                ready.set()
        except (ValueError, AttributeError):
            pass


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def main(rootfs: Path, inspect_file: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="image-run."))
    try:
        check_image(rootfs, json.loads(inspect_file.read_text()), work)
    finally:
        shutil.rmtree(work)


def check_image(rootfs: Path, inspect: dict[str, Any], work: Path) -> None:
    config_dir = work / "config"
    config_dir.mkdir()
    # VOLUME /var/lib/fhir-sidecar: like Docker's anonymous volume (or the chart's emptyDir), a
    # directory of its own, seeded from the image's and owned like it.
    volume = work / "state"
    shutil.copytree(rootfs / STATE_DIR.lstrip("/"), volume, symlinks=True)
    image = Image(rootfs, inspect, config_dir, volume)
    if image.healthcheck[:1] != ["CMD"]:
        fail(f"no exec-form HEALTHCHECK in the image config (got {image.healthcheck!r}); "
             "was it built with --format docker?")
    uid, gid = (int(x) for x in image.user.split(":"))
    for d in (CONFIG_DIR, STATE_DIR, *NOT_THE_IMAGE):
        if not (rootfs / d.lstrip("/")).is_dir():
            fail(f"{d} is missing from the image")
    state = os.stat(rootfs / STATE_DIR.lstrip("/"))
    if (state.st_uid, state.st_gid) != (uid, gid):
        fail(f"{STATE_DIR} belongs to {state.st_uid}:{state.st_gid}, not the USER {uid}:{gid}")
    os.chown(volume, state.st_uid, state.st_gid)
    volume.chmod(stat.S_IMODE(state.st_mode))

    pki = DemoPKI(work / "pki")
    (config_dir / "ca.pem").write_bytes(pki.ca_bundle_path.read_bytes())
    (config_dir / "password").write_text(PASSWORD + "\n")
    for f in config_dir.iterdir():
        f.chmod(0o644)  # the USER reads them (a Secret volume's default mode)
    config_dir.chmod(0o755)
    listen, admin = free_port(), free_port()
    expected = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()

    with FhirTestServer(pki.server(), auth=basic_auth_check(USERNAME, PASSWORD)) as upstream:
        (config_dir / "config.yaml").write_text(json.dumps({  # JSON is YAML
            "admin": {"listen": f"127.0.0.1:{admin}"},
            "basic_auth": {"image-basic": {
                "username": USERNAME, "password_file": f"{CONFIG_DIR}/password"}},
            "connections": {"fhir": {
                "url": upstream.base_url,
                "listen": f"127.0.0.1:{listen}",
                "auth": {"basic": "image-basic"},
                "tls": {"verify": "custom", "ca_bundle": f"{CONFIG_DIR}/ca.pem"},
            }},
        }, indent=2))
        # The documented way to point the HEALTHCHECK at another admin port.
        run_env = {"FHIR_SIDECAR_HEALTH_URL": f"http://127.0.0.1:{admin}/healthz"}

        code, out = image.run([*image.entrypoint, "check", "-c", f"{CONFIG_DIR}/config.yaml"],
                              run_env, timeout=60)
        print(out.rstrip())
        if code != 0:
            fail(f"`check -c {CONFIG_DIR}/config.yaml` in the image exited {code}")

        # The comparison must see a write: the USER writes a probe to /tmp (world-writable in
        # every image), the snapshots differ, the probe goes; only then the real "before".
        before = snapshot(rootfs)
        code, out = image.run(["python", "-c", "open('/tmp/image-check-probe', 'w').close()"],
                              run_env, timeout=30)
        probe = rootfs / "tmp" / "image-check-probe"
        if code != 0 or "created /tmp/image-check-probe" not in diff(before, snapshot(rootfs)):
            fail(f"the write check did not see a probe written to /tmp (exit {code}: {out})")
        probe.unlink()

        before = snapshot(rootfs)
        started = time.monotonic()
        proc = image.start([*image.entrypoint, *image.cmd], run_env)
        lines: list[str] = []
        ready = threading.Event()
        reader = threading.Thread(target=read_log, args=(proc, lines, ready), daemon=True)
        reader.start()
        try:
            if not ready.wait(60):
                fail(f"no ready event within 60 s (exit code {proc.poll()})")
            print(f"ready after {time.monotonic() - started:.1f} s: "
                  f"{' '.join([*image.entrypoint, *image.cmd])} as {image.user}")

            status = proc_status(proc.pid)
            exe = os.readlink(f"/proc/{proc.pid}/exe")
            print(f"process {proc.pid}: Uid {status['Uid']}, Gid {status['Gid']}, "
                  f"Groups '{status['Groups']}', CapEff {status['CapEff']}, "
                  f"NoNewPrivs {status['NoNewPrivs']}, exe {exe}")
            if status["Uid"].split() != [str(uid)] * 4 or status["Gid"].split() != [str(gid)] * 4:
                fail(f"the sidecar runs as Uid {status['Uid']} Gid {status['Gid']}, not {uid}")
            if status["Groups"] or int(status["CapEff"], 16) or status["NoNewPrivs"] != "1":
                fail("the sidecar kept supplementary groups, capabilities or may gain privileges")
            if not exe.startswith(str(rootfs) + "/"):
                fail(f"the sidecar's interpreter {exe} is not the image's")

            for app_headers in ({}, {"Authorization": "Basic YXBwOndyb25n"}):
                upstream.clear()
                code, body = get(f"http://127.0.0.1:{listen}/Patient?name=Chalmers",
                                 app_headers)
                if code != 200 or json.loads(body).get("resourceType") != "Bundle":
                    fail(f"GET /Patient through the sidecar: {code} {body[:300]!r}")
                seen = upstream.wait_for_requests(1)
                got = seen[0].headers.get("Authorization")
                if got != expected:
                    fail(f"the upstream received Authorization {got!r}, not the configured "
                         "Basic credentials")
            print(f"request through the sidecar: 200, upstream got {expected[:10]}... "
                  "(also when the app sent its own)")

            code, out = image.run(image.healthcheck[1:], run_env, timeout=10)
            if code != 0:
                fail(f"the HEALTHCHECK command exited {code}: {out}")
            print(f"HEALTHCHECK {image.healthcheck[1:]}: exit 0")

            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            if code != 0:
                fail(f"exit code {code} after SIGTERM (want 0)")
            print("SIGTERM: exit 0")
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(5)
            print("\n".join(lines[-60:]), file=sys.stderr)
            raise
        reader.join(5)

    code, _ = image.run(image.healthcheck[1:], run_env, timeout=10)
    if code == 0:
        fail("the HEALTHCHECK command exits 0 with the sidecar stopped: it checks nothing")
    print(f"HEALTHCHECK with the sidecar stopped: exit {code}")

    after = snapshot(rootfs)
    changes = diff(before, after)
    if changes:
        fail("written outside " + STATE_DIR + ":\n  " + "\n  ".join(changes[:50]))
    state_files = sorted(str(p.relative_to(volume)) for p in volume.rglob("*"))
    print(f"root filesystem: {len(before)} paths unchanged outside {STATE_DIR}; "
          f"written there: {', '.join(state_files) or 'nothing'}")
    print("image-run: all passed")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]))
