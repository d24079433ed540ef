"""A real forward proxy for egress tests: Debian's tinyproxy, started on a free loopback port.

``with Tinyproxy(tmp_path, auth=("user", "pass")) as proxy:`` then ``proxy.url`` and
``proxy.connects()`` (the ``host:port`` of every CONNECT it was asked for, from its own log).
It runs in the foreground as a child process and is stopped by its PID.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from support.requirements import missing
from support.sidecar_process import free_port, wait_until

BINARY = os.environ.get("FHIR_SIDECAR_TEST_TINYPROXY", "/usr/bin/tinyproxy")
_CONNECT = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/1\.[01]")


def require_tinyproxy() -> None:
    """Skip without tinyproxy; in CI, fail (support/requirements.py)."""
    if shutil.which(BINARY) is None:
        missing("tinyproxy is not installed (apt-get install tinyproxy; .ci/run does)")


class Tinyproxy:
    def __init__(self, directory: Path, *, auth: tuple[str, str] | None = None) -> None:
        require_tinyproxy()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_file = directory / "tinyproxy.log"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            "MaxClients 50",
            "LogLevel Info",
            f'LogFile "{self.log_file}"',
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
        ]
        if auth is not None:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        self.config = directory / "tinyproxy.conf"
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Tinyproxy:
        self.proc = subprocess.Popen([BINARY, "-d", "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._accepting, 10, message="tinyproxy to listen")
        return self

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"tinyproxy exited with {self.proc.returncode}: {self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def connects(self) -> list[str]:
        """The ``host:port`` of every CONNECT request the proxy received."""
        return _CONNECT.findall(self.log())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Tinyproxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
