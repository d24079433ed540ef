"""Steps 1 and 2 of a test: a TCP connection (direct, or tunnelled through the egress proxy)
and the TLS handshake under the policy, made with the proxy leg's own pyOpenSSL connection
(:meth:`~sidecar.tls.policy.UpstreamTlsPolicy.new_openssl_connection`) so that its verdict is
the one a proxied request would get. Blocking: run it in a worker thread.
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass

from OpenSSL import SSL

from sidecar.check.probe.report import StepFailed
from sidecar.egress.connect import TunnelRefused, open_tunnel
from sidecar.egress.proxies import EgressProxy
from sidecar.tls.policy import UpstreamTlsPolicy
from sidecar.tls.verdict import HandshakeOutcome, describe

HTTP1_ALPN = [b"http/1.1"]
# How long a TLS 1.3 server may take to say whether it accepts the client certificate.
POST_HANDSHAKE_WAIT_SECONDS = 3.0
_CHUNK = 65536


@dataclass(frozen=True)
class Target:
    """Where a test connects: the host and port of a URL, and how it is reached."""

    host: str
    port: int
    via: EgressProxy | None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Channel:
    """A byte pipe to the target: plain TCP, or TLS over it (pyOpenSSL with memory BIOs)."""

    def __init__(self, sock: socket.socket, tls: SSL.Connection | None = None):
        self.sock = sock
        self.tls = tls
        self.deadline = time.monotonic() + 30.0
        self._early = b""  # application data read while waiting for the server's verdict

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self._sendall(data)
            return
        self.tls.sendall(data)
        self._flush()

    def recv(self) -> bytes:
        """The next bytes from the target; b"" at its end."""
        if self.tls is None:
            return self._read_socket()
        if self._early:
            data, self._early = self._early, b""
            return data
        while True:
            try:
                return bytes(self.tls.recv(_CHUNK))
            except SSL.WantReadError:
                self._flush()
                data = self._read_socket()
                if not data:
                    self.tls.bio_shutdown()
                else:
                    self.tls.bio_write(data)
            except SSL.ZeroReturnError:
                return b""
            except SSL.SysCallError:
                return b""  # closed without close_notify; HTTP framing tells if it matters

    def handshake(self) -> None:
        assert self.tls is not None
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                return
            except SSL.WantReadError:
                self._flush()
                data = self._read_socket()
                if not data:
                    raise ConnectionResetError("the server closed the connection during the "
                                               "TLS handshake") from None
                self.tls.bio_write(data)

    def await_verdict(self, wait: float) -> None:
        """After a TLS 1.3 handshake, wait up to ``wait`` seconds for the server's first
        flight: session tickets when it accepted the client, a fatal alert (raised as
        ``SSL.Error``) when it refused the client's certificate, which TLS 1.3 servers judge
        only after the client's handshake is complete (as in ``check --online``)."""
        assert self.tls is not None
        deadline = time.monotonic() + wait
        heard = False
        while True:
            try:
                self._early += self.tls.recv(_CHUNK)
                return  # application data: the server did not refuse us
            except SSL.WantReadError:
                if heard:
                    return  # records processed without an alert (tickets)
            except SSL.ZeroReturnError:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if not readable:
                return
            data = self.sock.recv(_CHUNK)
            if not data:
                return
            self.tls.bio_write(data)
            heard = True

    def _flush(self) -> None:
        assert self.tls is not None
        while True:
            try:
                data = self.tls.bio_read(_CHUNK)
            except SSL.WantReadError:
                return
            self._sendall(data)

    def _sendall(self, data: bytes) -> None:
        self.sock.settimeout(self._remaining())
        self.sock.sendall(data)

    def _read_socket(self) -> bytes:
        remaining = self._remaining()
        readable, _, _ = select.select([self.sock], [], [], remaining)
        if not readable:
            raise TimeoutError("no answer in time")
        self.sock.settimeout(self._remaining())
        return self.sock.recv(_CHUNK)

    def _remaining(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer in time")
        return remaining


def connect(target: Target, timeout: float) -> tuple[Channel, str]:
    """Step 1: a TCP connection to ``target`` and what happened, in words."""
    via = target.via
    if via is not None:
        try:
            sock = open_tunnel(via, target.host, target.port, timeout)
        except TunnelRefused as exc:
            raise StepFailed(str(exc)) from None
        return Channel(sock), (f"connected through {via.describe()}, which opened a tunnel "
                               f"to {target.address} (the proxy resolves the name)")
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StepFailed(f"the name {target.host} does not resolve: {exc.strerror or exc}"
                         ) from None
    addresses = sorted({str(info[4][0]) for info in infos})
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
    except TimeoutError:
        raise StepFailed(f"no TCP connection to {target.address} within {timeout:g} s "
                         f"({target.host} is {', '.join(addresses)})") from None
    except ConnectionRefusedError:
        raise StepFailed(f"{target.address} refused the connection: nothing listens on port "
                         f"{target.port} ({target.host} is {', '.join(addresses)})") from None
    except OSError as exc:
        raise StepFailed(f"cannot connect to {target.address}: {exc.strerror or exc}") from None
    peer = sock.getpeername()[0]
    if addresses == [target.host]:  # an IP address: nothing was resolved
        return Channel(sock), f"connected to {peer} port {target.port}"
    return Channel(sock), f"{target.host} resolved to {', '.join(addresses)}; connected to " \
                          f"{peer} port {target.port}"


@dataclass(frozen=True)
class PeerCertificate:
    subject: str
    issuer: str
    not_after: str


def handshake(channel: Channel, policy: UpstreamTlsPolicy, host: str, timeout: float
              ) -> tuple[str, str, PeerCertificate | None]:
    """Step 2: the TLS handshake on ``channel``; (detail, TLS version, the peer's certificate).

    A new connection is built without the resumption cache, so the server shows (and the
    policy verifies) its certificate, and the proxy's cached sessions are left alone.
    """
    conn = policy.new_openssl_connection(host, HTTP1_ALPN)
    channel.tls = conn
    channel.deadline = time.monotonic() + timeout
    try:
        channel.handshake()
        if conn.get_protocol_version_name() == "TLSv1.3":
            channel.await_verdict(min(timeout, POST_HANDSHAKE_WAIT_SECONDS))
    except SSL.Error as exc:
        outcome = conn.get_app_data()
        reason = outcome.reason if isinstance(outcome, HandshakeOutcome) and outcome.failed \
            else "handshake"
        words = describe(reason, policy, host, _ssl_error_words(exc))
        if isinstance(outcome, HandshakeOutcome) and outcome.subject:
            # OpenSSL keeps no peer certificate after a failed verification; the verify
            # callback kept the subject of the one it refused.
            words += f" (refused certificate: {outcome.subject})"
        # tls_failure: the reason as a word (sidecar.tls.verdict), for check --online's table.
        raise StepFailed(words, tls_failure=reason) from None
    except TimeoutError:
        raise StepFailed(f"no TLS handshake with {host} within {timeout:g} s") from None
    except OSError as exc:
        raise StepFailed(f"TLS handshake with {host} failed: {exc.strerror or exc}") from None
    version = conn.get_protocol_version_name()
    cert = _peer_certificate(conn)
    if policy.verify == "skip":
        how = "the certificate was not verified (verify: skip)"
    else:
        how = f"the certificate is valid for {policy.sni_for(host)} and signed by a CA in " \
              f"{policy.ca_source}"
    return f"{version} with {conn.get_cipher_name()}; {how}", version, cert


def certificate_facts(cert: PeerCertificate | None) -> dict[str, str] | None:
    if cert is None:
        return None
    return {"subject": cert.subject, "issuer": cert.issuer, "not_after": cert.not_after}


def _peer_certificate(conn: SSL.Connection) -> PeerCertificate | None:
    peer = conn.get_peer_certificate()
    if peer is None:
        return None
    parsed = peer.to_cryptography()
    return PeerCertificate(parsed.subject.rfc4514_string(), parsed.issuer.rfc4514_string(),
                           parsed.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"))


def _ssl_error_words(exc: SSL.Error) -> str:
    # pyOpenSSL's error is a list of (library, function, reason) tuples.
    parts = [str(item[-1]) for item in exc.args[0]] if exc.args and isinstance(
        exc.args[0], list) else [str(exc)]
    return "; ".join(p for p in parts if p) or "the server closed the connection"
