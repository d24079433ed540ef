"""Run the real ``fhir-sidecar`` command as a child process, the way users run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sidecar.testkit.ports import free_port

__all__ = ["SidecarProcess", "free_port", "wait_until", "write_config"]

READY_DEADLINE_SECONDS = 30.0


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def write_config(directory: Path, config: dict[str, Any], name: str = "sidecar.yaml") -> Path:
    """Write the config in one rename, so a running sidecar never sees it half-written."""
    path = directory / name
    staged = directory / f".{name}.staged"
    staged.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    os.replace(staged, path)
    return path


class SidecarProcess:
    """``python -m sidecar run`` with captured JSON log lines."""

    def __init__(self, config: Path, state_dir: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()):
        self.config = config
        self.state_dir = state_dir
        # faulthandler: a crash of the child (a segfault in a C extension) leaves a traceback.
        self.env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._readers: list[threading.Thread] = []

    def start(self, wait_ready: bool = True) -> SidecarProcess:
        # A second start would lose the first process (it would run on, unstopped).
        if self.proc is not None:
            raise RuntimeError("this SidecarProcess was started already")
        self.proc = proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(self.config),
             "--state-dir", str(self.state_dir), *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
        for stream, sink in ((proc.stdout, self.stdout_lines),
                             (proc.stderr, self.stderr_lines)):
            reader = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)
        if wait_ready:
            wait_until(lambda: self.events("ready") or proc.poll() is not None,
                       READY_DEADLINE_SECONDS, message="the sidecar's ready line")
            if not self.events("ready"):
                raise AssertionError(f"sidecar exited with {proc.poll()}:\n{self.output}")
        return self

    @staticmethod
    def _pump(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.stdout_lines + self.stderr_lines)

    def records(self) -> list[dict[str, Any]]:
        found = []
        for line in list(self.stdout_lines):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == event]

    def wait_for_event(self, event: str, predicate: Callable[[dict[str, Any]], bool] = bool,
                       timeout: float = 10.0) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((r for r in self.events(event) if predicate(r)), None)
        return wait_until(find, timeout, message=f"log event {event!r}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for reader in self._readers:
            reader.join(5)
        return int(self.proc.returncode)

    def __enter__(self) -> SidecarProcess:
        # `with SidecarProcess(...).start():` and `with SidecarProcess(...):` both mean one process.
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
