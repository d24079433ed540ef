"""The audit file: JSON lines, mode 0600, in the state directory, rotated by size.

Each record is one ``write`` of one line on a file opened for appending, so a reader (or a
crash) never sees half a record from the sidecar's side. Lines reach the disk in groups:
:meth:`AuditFile.durable` waits for the next ``fsync``, which runs at most every 200 ms
while records arrive. Rotation renames ``audit.jsonl`` to ``audit.jsonl.1`` (the older ones
move up by one); ``keep: 0`` never deletes a rotated file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import IO

from sidecar.audit.records import Record

FSYNC_EVERY_SECONDS = 0.2


class AuditUnavailable(Exception):
    """A record that cannot be kept: the request that needs it must not proceed when the
    audit is required."""

    # The result label it is counted under (fhir_sidecar_audit_records_total).
    result = "failed"


class AuditFile:
    name = "file"

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._handle: IO[bytes] | None = None
        self._size = 0
        self._dirty = False
        self._synced: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def _open(self) -> IO[bytes]:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.fchmod(fd, 0o600)
            self._handle = os.fdopen(fd, "ab", buffering=0)
            self._size = os.fstat(fd).st_size
        return self._handle

    def accepting(self) -> bool:
        """Whether the file can be written now (it is opened, or opened again after a
        failure: a disk that came back is used again)."""
        try:
            self._open()
        except OSError:
            return False
        return True

    def write(self, record: Record) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            handle = self._open()
            handle.write(line)
        except OSError as exc:
            self._close()
            raise AuditUnavailable(f"the audit file {self.path} cannot be written: "
                                   f"{exc.strerror or exc}") from None
        self._size += len(line)
        self._dirty = True
        self._schedule_sync()

    def _rotate(self) -> None:
        self._close()
        rotated = sorted((int(p.suffix[1:]), p) for p in self.path.parent.glob(
            self.path.name + ".*") if p.suffix[1:].isdigit())
        for number, path in reversed(rotated):
            if self.keep and number >= self.keep:
                path.unlink()
            else:
                path.rename(self.path.with_name(f"{self.path.name}.{number + 1}"))
        self.path.rename(self.path.with_name(self.path.name + ".1"))

    def _schedule_sync(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.sync()  # no event loop (a command-line use): sync at once
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._sync_soon())

    async def _sync_soon(self) -> None:
        await asyncio.sleep(FSYNC_EVERY_SECONDS)
        self.sync()

    def sync(self) -> None:
        if self._handle is not None and self._dirty:
            self._dirty = False
            with contextlib.suppress(OSError):  # a later write reports a broken disk
                os.fsync(self._handle.fileno())
        if self._synced is not None:
            self._synced.set()
            self._synced = None

    async def durable(self) -> None:
        """Return once every record written so far is on disk (the next group fsync)."""
        if not self._dirty:
            return
        if self._synced is None:
            self._synced = asyncio.Event()
        event = self._synced
        self._schedule_sync()
        await event.wait()

    def _close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            finally:
                self._handle = None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sync()
        self._close()
