"""The FHIR sink: an on-disk queue of audit records, sent as AuditEvents to an Audit Record
Repository (docs/audit.md#the-fhir-sink-auditevents-in-an-audit-record-repository).

On disk, in ``queue_dir`` (mode 0700):

- ``NNNNNNNNNNNN.q``: segments of JSON lines, one ``{"record": ..., "server": ...}`` per
  record, appended in order (``server``: the base URL of the record's connection when it was
  written, for the AuditEvent's server agent). A started sink always appends to a new segment,
  so a line torn by a crash is only ever at the end of an older one (skipped, logged).
- ``cursor``: ``{"segment", "offset"}`` of the first record the repository has not confirmed,
  replaced atomically (written, fsynced, renamed) after every confirmed batch. Segments before
  it are deleted.
- ``rejected/YYYY-MM-DD.jsonl``: records the repository refused, moved aside with the status
  and the reason (never deleted by the sidecar; not counted in ``max_queue_bytes``).
- ``lock``: held (``flock``) while a sink uses the directory, so two processes never share it.

Writes are one ``write(2)`` of a whole line and reach the disk in groups: an ``fsync`` at most
200 ms after the first unsynced record (in a worker thread, so the event loop never waits for
the disk); :meth:`FhirQueue.durable` waits for it. Delivery is at least once: each AuditEvent is
written with ``PUT AuditEvent/{audit_id}`` in a batch Bundle, so a resend overwrites itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.audit.balp import audit_event
from sidecar.audit.file_sink import AuditUnavailable
from sidecar.audit.records import Record
from sidecar.report.logs import log_event

if TYPE_CHECKING:
    import httpx

    from sidecar.audit.trail import AuditObserver, AuditSink
    from sidecar.config.models import AuditFhirSink
    from sidecar.runtime.snapshot import CompiledConnection, Snapshot

FSYNC_EVERY_SECONDS = 0.2
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
# How long a graceful stop keeps sending what is queued; the rest waits on disk.
CLOSE_DRAIN_SECONDS = 5.0
FULL_LOG_EVERY_SECONDS = 60.0
# A repository's answer that refuses the record itself: moved aside. Any other 4xx (401, 403,
# 404, 405, 408, 415, 429, ...) is about the credentials, the URL or the load, not the record:
# retried with backoff like a 5xx.
REFUSED = frozenset({400, 409, 412, 413, 422})
SEGMENT_SUFFIX = ".q"
_LINE_ESTIMATE = 2048  # accepting(): room for one more record of the usual size
_REASON_CHARS = 200
FHIR_JSON = "application/fhir+json"
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class AuditQueueFull(AuditUnavailable):
    """The queue holds ``max_queue_bytes``: counted ``result="full"``."""

    result = "full"


class _Retry(Exception):
    """Delivery failed for a reason that is not the records' (outage, credentials, URL)."""


@dataclass(frozen=True)
class _Entry:
    segment: int
    start: int
    end: int
    record: Record | None  # None: a line that is not a queued record (moved aside as is)
    server: str | None
    raw: bytes

    @property
    def audit_id(self) -> str:
        return str(self.record.get("audit_id")) if self.record is not None else "?"


@dataclass(frozen=True)
class _Sent:
    pass


@dataclass(frozen=True)
class _Rejected:
    status: int
    reason: str


_Result = _Sent | _Rejected | None  # None: not final (retried later)
SENT = _Sent()

# One sink per queue directory in this process: a reload that changes batch_size (say) gets
# the running sink back with its new settings, instead of a second sender on the same files.
_live: dict[Path, FhirQueue] = {}


def fhir_sink(settings: AuditFhirSink, current: Callable[[], Snapshot | None], state_dir: Path,
              observer: AuditObserver | None) -> AuditSink:
    """The FHIR sink for ``settings`` (the running one for its directory, if any). Started at
    once when an event loop runs (a queue left by an earlier run is sent without waiting for a
    new record), else on the first ``write`` made from one."""
    directory = (state_dir / settings.queue_dir).absolute()
    sink = _live.get(directory)
    if sink is None or sink.closing:
        # (A sink still closing holds the directory's lock for up to CLOSE_DRAIN_SECONDS: the
        # new one refuses records until it can open the directory.)
        sink = _live[directory] = FhirQueue(directory, settings, current, observer)
    else:
        sink.reconfigure(settings, current, observer)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return sink
    sink.start()
    return sink


