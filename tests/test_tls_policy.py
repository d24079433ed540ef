"""Upstream TLS policy against real TLS servers on loopback: session resumption, the key share
hint, and the private OpenSSL bindings of ``sidecar/tls/openssl_bindings.py`` (these tests
fail loudly when pyOpenSSL or cryptography change them)."""

from __future__ import annotations

import gc
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import pytest
from OpenSSL import SSL
from support.pki import TestPKI

from sidecar.config.models import TlsSettings
from sidecar.tls.openssl_bindings import enable_hostname_verification, offer_key_share_first
from sidecar.tls.policy import UpstreamTlsPolicy, compile_tls_policy, retire_connection

PQ_HYBRID = "X25519MLKEM768"


def session_reused(conn: SSL.Connection) -> bool:
    # pyOpenSSL has no public API for this; tests only.
    return bool(SSL._lib.SSL_session_reused(conn._ssl))  # type: ignore[attr-defined]


@dataclass
class Handshake:
    client_hello_bytes: int
    reused: bool
    group: str | None


class Pump:
    """Drives a memory-BIO pyOpenSSL connection (as mitmproxy does) over a blocking socket."""

    def __init__(self, conn: SSL.Connection, sock: socket.socket):
        self.conn, self.sock = conn, sock
        self.flights: list[int] = []

    def run(self, step: Callable[[], object]) -> object:
        while True:
            try:
                result = step()
            except SSL.WantReadError:
                self._flush()
                data = self.sock.recv(65536)
                assert data, "server closed the connection"
                self.conn.bio_write(data)
            else:
                self._flush()
                return result

    def _flush(self) -> None:
        while True:
            try:
                data = self.conn.bio_read(65536)
            except SSL.WantReadError:
                return
            self.flights.append(len(data))
            self.sock.sendall(data)


@contextmanager
def tls_server(context: ssl.SSLContext | SSL.Context, connections: int) -> Iterator[int]:
    """A TLS server on loopback for ``connections`` connections; each gets one byte, after the
    TLS 1.3 session tickets, and is held until the client hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for _ in range(connections):
            raw, _ = listener.accept()
            with raw:
                if isinstance(context, ssl.SSLContext):
                    with context.wrap_socket(raw, server_side=True) as tls_sock:
                        tls_sock.sendall(b"x")
                        tls_sock.recv(1)
                else:
                    server = SSL.Connection(context, raw)
                    server.set_accept_state()
                    server.sendall(b"x")
                    with suppress(SSL.ZeroReturnError, SSL.SysCallError):
                        server.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=10)


def handshake(policy: UpstreamTlsPolicy, port: int, *, retire: bool = True,
              hint: str | None = None) -> Handshake:
    """One connection under ``policy``: handshake, first byte, remember the session, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn = policy.new_openssl_connection("127.0.0.1", port=port)
        if hint is not None:
            assert offer_key_share_first(conn, hint)
        pump = Pump(conn, sock)
        pump.run(conn.do_handshake)
        assert pump.run(lambda: conn.recv(1)) == b"x"
        policy.remember_session("127.0.0.1", port, conn)
        result = Handshake(pump.flights[0], session_reused(conn), conn.get_group_name())
        if retire:
            retire_connection(conn)
    return result


def handshake_and_free(policy: UpstreamTlsPolicy, port: int, *, retire: bool = True,
                       hint: str | None = None) -> Handshake:
    result = handshake(policy, port, retire=retire, hint=hint)
    gc.collect()  # frees the SSL object, as happens to every closed upstream connection
    return result


@pytest.fixture
def policy(pki: TestPKI) -> UpstreamTlsPolicy:
    return compile_tls_policy(TlsSettings(verify="custom", ca_bundle=pki.ca_bundle_path))


def stdlib_server(pki: TestPKI, group: str | None = None) -> ssl.SSLContext:
    identity = pki.server(name="tls-policy")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.cert_chain, identity.key)
    if group is not None:
        context.set_ecdh_curve(group)  # the only group this server accepts
    return context


