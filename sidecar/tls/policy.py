"""Where upstream TLS is decided: one compiled policy per connection (and per token endpoint).

A policy is built from :class:`TlsSettings` once per config snapshot; every file it needs is
read into memory at that moment (``sidecar.tls.material``). Every leg uses it: the proxy leg
as the pyOpenSSL context built here, the token endpoint, SMART discovery, the 401 replay and
``check --online`` as :meth:`UpstreamTlsPolicy.stdlib_context` (``sidecar.tls.stdlib_context``).
Both are built from the decisions below, and ``tests/test_tls_conformance.py`` runs one
certificate matrix through every leg to keep them agreeing:

- verification: ``verify`` (below); the peer's name is matched against its subjectAltName DNS
  or IP entries only, never the subject CN, and never a partial wildcard (``f*.example``);
- the name is ``server_name`` if set, else the URL's host, for SNI and verification alike;
- TLS 1.2 at least (:data:`MINIMUM_VERSION`); on TLS 1.2 only forward-secret AEAD suites
  (:data:`TLS12_CIPHERS`); TLS 1.3's suites are all AEAD with ephemeral keys;
- the client certificate, if any, is offered to every server that asks.

``skip``    no verification at all (hostname neither).
``default`` certifi's public bundle and nothing else: environment variables such as
            ``SSL_CERT_FILE`` or ``REQUESTS_CA_BUNDLE`` are deliberately not consulted.
``custom``  exactly the certificates of the given PEM bundle.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import ssl
from dataclasses import dataclass, field

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from sidecar.config.models import TlsSettings, TlsVerify
from sidecar.tls.material import (
    CertificateInfo,
    TlsField,
    TlsMaterialError,
    read_ca_bundle,
    read_client_identity,
)
from sidecar.tls.openssl_bindings import enable_hostname_verification, offer_key_share_first
from sidecar.tls.protocol import MINIMUM_VERSION, TLS12_CIPHERS
from sidecar.tls.verdict import HandshakeOutcome, record_alert, record_verify_result

_OPENSSL_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

@dataclass(frozen=True)
class Resumption:
    session: SSL.Session
    group: str | None  # the key exchange group the server chose, e.g. "x25519"


@dataclass(frozen=True)
class UpstreamTlsPolicy:
    """A compiled TLS policy; build it with :func:`compile_tls_policy`."""

    verify: TlsVerify
    ca_source: str  # where trusted CAs come from, in words, for diagnostics
    ca_pem: bytes | None  # the custom bundle; None for skip and default (certifi)
    ca_certificates: tuple[CertificateInfo, ...]
    client_cert_pem: bytes | None
    client_key_pem: bytes | None = field(repr=False)
    server_name: str | None
    openssl_context: SSL.Context = field(repr=False, compare=False)
    # What the last connection to each (SNI, host, port) left for the next one. It lives on
    # the policy object so that a session is only ever offered under the policy (trusted CAs,
    # client identity, SNI) that verified it; a reload compiles new policies, which start empty.
    resumption: dict[tuple[str, str, int], Resumption] = field(
        default_factory=dict, repr=False, compare=False)

    def sni_for(self, host: str) -> str:
        return self.server_name or host

    def new_openssl_connection(self, host: str, alpn: list[bytes] | None = None,
                               port: int | None = None) -> SSL.Connection:
        """A client-side pyOpenSSL connection for ``host`` that enforces this policy.

        With ``port``, a session remembered for the same address under this policy is offered
        for resumption: the server then skips sending and proving its certificate, and the
        handshake costs both sides far less (the certificate was verified when the session
        was made; a server that declines simply gets a full, fully verified handshake). The
        key share is then sent only for the group that server chose last time.
        """
        conn = SSL.Connection(self.openssl_context)
        name = self.sni_for(host)
        if port is not None:
            earlier = self.resumption.get((name, host, port))
            if earlier is not None:
                conn.set_session(earlier.session)
                if earlier.group is not None:
                    offer_key_share_first(conn, earlier.group)
        outcome = HandshakeOutcome()
        conn.set_app_data(outcome)
        if not _is_ip(name):
            conn.set_tlsext_host_name(name.encode("idna"))
        if self.verify != "skip":
            enable_hostname_verification(conn, name)
        if alpn:
            conn.set_alpn_protos(alpn)
        conn.set_connect_state()
        return conn

    def remember_session(self, host: str, port: int, conn: SSL.Connection) -> None:
        """Offer ``conn``'s current session to the next connection to ``host:port``.

        Call it once data has been read after the handshake (TLS 1.3 servers send their tickets
        after it), and :func:`retire_connection` when ``conn`` closes: the session object is
        shared with ``conn``, and OpenSSL would otherwise void it when ``conn`` is freed.
        """
        session = conn.get_session()
        if session is not None:
            self.resumption[(self.sni_for(host), host, port)] = Resumption(
                session, conn.get_group_name())

    def stdlib_context(self) -> ssl.SSLContext:
        """The same policy as a stdlib context, built on first use and then shared."""
        return self._stdlib_context

    @functools.cached_property
    def _stdlib_context(self) -> ssl.SSLContext:
        from sidecar.tls.stdlib_context import build_stdlib_context

        return build_stdlib_context(self)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def retire_connection(conn: SSL.Connection) -> None:
    """Keep the sessions of a closed upstream connection resumable.

    OpenSSL voids the session of a connection that is freed without having sent a close_notify
    (``ssl_clear_bad_session``). mitmproxy never sends one, so without this every remembered
    session would be dead by the time the next connection offers it. Since TLS 1.1 an unclean
    close no longer forbids resumption (RFC 5246, section 7.2.1), so the close_notify is only
    recorded as sent: the socket is already closed and nothing is written.
    """
    conn.set_shutdown(conn.get_shutdown() | SSL.SENT_SHUTDOWN)


def compile_tls_policy(settings: TlsSettings) -> UpstreamTlsPolicy:
    """Read every file the policy names and build its contexts; raise TlsMaterialError."""
    ca_pem: bytes | None
    infos: list[CertificateInfo] = []
    if settings.verify == "custom":
        assert settings.ca_bundle is not None
        ca_pem, infos = read_ca_bundle(settings.ca_bundle)
        ca_source = str(settings.ca_bundle)
    elif settings.verify == "default":
        ca_pem = None  # loaded by path below: parsing ~150 public roots per policy is wasteful
        ca_source = "the default public CA bundle (certifi)"
    else:
        ca_pem, ca_source = None, "nothing (verification skipped)"

    cert_pem = key_pem = None
    if settings.client_cert is not None:
        cert_pem, key_pem = read_client_identity(settings.client_cert, settings.client_key)

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(_OPENSSL_VERSIONS[MINIMUM_VERSION])
    ctx.set_cipher_list(TLS12_CIPHERS.encode("ascii"))
    # Fatal alerts say why a server refused the handshake (no shared cipher or version, a
    # client certificate it wanted); hostname flags are set per connection.
    ctx.set_info_callback(record_alert)
    if settings.verify == "skip":
        ctx.set_verify(SSL.VERIFY_NONE)
    else:
        if ca_pem is None:
            ctx.load_verify_locations(certifi.where())
        else:
            store = ctx.get_cert_store()
            assert store is not None
            for cert in x509.load_pem_x509_certificates(ca_pem):
                store.add_cert(crypto.X509.from_cryptography(cert))
        ctx.set_verify(SSL.VERIFY_PEER, record_verify_result)
    if cert_pem is not None:
        _load_openssl_client_cert(ctx, cert_pem, key_pem,
                                  "client_key" if settings.client_key else "client_cert")
    return UpstreamTlsPolicy(
        verify=settings.verify, ca_source=ca_source, ca_pem=ca_pem,
        ca_certificates=tuple(infos), client_cert_pem=cert_pem, client_key_pem=key_pem,
        server_name=settings.server_name, openssl_context=ctx,
    )


def _load_openssl_client_cert(ctx: SSL.Context, cert_pem: bytes, key_pem: bytes | None,
                              key_field: TlsField) -> None:
    certs = x509.load_pem_x509_certificates(cert_pem)
    ctx.use_certificate(certs[0])
    for extra in certs[1:]:
        ctx.add_extra_chain_cert(extra)
    key = serialization.load_pem_private_key(key_pem or cert_pem, password=None)
    try:
        # OpenSSL refuses a key that does not match the certificate already here.
        ctx.use_privatekey(key)  # type: ignore[arg-type]  # unusable key types fail here
        ctx.check_privatekey()
    except SSL.Error:
        raise TlsMaterialError("client_key does not match client_cert", key_field) from None


def earliest_expiry(policy: UpstreamTlsPolicy) -> dt.datetime | None:
    return min((c.not_after for c in policy.ca_certificates), default=None)


def client_cert_expiry(policy: UpstreamTlsPolicy) -> dt.datetime | None:
    """When the client certificate (the first one in its PEM: the leaf) expires."""
    if policy.client_cert_pem is None:
        return None
    leaf = x509.load_pem_x509_certificates(policy.client_cert_pem)[0]
    return leaf.not_valid_after_utc