class FhirQueue:
    name = "fhir"

    def __init__(self, directory: Path, settings: AuditFhirSink,
                 current: Callable[[], Snapshot | None], observer: AuditObserver | None) -> None:
        self.directory = directory
        self.settings = settings
        self._current = current
        self._observer = observer
        self.closed = False
        self._closing = False
        self._opened = False
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the segment being appended to
        self._segment = 0  # its number
        self._sizes: dict[int, int] = {}  # every segment on disk, with its size
        self._cursor = (0, 0)  # the first record not confirmed: (segment, offset)
        self._read = (0, 0)  # the first record not yet taken into a batch
        self._pending = 0  # bytes not confirmed (the queue's size)
        self._written = self._synced = 0  # write generations: fsynced up to _synced
        self._to_close: list[int] = []  # segments rotated out: fsynced, then closed
        self._dir_dirty = False  # a segment was created: the directory needs an fsync
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_done = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._unread = 0  # records written since the sender last caught up
        self._due: float | None = None  # when the oldest unread record must be sent
        self._inflight: list[_Entry] = []
        self._failures = 0
        self._client: httpx.AsyncClient | None = None
        self._client_dest: CompiledConnection | None = None
        self._full_since_log = 0
        self._full_logged_at = -FULL_LOG_EVERY_SECONDS
        self._torn_logged = False

    # --- the AuditSink interface ---------------------------------------------------------

    def reconfigure(self, settings: AuditFhirSink, current: Callable[[], Snapshot | None],
                    observer: AuditObserver | None) -> None:
        self.settings, self._current, self._observer = settings, current, observer
        self._wake.set()

    @property
    def closing(self) -> bool:
        return self._closing or self.closed

    @property
    def _segment_bytes(self) -> int:
        return max(16384, min(4 << 20, self.settings.max_queue_bytes // 8))

    def accepting(self) -> bool:
        if self.closed:
            return False
        try:
            self._open()
        except (OSError, AuditUnavailable):
            return False
        return self._pending + _LINE_ESTIMATE <= self.settings.max_queue_bytes

    def write(self, record: Record) -> None:
        if self.closed:
            raise AuditUnavailable("the FHIR audit sink is closed")
        entry: dict[str, Any] = {"record": record}
        server = self._server_of(record.get("connection"))
        if server is not None:
            entry["server"] = server
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        try:
            self._open()
        except OSError as exc:
            raise AuditUnavailable(f"the audit queue {self.directory} cannot be opened: "
                                   f"{exc.strerror or exc}") from None
        if self._pending + len(line) > self.settings.max_queue_bytes:
            self._refuse_full()
        try:
            if self._sizes[self._segment] >= self._segment_bytes:
                self._rotate()
            self._append(line)
        except OSError as exc:
            raise AuditUnavailable(f"the audit queue {self.directory} cannot be written: "
                                   f"{exc.strerror or exc}") from None
        self._pending += len(line)
        self._written += 1
        self._unread += 1
        if self._due is None:
            self._due = time.monotonic() + self.settings.flush_seconds
            self._wake.set()
        elif self._unread >= self.settings.batch_size:
            self._wake.set()
        self._report_size()
        self._schedule_sync()
        if self._sender is None:
            self.start()

    async def durable(self) -> None:
        """Return once every record written so far is on disk (the next group fsync)."""
        target = self._written
        while self._synced < target:
            done = self._sync_done
            self._schedule_sync()
            await done.wait()

    def start(self) -> None:
        """Start sending (needs a running event loop); what an earlier run left is sent first."""
        if self._sender is not None or self.closing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        try:
            self._open()
        except (OSError, AuditUnavailable) as exc:
            log_event("audit_queue_unavailable", logging.ERROR,
                      f"the audit queue {self.directory} cannot be opened: {exc}")
            return
        self._sender = loop.create_task(self._send_loop(), name="audit-fhir-sender")

    async def aclose(self) -> None:
        """Send what is queued for up to CLOSE_DRAIN_SECONDS, then stop; everything written is
        fsynced and stays on disk until the repository has confirmed it."""
        if self.closed:
            return
        self._closing = True
        self._wake.set()
        sender, self._sender = self._sender, None
        if sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(sender), CLOSE_DRAIN_SECONDS)
            except TimeoutError:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
        self.closed = True
        if self._sync_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task  # never cancelled mid-fsync: its thread uses the fds
        await self._sync_now()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._close_files()
        if _live.get(self.directory) is self:
            del _live[self.directory]

    # --- writing -------------------------------------------------------------------------

    def _server_of(self, connection: str | None) -> str | None:
        if connection is None:
            return None
        snapshot = self._current()
        conn = snapshot.connections.get(connection) if snapshot is not None else None
        return conn.upstream.base_url if conn is not None else None

    def _refuse_full(self) -> None:
        """Log (at most once a minute) and refuse; the trail counts it ``result="full"``."""
        self._full_since_log += 1
        now = time.monotonic()
        if now - self._full_logged_at >= FULL_LOG_EVERY_SECONDS:
            log_event("audit_queue_full", logging.ERROR, (
                f"the FHIR audit queue {self.directory} holds {self._pending} bytes "
                f"(max_queue_bytes {self.settings.max_queue_bytes}): "
                f"{self._full_since_log} record(s) refused since the last such line; is the "
                "audit repository reachable?"))
            self._full_logged_at, self._full_since_log = now, 0
        raise AuditQueueFull(f"the FHIR audit queue is full ({self._pending} bytes)")

    def _open(self) -> None:
        if self._opened:
            return
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise AuditUnavailable(f"the audit queue {directory} is used by another "
                                   "process") from None
        try:
            (directory / "rejected").mkdir(exist_ok=True, mode=0o700)
            segments = sorted(int(p.name[:-len(SEGMENT_SUFFIX)])
                              for p in directory.glob("*" + SEGMENT_SUFFIX)
                              if p.name[:-len(SEGMENT_SUFFIX)].isdigit())
            cursor = _read_cursor(directory / "cursor")
            if cursor is None:
                cursor = (segments[0] if segments else 1, 0)
            for number in segments:
                if number < cursor[0]:  # confirmed: its deletion was interrupted
                    with contextlib.suppress(OSError):
                        self._path(number).unlink()
            sizes = {n: self._path(n).stat().st_size for n in segments if n >= cursor[0]}
            # Always past the cursor's segment: a cursor never points into new records.
            segment = max([*sizes, cursor[0]]) + 1
            fd = os.open(self._path(segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except BaseException:
            os.close(lock_fd)
            raise
        sizes[segment] = 0
        self._lock_fd, self._fd, self._segment, self._sizes = lock_fd, fd, segment, sizes
        self._cursor = self._read = cursor
        self._pending = self._queued_bytes()
        self._dir_dirty = True
        self._opened = True
        if self._pending:  # left by an earlier run: due now
            self._due = time.monotonic()
            log_event("audit_queue_resumed", logging.INFO,
                      f"the FHIR audit queue {directory} holds {self._pending} bytes from an "
                      "earlier run; sending them")
        self._report_size()

    def _queued_bytes(self) -> int:
        """Bytes from the cursor on (a cursor past its segment's end counts none of it)."""
        segment, offset = self._cursor
        return sum(size if number > segment else max(0, size - offset)
                   for number, size in self._sizes.items() if number >= segment)

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}{SEGMENT_SUFFIX}"

    def _rotate(self) -> None:
        assert self._fd is not None
        segment = self._segment + 1
        fd = os.open(self._path(segment), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._to_close.append(self._fd)
        self._fd, self._segment = fd, segment
        self._sizes[segment] = 0
        self._dir_dirty = True

    def _append(self, line: bytes) -> None:
        assert self._fd is not None
        size = self._sizes[self._segment]
        try:
            written = os.write(self._fd, line)
            while written < len(line):
                written += os.write(self._fd, line[written:])
        except OSError:
            # Never leave half a line for the next one to be appended to.
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                self._rotate()  # the torn end stays at the end of an older segment
            raise
        self._sizes[self._segment] = size + len(line)

    def _schedule_sync(self) -> None:
        if self.closed:
            return  # aclose made its last fsync; no thread may use the files it closes
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a command-line use): sync at once
            _fsync_all(self._fd, self._take_to_close(), self._take_dir())
            self._synced = self._written
            return
        if self._sync_task is None or self._sync_task.done():
            self._sync_task = loop.create_task(self._sync_soon(), name="audit-fhir-fsync")

    async def _sync_soon(self) -> None:
        while self._synced < self._written or self._to_close:
            await asyncio.sleep(FSYNC_EVERY_SECONDS)
            await self._sync_now()

    async def _sync_now(self) -> None:
        target = self._written
        fd, to_close, directory = self._fd, self._take_to_close(), self._take_dir()
        try:
            await asyncio.to_thread(_fsync_all, fd, to_close, directory)
        except OSError as exc:  # the next write says whether the disk is gone
            log_event("audit_queue_fsync_failed", logging.ERROR,
                      f"the audit queue {self.directory}: fsync failed: {exc.strerror or exc}")
        self._synced = max(self._synced, target)
        done, self._sync_done = self._sync_done, asyncio.Event()
        done.set()

    def _take_to_close(self) -> list[int]:
        to_close, self._to_close = self._to_close, []
        return to_close

    def _take_dir(self) -> Path | None:
        dirty, self._dir_dirty = self._dir_dirty, False
        return self.directory if dirty else None

    def _close_files(self) -> None:
        for fd in (*self._to_close, self._fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._to_close, self._fd = [], None
        if self._opened:
            # Everything confirmed: no segment is needed (the next start writes past the
            # cursor's segment); else only an empty write segment goes.
            done = self._queued_bytes() == 0
            for number, size in self._sizes.items():
                if done or (number == self._segment and size == 0):
                    with contextlib.suppress(OSError):
                        self._path(number).unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _report_size(self) -> None:
        observer = self._observer
        report = (getattr(observer, "audit_queue", None)
                  or getattr(observer, "audit_queue_bytes", None))
        if report is not None:
            report(self._pending)

    # --- reading -------------------------------------------------------------------------

    def _has_unread(self) -> bool:
        return self._read != (self._segment, self._sizes.get(self._segment, 0))

    def _read_batch(self, limit: int) -> list[_Entry]:
        entries: list[_Entry] = []
        segment, offset = self._read
        while len(entries) < limit and segment <= self._segment:
            if segment not in self._sizes:
                segment, offset = self._next_segment(segment), 0
                continue
            current = segment == self._segment
            try:
                handle = open(self._path(segment), "rb")  # noqa: SIM115 - closed below
            except FileNotFoundError:
                if current:
                    raise
                del self._sizes[segment]  # removed by hand: nothing to send from it
                segment, offset = self._next_segment(segment), 0
                continue
            with handle:
                handle.seek(offset)
                while len(entries) < limit:
                    line = handle.readline()
                    if not line:
                        break
                    if not line.endswith(b"\n"):
                        if current:
                            break  # cannot happen: lines are written whole
                        self._torn(segment, len(line))
                        offset += len(line)
                        break
                    entries.append(_parse(segment, offset, offset + len(line), line))
                    offset += len(line)
            if len(entries) >= limit or current:
                break
            segment, offset = self._next_segment(segment), 0
        self._read = (segment, offset)
        return entries

    def _next_segment(self, segment: int) -> int:
        later = [n for n in self._sizes if n > segment]
        return min(later) if later else self._segment

    def _torn(self, segment: int, length: int) -> None:
        if not self._torn_logged:
            self._torn_logged = True
            log_event("audit_queue_torn", logging.WARNING, (
                f"the audit queue segment {self._path(segment).name} ends in {length} bytes of "
                "an unfinished record (written when the sidecar stopped abruptly); skipped"))

    # --- sending -------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            try:
                if not await self._send_step():
                    return
            except Exception:  # a bug must not end delivery for good
                logging.getLogger(__name__).exception("audit_sender_failed")
                if self._closing:
                    return
                self._failures += 1
                await self._pause()

    async def _send_step(self) -> bool:
        """One batch: wait for it, read it, deliver it. False when the sender should stop."""
        while True:
            if not self._inflight:
                if not await self._wait_for_batch():
                    return False
                try:
                    self._inflight = self._read_batch(self.settings.batch_size)
                except OSError as exc:
                    log_event("audit_queue_unreadable", logging.ERROR,
                              f"the audit queue {self.directory}: {exc.strerror or exc}")
                    if self._closing:
                        return False
                    self._failures += 1
                    await self._pause()
                    continue
                if self._has_unread():
                    self._unread = max(0, self._unread - len(self._inflight))
                else:
                    self._unread, self._due = 0, None
                if not self._inflight:
                    continue
            if await self._deliver():
                if self._failures:
                    log_event("audit_delivery_resumed", logging.INFO, (
                        f"the audit repository accepts AuditEvents again, after "
                        f"{self._failures} failed attempt(s)"))
                    self._failures = 0
                return True
            if self._closing:
                return False
            self._failures += 1
            await self._pause()

    async def _wait_for_batch(self) -> bool:
        """Wait until a batch is due: batch_size records, the oldest one flush_seconds old, or
        a stop. False when stopping with nothing left to send."""
        while True:
            timeout: float | None = None
            if self._has_unread():
                now = time.monotonic()
                if (self._closing or self._unread >= self.settings.batch_size
                        or self._due is None or now >= self._due):
                    return True
                timeout = self._due - now
            elif self._closing:
                return False
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _pause(self) -> None:
        exponent = min(max(self._failures - 1, 0), 30)
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** exponent)
        delay *= random.uniform(0.75, 1.0)
        deadline = time.monotonic() + delay
        while not self._closing and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def _deliver(self) -> bool:
        """Send the batch in flight; confirm the results that are final, in order. True when
        the whole batch was confirmed."""
        batch = self._inflight
        try:
            results = await self._send(batch)
        except _Retry as exc:
            self._delivery_failed(str(exc))
            results = [None] * len(batch)
        final: list[tuple[_Entry, _Sent | _Rejected]] = []
        for entry, result in zip(batch, results, strict=True):
            if result is None:
                break
            final.append((entry, result))
        if final:
            try:
                await self._confirm(final)
            except OSError as exc:
                log_event("audit_queue_unwritable", logging.ERROR, (
                    f"the audit queue {self.directory}: cannot record what the repository "
                    f"confirmed: {exc.strerror or exc}; it will be sent again"))
                return False
        self._inflight = batch[len(final):]
        return not self._inflight

    async def _send(self, batch: list[_Entry]) -> list[_Result]:
        snapshot = self._current()
        dest = snapshot.audit_destination if snapshot is not None else None
        results: list[_Result] = [None] * len(batch)
        events: list[tuple[int, dict[str, Any]]] = []
        for index, entry in enumerate(batch):
            event = _event_of(entry)
            if event is None:
                results[index] = _Rejected(0, "not a queued audit record")
            else:
                events.append((index, event))
        if not events:
            return results
        if snapshot is None or dest is None:
            raise _Retry("no audit.fhir destination in the current configuration")
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": event, "request": {"method": "PUT", "url": f"AuditEvent/{event['id']}"}}
            for _, event in events]}
        response = await self._request(snapshot, dest, "POST", dest.upstream.base_url,
                                       _json_bytes(bundle))
        status = response.status_code
        if 200 <= status < 300:
            answers, statuses = _batch_response(response, len(events))
            for (index, _), answer in zip(events, answers, strict=True):
                results[index] = answer
            passing = [f"AuditEvent {event['id']}: {entry_status}" for (_, event), answer,
                       entry_status in zip(events, answers, statuses, strict=True)
                       if answer is None]
            if passing:
                self._delivery_failed(f"the batch-response has {len(passing)} entries not "
                                      f"stored, retried (first: {passing[0]})")
            return results
        if status in REFUSED:  # the whole Bundle refused: find the record(s) it objects to
            return await self._send_singly(snapshot, dest, events, results)
        raise _Retry(_status_words(response))

    async def _send_singly(self, snapshot: Snapshot, dest: CompiledConnection,
                           events: list[tuple[int, dict[str, Any]]], results: list[_Result]
                           ) -> list[_Result]:
        for index, event in events:
            try:
                response = await self._request(
                    snapshot, dest, "PUT", f"{dest.upstream.base_url}/AuditEvent/{event['id']}",
                    _json_bytes(event))
            except _Retry as exc:
                self._delivery_failed(str(exc))
                break
            status = response.status_code
            if 200 <= status < 300:
                results[index] = SENT
            elif status in REFUSED:
                results[index] = _Rejected(status, _reason(response))
            else:
                self._delivery_failed(_status_words(response))
                break
        return results

    async def _request(self, snapshot: Snapshot, dest: CompiledConnection, method: str,
                       url: str, body: bytes) -> httpx.Response:
        import httpx

        from sidecar.credentials.oauth import TokenUnavailable

        client = self._client_for(dest)
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON, "Prefer": "return=minimal",
                   "User-Agent": "fhir-sidecar-audit"}
        source = snapshot.token_sources.get(dest.oauth) if dest.oauth is not None else None
        token: str | None = None
        try:
            if dest.basic is not None:
                headers["Authorization"] = dest.basic.header()
            elif source is not None:
                token = await source.token()
                headers["Authorization"] = f"Bearer {token}"
            response = await client.request(method, url, content=body, headers=headers)
            if response.status_code == 401 and source is not None and token is not None:
                # The token was refused: drop it and try once more with a new one.
                source.invalidate(token)
                token = await source.token()
                headers["Authorization"] = f"Bearer {token}"
                response = await client.request(method, url, content=body, headers=headers)
        except TokenUnavailable as exc:
            raise _Retry(f"no token for the audit repository: {exc}") from None
        except httpx.HTTPError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        return response

    def _client_for(self, dest: CompiledConnection) -> httpx.AsyncClient:
        """One keep-alive client per compiled destination: a reload that changes its TLS or
        egress proxy gets a new one."""
        import httpx

        from sidecar.credentials.egress_client import httpx_proxy

        if self._client is not None and self._client_dest is dest:
            return self._client
        if self._client is not None:
            old = self._client
            task = asyncio.get_running_loop().create_task(old.aclose())
            _background.add(task)
            task.add_done_callback(_background.discard)
        verify = dest.tls.stdlib_context() if dest.tls is not None else False
        self._client = httpx.AsyncClient(
            verify=verify, trust_env=False, follow_redirects=False,
            proxy=httpx_proxy(dest.via),
            timeout=httpx.Timeout(dest.read_timeout_seconds, connect=dest.timeout_seconds))
        self._client_dest = dest
        return self._client

    def _delivery_failed(self, reason: str) -> None:
        log_event("audit_delivery_failed", logging.WARNING, (
            f"AuditEvents not delivered to the audit repository ({self._pending} bytes "
            f"queued), retried with backoff: {self._scrub(reason)}"))

    def _scrub(self, text: str, limit: int = _REASON_CHARS) -> str:
        snapshot = self._current()
        if snapshot is not None:
            return snapshot.redactor.scrub(text, limit)
        return text[:limit]

    async def _confirm(self, final: list[tuple[_Entry, _Sent | _Rejected]]) -> None:
        rejected = [(entry, result) for entry, result in final if isinstance(result, _Rejected)]
        rejected_path = self.directory / "rejected" / (
            time.strftime("%Y-%m-%d", time.gmtime()) + ".jsonl")
        if rejected:
            lines = b"".join(_rejected_line(entry, result, self._scrub(result.reason))
                             for entry, result in rejected)
            await asyncio.to_thread(_append_durably, rejected_path, lines)
        if len(final) == len(self._inflight):
            cursor = self._read  # past the batch, and past any torn end skipped reading it
        else:
            cursor = (final[-1][0].segment, final[-1][0].end)
        while cursor[0] != self._segment and cursor[1] >= self._sizes.get(cursor[0], 0):
            cursor = (self._next_segment(cursor[0]), 0)  # that segment is done with
        await asyncio.to_thread(_write_cursor, self.directory / "cursor", cursor)
        self._cursor = cursor
        for number in [n for n in self._sizes if n < cursor[0]]:
            del self._sizes[number]
            with contextlib.suppress(OSError):
                self._path(number).unlink()
        self._pending = self._queued_bytes()
        self._report_size()
        if self._observer is not None:
            for _, result in final:
                self._observer.audit_record(self.name,
                                            "sent" if result is SENT else "rejected")
        for entry, result in rejected:
            log_event("audit_record_rejected", logging.WARNING, (
                f"AuditEvent {entry.audit_id} refused by the audit repository"
                f"{f' (HTTP {result.status})' if result.status else ''}: "
                f"{self._scrub(result.reason, 120)}; moved to {rejected_path}"))