def verified_handshake(pki: TestPKI, port: int, name: str) -> None:
    """A handshake that trusts ``pki.ca`` and checks the peer's name only through
    ``enable_hostname_verification``; raises ``SSL.Error`` when OpenSSL refuses it."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_PEER)
    context.load_verify_locations(str(pki.ca_bundle_path))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn = SSL.Connection(context)
        conn.set_connect_state()
        enable_hostname_verification(conn, name)
        Pump(conn, sock).run(conn.do_handshake)


@contextmanager
def lenient_tls_server(context: ssl.SSLContext, connections: int) -> Iterator[int]:
    """Like ``tls_server``, but a client that aborts its handshake ends only its connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for _ in range(connections):
            raw, _ = listener.accept()
            with raw, suppress(ssl.SSLError, OSError), \
                    context.wrap_socket(raw, server_side=True) as tls_sock:
                tls_sock.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(timeout=10)


def test_openssl_hostname_bindings_check_the_peer_name(pki: TestPKI) -> None:
    # The certificate names localhost and 127.0.0.1 (support/pki.py); the bindings, not
    # the context, are what turn a name mismatch into a failed handshake.
    matching, mismatching = ("localhost", "127.0.0.1"), ("fhir.example.org", "127.0.0.2")
    with lenient_tls_server(stdlib_server(pki), len(matching) + len(mismatching)) as port:
        for name in matching:
            verified_handshake(pki, port, name)
        for name in mismatching:
            with pytest.raises(SSL.Error, match="certificate verify failed"):
                verified_handshake(pki, port, name)


def test_sessions_resume_only_under_the_policy_that_made_them(
        pki: TestPKI, policy: UpstreamTlsPolicy) -> None:
    other_policy = compile_tls_policy(TlsSettings(verify="custom", ca_bundle=pki.ca_bundle_path))
    with tls_server(stdlib_server(pki), connections=4) as port:
        assert handshake_and_free(policy, port, retire=False).reused is False
        # OpenSSL voided that session when its connection was freed without a close_notify:
        # this is what retire_connection prevents.
        assert handshake_and_free(policy, port).reused is False
        # The session remembered from the retired connection is resumed, although that
        # connection and its SSL object are gone.
        assert handshake_and_free(policy, port).reused is True
        # An identical but separately compiled policy (e.g. after a reload) never gets it.
        assert handshake_and_free(other_policy, port).reused is False


def test_resumption_sends_one_key_share_for_the_group_the_server_chose(
        pki: TestPKI, policy: UpstreamTlsPolicy) -> None:
    with tls_server(stdlib_server(pki, group="X25519"), connections=3) as port:
        first = handshake_and_free(policy, port)
        second = handshake_and_free(policy, port)
        third = handshake_and_free(policy, port)
    # By default the post-quantum hybrid share (~1.2 KB) goes out as well, unused here.
    assert first.group == "x25519" and first.client_hello_bytes > 1200
    assert not first.reused
    assert second.reused and third.reused
    assert second.group == third.group == "x25519"
    assert second.client_hello_bytes < 1000 and third.client_hello_bytes < 1000


def test_key_share_hint_never_downgrades_a_post_quantum_server(pki: TestPKI,
                                                               policy: UpstreamTlsPolicy) -> None:
    identity = pki.server(name="tls-policy-pq")
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate_chain_file(str(identity.cert_chain))
    context.use_privatekey_file(str(identity.key))
    with tls_server(context, connections=3) as port:
        first = handshake_and_free(policy, port)
        hinted = handshake_and_free(policy, port)
        # A hint for the classical group only: the server asks again for the hybrid one.
        misled = handshake_and_free(policy, port, hint="X25519")
    assert first.group == PQ_HYBRID, "OpenSSL's default groups changed: review _DEFAULT_GROUPS"
    assert hinted.reused and hinted.group == PQ_HYBRID
    assert misled.group == PQ_HYBRID


def test_unknown_groups_are_not_hinted() -> None:
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    assert offer_key_share_first(conn, "brainpoolP256r1") is False
    assert offer_key_share_first(conn, "x25519") is True


def test_a_name_openssl_refuses_to_check_fails_loudly() -> None:
    """Never a connection without the name check: an embedded NUL (which OpenSSL refuses as
    a host name) raises instead of leaving verification off."""
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    with pytest.raises(RuntimeError, match="refused to enable hostname verification"):
        enable_hostname_verification(conn, "fhir\x00.example.org")
