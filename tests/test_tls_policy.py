"""Upstream TLS policy against real TLS servers on loopback: session resumption, the key share
hint, and the private OpenSSL bindings of ``sidecar/tls/openssl_bindings.py`` (these tests
fail loudly when pyOpenSSL or cryptography change them)."""

from __future__ import annotations

import gc
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from support.pki import TestPKI

from sidecar.config.models import TlsSettings
from sidecar.testkit.pki import ServerIdentity
from sidecar.tls.openssl_bindings import enable_hostname_verification, offer_key_share_first
from sidecar.tls.policy import UpstreamTlsPolicy, compile_tls_policy, retire_connection
from sidecar.tls.verdict import HandshakeOutcome

PQ_HYBRID = "X25519MLKEM768"


def session_reused(conn: SSL.Connection) -> bool:
    # pyOpenSSL has no public API for this; tests only.
    return bool(SSL._lib.SSL_session_reused(conn._ssl))


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


def server_for(identity: ServerIdentity, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(identity.cert_chain, identity.key)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def proxy_leg(policy: UpstreamTlsPolicy, port: int, name: str,
              alpn: list[bytes] | None = None) -> tuple[SSL.Connection, SSL.Error | None]:
    """The proxy leg's handshake to ``port`` for ``name``; the connection and any refusal."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn = policy.new_openssl_connection(name, alpn=alpn)
        try:
            Pump(conn, sock).run(conn.do_handshake)
        except SSL.Error as exc:
            return conn, exc
    return conn, None


def test_the_proxy_leg_refuses_what_its_policy_refuses_and_records_why(
        pki: TestPKI, policy: UpstreamTlsPolicy) -> None:
    cases = [(pki.server_wrong_host(), "hostname_mismatch"),
             (pki.server_from_other_ca(), "unknown_ca"),
             # Named only in its subject CN: never a name (NEVER_CHECK_SUBJECT).
             (pki.server_exactly("cn-only", common_name="localhost"), "hostname_mismatch")]
    for identity, reason in cases:
        with lenient_tls_server(server_for(identity), 1) as port:
            conn, error = proxy_leg(policy, port, "localhost")
        assert error is not None, reason
        outcome = conn.get_app_data()
        assert isinstance(outcome, HandshakeOutcome)
        assert outcome.failed and outcome.reason == reason


def test_skip_checks_no_name_and_alpn_is_offered(pki: TestPKI,
                                                 policy: UpstreamTlsPolicy) -> None:
    skip = compile_tls_policy(TlsSettings(verify="skip"))
    with lenient_tls_server(server_for(pki.server_wrong_host()), 1) as port:
        conn, error = proxy_leg(skip, port, "localhost")
    assert error is None
    with lenient_tls_server(server_for(pki.server(name="alpn"), ["http/1.1"]), 1) as port:
        conn, error = proxy_leg(policy, port, "localhost", alpn=[b"h2", b"http/1.1"])
    assert error is None
    assert conn.get_alpn_proto_negotiated() == b"http/1.1"
    outcome = conn.get_app_data()
    assert isinstance(outcome, HandshakeOutcome) and not outcome.failed


def test_the_stdlib_leg_handshakes_at_connect_resumes_and_tolerates_a_ragged_close(
        pki: TestPKI, policy: UpstreamTlsPolicy) -> None:
    context = policy.stdlib_context()
    with tls_server(stdlib_server(pki), 2) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls_sock:
            assert tls_sock.version() is not None  # the handshake ran at connect
            assert tls_sock.recv(1) == b"x"
            session = tls_sock.session
            tls_sock.sendall(b"y")
            # The server closes without close_notify, as many do: that is an end, no error.
            assert tls_sock.recv(1) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="localhost",
                                    session=session) as again:
            assert again.recv(1) == b"x"
            assert again.session_reused
            again.sendall(b"y")


def test_the_stdlib_memory_bio_leg_resumes_a_session(pki: TestPKI,
                                                     policy: UpstreamTlsPolicy) -> None:
    context = policy.stdlib_context()

    def connect(port: int, session: ssl.SSLSession | None) -> ssl.SSLObject:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_hostname="localhost",
                               session=session)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            def pump(step: Callable[[], object]) -> object:
                while True:
                    try:
                        result = step()
                    except ssl.SSLWantReadError:
                        sock.sendall(outgoing.read())
                        data = sock.recv(65536)
                        assert data, "server closed the connection"
                        incoming.write(data)
                    else:
                        sock.sendall(outgoing.read())
                        return result
            pump(obj.do_handshake)
            assert pump(lambda: obj.read(1)) == b"x"
            pump(lambda: obj.write(b"y"))
        return obj

    with tls_server(stdlib_server(pki), 2) as port:
        first = connect(port, None)
        assert not first.session_reused
        second = connect(port, first.session)
    assert second.session_reused


def test_both_legs_present_the_client_certificate_with_its_chain(
        pki: TestPKI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issued by the CA the policy does not trust, so OpenSSL cannot complete the chain from
    # the policy's trust store by itself: only the configured chain can carry the issuer.
    issued = pki.other_ca.issue(common_name="mtls client", san=["client.demo.internal"],
                                usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    chain = tmp_path / "client-chain.pem"  # the leaf and then its issuer
    chain.write_bytes(issued.chain_pem + pki.other_ca_bundle_path.read_bytes())
    key = tmp_path / "client.key"
    key.write_bytes(issued.key_pem)
    policy = compile_tls_policy(TlsSettings(verify="custom", ca_bundle=pki.ca_bundle_path,
                                            client_cert=chain, client_key=key))
    server = server_for(pki.server(name="mtls-server"))
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(pki.other_ca_bundle_path)
    seen: list[int] = []

    def serve_one(listener: socket.socket) -> None:
        raw, _ = listener.accept()
        with raw, suppress(ssl.SSLError, OSError), \
                server.wrap_socket(raw, server_side=True) as tls_sock:
            if hasattr(tls_sock, "get_unverified_chain"):  # Python 3.13
                seen.append(len(tls_sock.get_unverified_chain()))
            tls_sock.sendall(b"x")
            tls_sock.recv(1)

    # The stdlib leg writes the identity to a private temporary directory only.
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    for leg in ("stdlib", "proxy"):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            thread = threading.Thread(target=serve_one, args=(listener,), daemon=True)
            thread.start()
            port = listener.getsockname()[1]
            if leg == "stdlib":
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                        policy.stdlib_context().wrap_socket(
                            raw, server_hostname="localhost") as tls_sock:
                    assert tls_sock.recv(1) == b"x"
                    tls_sock.sendall(b"y")
            else:
                _, error = proxy_leg(policy, port, "localhost")
                assert error is None
            thread.join(timeout=10)
    assert sorted(tmp_path.iterdir()) == before
    if sys.version_info >= (3, 13):
        assert seen == [2, 2], "the client's chain arrives whole on both legs"


def test_a_name_openssl_cannot_check_is_refused_in_words() -> None:
    conn = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD))
    with pytest.raises(RuntimeError) as err:
        enable_hostname_verification(conn, "fhir\x00.example")
    assert str(err.value) == \
        "OpenSSL refused to enable hostname verification for 'fhir\\x00.example'"


def test_a_bundle_with_non_ascii_text_works_on_the_stdlib_leg_too(
        tmp_path: Path, pki: TestPKI) -> None:
    """The token, discovery and check --online legs read a CA bundle as the proxy leg does:
    a comment in UTF-8 around the PEM blocks is not an error on either."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes("# Zertifizierungsstelle für Tests, Ünïcødé\n".encode()
                       + pki.ca_bundle_path.read_bytes())
    policy = compile_tls_policy(TlsSettings(verify="custom", ca_bundle=bundle))
    context = policy.stdlib_context()
    with tls_server(stdlib_server(pki), 1) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls_sock:
        assert tls_sock.recv(1) == b"x"
    with lenient_tls_server(server_for(pki.server(name="non-ascii")), 1) as port:
        _, error = proxy_leg(policy, port, "localhost")
    assert error is None


def test_every_certificate_of_a_bundle_is_trusted_on_the_stdlib_leg(tmp_path: Path,
                                                                    pki: TestPKI) -> None:
    """A bundle of two CAs, the server's second: the stdlib leg loads each certificate of the
    bundle, not only the first (kills the mutant that joins the DER certificates with
    separator bytes, which a one-certificate bundle never shows)."""
    bundle = tmp_path / "two-cas.pem"
    bundle.write_bytes(pki.other_ca_bundle_path.read_bytes() + pki.ca_bundle_path.read_bytes())
    context = compile_tls_policy(TlsSettings(verify="custom", ca_bundle=bundle)).stdlib_context()
    with tls_server(stdlib_server(pki), 1) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls_sock:
        assert tls_sock.recv(1) == b"x"