_background: set[asyncio.Task[None]] = set()


def _parse(segment: int, start: int, end: int, line: bytes) -> _Entry:
    try:
        data = json.loads(line)
        record = data["record"]
        server = data.get("server")
        if not isinstance(record, dict) or not _FHIR_ID.fullmatch(str(record.get("audit_id"))):
            raise ValueError("no audit_id")
    except (ValueError, KeyError, TypeError):
        return _Entry(segment, start, end, None, None, line)
    return _Entry(segment, start, end, record, server if isinstance(server, str) else None,
                  line)


def _event_of(entry: _Entry) -> dict[str, Any] | None:
    if entry.record is None:
        return None
    try:
        return audit_event(entry.record, entry.server)
    except (KeyError, TypeError, ValueError):
        return None


def _json_bytes(data: object) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _batch_response(response: httpx.Response, count: int) -> tuple[list[_Result], list[int]]:
    """Each entry's final result from a batch-response, in order; ``None`` where the
    repository had a passing problem (5xx, 429, ...)."""
    try:
        bundle = response.json()
        entries = bundle["entry"]
        if bundle.get("resourceType") != "Bundle" or len(entries) != count:
            raise ValueError("not a batch-response of as many entries")
        statuses = [int(str(entry["response"]["status"]).split()[0]) for entry in entries]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise _Retry(f"the audit repository's answer is not a batch-response ({exc})") from None
    results: list[_Result] = []
    for entry, status in zip(entries, statuses, strict=True):
        if 200 <= status < 300:
            results.append(SENT)
        elif status in REFUSED:
            results.append(_Rejected(status, _outcome_text(entry["response"].get("outcome"))
                                     or f"HTTP {status}"))
        else:
            results.append(None)
    return results, statuses


