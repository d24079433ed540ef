"""Upstream failures are told apart by what they are, never by the words of a message.

The errors are real: a connect to a loopback port nobody listens on, a name that does not
resolve. The messages passed along with them are deliberately misleading, to show that no
decision rests on their text.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from support.sidecar_process import free_port, write_config

from sidecar.proxy.failures import (
    ClosedWithoutAnswer,
    OtherFailure,
    TlsFailure,
    TunnelRefused,
    UpstreamFailure,
    classify,
    failed_proxy,
)
from sidecar.report.redaction import Redactor
from sidecar.request.errors import ErrorKind
from sidecar.runtime.live import load_snapshot
from sidecar.runtime.snapshot import CompiledConnection

NO_SECRETS = Redactor()


def _connection(tmp_path: Path, **settings: object) -> CompiledConnection:
    config: dict[str, object] = {"connections": {"fhir": {
        "url": "https://fhir.example/base", **settings}}}
    if "via" in settings:
        config["egress_proxies"] = {"corp": {"url": "http://127.0.0.1:3128"}}
    return load_snapshot(write_config(tmp_path, config)).connections["fhir"]


def _connect_error(host: str, port: int) -> OSError:
    async def attempt() -> None:
        await asyncio.open_connection(host, port)

    with pytest.raises(OSError) as caught:
        asyncio.run(attempt())
    return caught.value


def test_a_refused_connect_is_named_by_its_type(tmp_path: Path) -> None:
    error = _connect_error("127.0.0.1", free_port())
    assert isinstance(error, ConnectionRefusedError)
    failure = UpstreamFailure(
        connect_error=error, reported=OtherFailure("TLS certificate closed disconnected"))
    problem = classify(_connection(tmp_path), failure, NO_SECRETS)
    assert problem.kind is ErrorKind.UPSTREAM_UNREACHABLE
    assert "connection refused (is the server running and the port right?)" in (
        problem.diagnostics)


def test_a_name_that_does_not_resolve_is_named_by_its_errno(tmp_path: Path) -> None:
    error = _connect_error("no-such-host.invalid", 443)
    assert isinstance(error, socket.gaierror)
    problem = classify(_connection(tmp_path), UpstreamFailure(connect_error=error), NO_SECRETS)
    assert problem.kind is ErrorKind.UPSTREAM_UNREACHABLE
    assert problem.diagnostics.endswith("the host name does not resolve")


def test_only_a_tls_verdict_makes_a_tls_failure(tmp_path: Path) -> None:
    conn = _connection(tmp_path)
    verdict = TlsFailure("unknown_ca", "")
    problem = classify(conn, UpstreamFailure(tls=verdict), NO_SECRETS)
    assert problem.kind is ErrorKind.UPSTREAM_TLS
    assert "is not signed by a CA" in problem.diagnostics
    # Words about TLS and certificates, without a verdict, are no TLS failure.
    words = OtherFailure("TLS handshake failed: certificate verify failed")
    assert classify(conn, UpstreamFailure(reported=words), NO_SECRETS).kind is (
        ErrorKind.UPSTREAM_UNREACHABLE)


def test_a_closed_connection_and_the_own_deadline(tmp_path: Path) -> None:
    conn = _connection(tmp_path, timeout_seconds=7)
    closed = classify(conn, UpstreamFailure(reported=ClosedWithoutAnswer()), NO_SECRETS)
    assert "closed the connection without answering" in closed.diagnostics
    timed_out = classify(conn, UpstreamFailure(timed_out=True, tls=TlsFailure("expired", "")),
                         NO_SECRETS)
    assert timed_out.kind is ErrorKind.UPSTREAM_TIMEOUT
    assert "did not answer within 7 s" in timed_out.diagnostics


def test_through_an_egress_proxy_the_proxy_is_blamed_unless_the_fhir_servers_tls_failed(
        tmp_path: Path) -> None:
    conn = _connection(tmp_path, via="corp")
    assert conn.via is not None
    refused = UpstreamFailure(reported=TunnelRefused("407 Proxy Authentication Required\x07"))
    assert failed_proxy(conn, refused) is conn.via
    problem = classify(conn, refused, NO_SECRETS)
    assert problem.kind is ErrorKind.UPSTREAM_UNREACHABLE
    assert problem.diagnostics.endswith(
        "refused the tunnel to fhir.example:443: 407 Proxy Authentication Required")
    unreachable = UpstreamFailure(connect_error=_connect_error("127.0.0.1", free_port()))
    assert failed_proxy(conn, unreachable) is conn.via
    fhir_tls = UpstreamFailure(tls=TlsFailure("hostname_mismatch", ""))
    assert failed_proxy(conn, fhir_tls) is None
    assert classify(conn, fhir_tls, NO_SECRETS).kind is ErrorKind.UPSTREAM_TLS
    assert failed_proxy(conn, UpstreamFailure(timed_out=True)) is None


def test_quoted_upstream_words_pass_the_redactor(tmp_path: Path) -> None:
    # mitmproxy quotes a broken answer's first bytes; an upstream can put the credential there.
    conn = _connection(tmp_path)
    echoed = OtherFailure("Bad HTTP response line: b'Basic c3ZjOnMzY3JldA== s3cret'")
    problem = classify(conn, UpstreamFailure(reported=echoed),
                       Redactor(pairs=[("svc", "s3cret")]))
    assert problem.kind is ErrorKind.UPSTREAM_UNREACHABLE
    assert "s3cret" not in problem.diagnostics
    assert "c3ZjOnMzY3JldA" not in problem.diagnostics
    assert "Bad HTTP response line" in problem.diagnostics
