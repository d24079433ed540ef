"""Serving: start the lean mitmproxy master, report readiness, reload on SIGHUP, drain on TERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path
from typing import Any

from sidecar.admin import ListenerState, StatusSources, start_admin
from sidecar.admin.mount import mount_console
from sidecar.audit.records import admin_record
from sidecar.audit.trail import AuditTrail
from sidecar.config.errors import ConfigError, ConfigProblem
from sidecar.config.models import Listener
from sidecar.observe.metrics import SidecarMetrics
from sidecar.proxy.draining import start_draining
from sidecar.proxy.master import build_master
from sidecar.proxy.snapshot_lifecycle import Listeners
from sidecar.report.logs import log_event
from sidecar.runtime.live import LiveConfig, ReloadOutcome
from sidecar.runtime.shutdown import GracefulStop, shutdown_timings
from sidecar.runtime.snapshot import Snapshot
from sidecar.runtime.watch import FileWatcher
from sidecar.tracing import background as background_spans
from sidecar.tracing.setup import Tracing

BIND_DEADLINE_SECONDS = 10.0


def proxy_listeners(snapshot: Snapshot) -> list[Listener]:
    """The listeners mitmproxy binds for ``snapshot`` (all but the admin listener)."""
    return [listener for listener in snapshot.config.listeners() if listener.kind != "admin"]


def check_ports_free(snapshot: Snapshot, already_bound: Snapshot | None = None) -> None:
    """Fail early, with a config-style message, when a listen address is taken.

    ``already_bound``: the running snapshot, whose own addresses are not checked again.
    """
    problems = []
    ours = {listener.address for listener in proxy_listeners(already_bound)
            } if already_bound else set()
    for listener in proxy_listeners(snapshot):
        if listener.address in ours:
            continue
        host, port, path = listener.address.host, listener.address.port, listener.path
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                problems.append(ConfigProblem(snapshot.source, path,
                                              f"cannot listen on {host}:{port}: "
                                              f"{exc.strerror or exc}"))
    if problems:
        raise ConfigError(problems)


def unbound(snapshot: Snapshot, proxyserver: Any) -> list[Listener]:
    """Configured listeners not bound yet. A host name such as ``localhost`` is bound under
    the addresses it resolves to, so for it only the port is compared."""
    bound = {(host, port) for host, port, *_ in proxyserver.listen_addrs()}
    bound_ports = {port for _, port in bound}
    return [listener for listener in proxy_listeners(snapshot)
            if not _is_bound(listener, bound, bound_ports)]


def _is_bound(listener: Listener, bound: set[tuple[str, int]], bound_ports: set[int]) -> bool:
    address = listener.address
    if address.is_ip:
        return (address.host, address.port) in bound
    return address.port in bound_ports


def listener_state(live: LiveConfig, listeners: Listeners, proxyserver: Any) -> ListenerState:
    """For /readyz: every listener of the *current* snapshot bound (a reload may add some)."""
    missing = tuple(str(listener.address) for listener in unbound(live.current, proxyserver))
    return ListenerState(listeners.bound and not missing, missing)


def follow_audit(live: LiveConfig, state_dir: Path, metrics: SidecarMetrics) -> AuditTrail:
    """The audit trail, following the live config; every reload is one of its records."""
    audit = AuditTrail(state_dir, lambda: live.current, metrics)

    def configure(snapshot: Snapshot) -> None:
        audit.configure(snapshot)
        metrics.audit_configured([sink.name for sink in audit.sinks])

    def swapped(_old: Snapshot, new: Snapshot) -> None:
        configure(new)
        task = asyncio.get_running_loop().create_task(audit.close_retired())
        _background.add(task)
        task.add_done_callback(_background.discard)

    def reloaded(outcome: ReloadOutcome) -> None:
        audit.record(admin_record("reload", result="success" if outcome.ok else "failure",
                                  config_sha256=outcome.config_sha256))

    configure(live.current)
    live.on_swap(swapped)
    live.on_reload(reloaded)
    return audit


_background: set[asyncio.Task[None]] = set()


async def serve(config_path: Path, state_dir: Path, env_drain_seconds: float | None = None
                ) -> int:
    """Serve until SIGTERM or SIGINT, then stop gracefully (``sidecar.runtime.shutdown``).

    ``env_drain_seconds``: the deprecated ``FHIR_SIDECAR_DRAIN_SECONDS``, when set.
    """
    metrics = SidecarMetrics()
    live = LiveConfig(config_path, token_observer=metrics)
    check_ports_free(live.current)
    live.add_validator(lambda old, new: check_ports_free(new, already_bound=old))
    metrics.attach(live)
    audit = follow_audit(live, state_dir, metrics)
    tracing = Tracing(metrics)
    tracing.configure(live.current.config.tracing)
    background_spans.install(lambda: tracing.tracer)
    live.on_swap(lambda _old, new: tracing.configure(new.config.tracing))
    master, sidecar = build_master(live, state_dir, observer=metrics, audit=audit,
                                   tracing=tracing)
    listeners = sidecar.listeners
    proxyserver = master.addons.get("proxyserver")
    # Up before the proxy listeners, so that probes see 503 until those are bound.
    sources = StatusSources(live, metrics, lambda: listener_state(live, listeners, proxyserver),
                            audit)
    admin = start_admin(sources)
    if admin is not None:  # the dashboard and /api, on the same admin listener
        mount_console(admin.app, sources, state_dir / "secrets", admin.listen_address.host)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, live.reload)

    run_task = asyncio.create_task(master.run())
    expected = {str(listener.address) for listener in proxy_listeners(live.current)}
    deadline = time.monotonic() + BIND_DEADLINE_SECONDS
    while True:
        if not unbound(live.current, proxyserver) or run_task.done():
            break
        if time.monotonic() > deadline:
            log_event("startup_failed", message="listeners did not come up in time")
            master.shutdown()
            return 1
        await asyncio.sleep(0.02)
    if run_task.done():
        error = run_task.exception() if not run_task.cancelled() else None
        log_event("startup_failed", message=f"the proxy stopped while starting: {error!r}")
        return 1
    listeners.bound = True
    log_event("ready", listeners=sorted(expected),
              connections=sorted(live.current.connections),
              admin=admin.address if admin is not None else None)

    _, deprecation = shutdown_timings(live.current.config, env_drain_seconds)
    if deprecation is not None:
        log_event("deprecated_setting", logging.WARNING, deprecation)

    watcher = asyncio.create_task(FileWatcher(live.watched_files, live.reload).run())
    await stop.wait()
    stop.clear()  # from now on, another signal cuts the delay short
    watcher.cancel()
    # A reload now could open listeners again; the config in force decides the timings.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    timings, _ = shutdown_timings(live.current.config, env_drain_seconds)

    def begin_draining() -> None:
        listeners.bound = False  # /readyz answers 503 from now on
        start_draining(master)

    def close_listeners() -> None:
        listeners.closed = True  # before the update: a reload in between must not reopen
        master.options.update(mode=[])

    stopping = GracefulStop(
        begin_draining=begin_draining,
        close_listeners=close_listeners,
        listening=lambda: bool(proxyserver.listen_addrs()),
        in_flight=metrics.in_flight_total,
    )
    await stopping.run(timings, cut_short=stop)
    master.shutdown()
    with contextlib.suppress(asyncio.CancelledError):
        await run_task
    if admin is not None:  # last: probes and scrapes keep answering while draining
        await admin.stop()
    await audit.aclose()  # every record written, fsynced, and the queue closed
    tracing.close()  # the last spans sent (bounded by the exporter's timeout)
    # Stopped: a late SIGTERM or SIGINT (a second kill from an impatient supervisor) must not
    # turn the clean exit into death by signal once the loop's handlers are gone.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)
    log_event("stopped")
    return 0