def _outcome_text(outcome: object) -> str:
    """The first issue's diagnostics or details of an OperationOutcome, if any."""
    if not isinstance(outcome, dict):
        return ""
    for issue in outcome.get("issue") or []:
        if isinstance(issue, dict):
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
            if isinstance(text, str) and text:
                return text
    return ""


def _reason(response: httpx.Response) -> str:
    try:
        text = _outcome_text(response.json())
    except ValueError:
        text = ""
    return text or f"HTTP {response.status_code}"


def _status_words(response: httpx.Response) -> str:
    reason = _reason(response)
    words = f"HTTP {response.status_code}"
    return words if reason == words else f"{words}: {reason}"


def _rejected_line(entry: _Entry, result: _Rejected, reason: str) -> bytes:
    moved: dict[str, Any] = {"rejected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "status": result.status or None, "reason": reason}
    if entry.record is not None:
        moved["record"] = entry.record
        if entry.server is not None:
            moved["server"] = entry.server
    else:
        moved["line"] = entry.raw.decode("utf-8", "replace").rstrip("\n")
    return _json_bytes(moved) + b"\n"


def _fsync_all(fd: int | None, to_close: list[int], directory: Path | None) -> None:
    try:
        for closing in to_close:
            os.fsync(closing)
        if fd is not None:
            os.fsync(fd)
        if directory is not None:
            _fsync_dir(directory)
    finally:
        for closing in to_close:
            with contextlib.suppress(OSError):
                os.close(closing)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_durably(path: Path, data: bytes) -> None:
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        _fsync_dir(path.parent)


def _write_cursor(path: Path, cursor: tuple[int, int]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, _json_bytes({"segment": cursor[0], "offset": cursor[1]}))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _read_cursor(path: Path) -> tuple[int, int] | None:
    try:
        data = json.loads(path.read_bytes())
        return int(data["segment"]), int(data["offset"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # Never guess past records: start again from the oldest segment (resent: harmless).
        log_event("audit_queue_cursor_unreadable", logging.WARNING,
                  f"{path}: {exc}; the queue is sent again from its oldest record")
        return None
