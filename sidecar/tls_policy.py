"""Where upstream TLS is decided: one compiled policy per connection (and per token endpoint).

A policy is built from :class:`TlsSettings` once per config snapshot. Every file it needs (CA
bundle, client certificate and key) is read into memory at that moment, so a file replaced in
place is picked up by the next snapshot and never by a stale cache keyed on its path.

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
from pathlib import Path
from typing import Literal

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from sidecar.config.models import TlsSettings

TlsFailureReason = Literal["unknown_ca", "hostname_mismatch", "expired", "handshake"]

_UNKNOWN_CA_CODES = {
    SSL.X509VerificationCodes.ERR_UNABLE_TO_GET_ISSUER_CERT,
    SSL.X509VerificationCodes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    SSL.X509VerificationCodes.ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
    SSL.X509VerificationCodes.ERR_SELF_SIGNED_CERT_IN_CHAIN,
    SSL.X509VerificationCodes.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
    SSL.X509VerificationCodes.ERR_CERT_UNTRUSTED,
}
_EXPIRED_CODES = {
    SSL.X509VerificationCodes.ERR_CERT_HAS_EXPIRED,
    SSL.X509VerificationCodes.ERR_CERT_NOT_YET_VALID,
}


class TlsMaterialError(ValueError):
    """A CA bundle, certificate or key that cannot be used; the message says why."""


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    not_after: dt.datetime
    is_ca: bool


@dataclass
class VerifyOutcome:
    """What the verify callback saw during one handshake (kept on the SSL connection)."""

    code: int = 0
    depth: int = 0
    subject: str = ""

    @property
    def reason(self) -> TlsFailureReason:
        if self.code == SSL.X509VerificationCodes.ERR_HOSTNAME_MISMATCH:
            return "hostname_mismatch"
        if self.code in _EXPIRED_CODES:
            return "expired"
        if self.code in _UNKNOWN_CA_CODES:
            return "unknown_ca"
        return "handshake"


def read_ca_bundle(path: Path) -> tuple[bytes, list[CertificateInfo]]:
    """Read and parse a PEM bundle; raise :class:`TlsMaterialError` when it is unusable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsMaterialError(f"cannot read {path}: {exc.strerror or exc}") from None
    return data, parse_ca_bundle(data, str(path))


def parse_ca_bundle(data: bytes, where: str) -> list[CertificateInfo]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsMaterialError(f"{where} contains no PEM certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsMaterialError(f"{where} is not a valid PEM certificate bundle: {exc}") from None
    return [describe_certificate(c) for c in certs]


def describe_certificate(cert: x509.Certificate) -> CertificateInfo:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateInfo(cert.subject.rfc4514_string(), cert.not_valid_after_utc, is_ca)


@dataclass(frozen=True)
class Resumption:
    session: SSL.Session
    group: str | None  # the key exchange group the server chose, e.g. "x25519"


@dataclass(frozen=True)
class UpstreamTlsPolicy:
    """A compiled TLS policy; build it with :func:`compile_tls_policy`."""

    verify: Literal["skip", "default", "custom"]
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
        outcome = VerifyOutcome()
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
        """The same policy as a stdlib context (token endpoint, ``check --online``)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.verify == "skip":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_pem is None:  # default: certifi's bundle, never SSL_CERT_FILE & co.
            ctx.load_verify_locations(cafile=certifi.where())
        else:
            ctx.load_verify_locations(cadata=self.ca_pem.decode("ascii", "replace"))
        if self.client_cert_pem is not None:
            _load_stdlib_client_cert(ctx, self.client_cert_pem, self.client_key_pem)
        return ctx


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


# OpenSSL's default groups (3.5 and later), most preferred first. By default it sends key
# shares for the first two, a post-quantum hybrid (~1.2 KB) and X25519.
_DEFAULT_GROUPS = ("X25519MLKEM768", "X25519", "secp256r1", "X448", "secp384r1", "secp521r1",
                   "ffdhe2048", "ffdhe3072")


_key_share_syntax_known = True  # cleared when OpenSSL refuses the 3.5 group-list syntax


def offer_key_share_first(conn: SSL.Connection, group: str) -> bool:
    """Send a TLS 1.3 key share only for ``group``, still offering every default group.

    A resumed handshake still runs the key exchange, and by default the client computes two
    key shares of which the server uses one: for a server that chose X25519 last time, the
    unused post-quantum share is most of the client's handshake cost and of its ClientHello.
    This is a hint, not a restriction: a server that prefers another offered group asks for
    it with a HelloRetryRequest, so nothing is downgraded (the choice being hinted came from
    an authenticated handshake). Returns False, changing nothing, for a group not in the
    default list or an OpenSSL older than 3.5.

    pyOpenSSL has no public API for groups, hence the private binding, kept in this function
    so that ``tests/test_tls_policy.py`` fails loudly if it changes.
    """
    global _key_share_syntax_known
    groups = _groups_sharing_first(group.lower())
    if groups is None or not _key_share_syntax_known:
        return False
    lib = SSL._lib  # type: ignore[attr-defined]
    if lib.SSL_set1_curves_list(conn._ssl, groups) != 1:  # type: ignore[attr-defined]
        # OpenSSL before 3.5 knows neither the "?"/"*" markers nor the hybrid group, and its
        # default already sends a single key share: nothing to improve there.
        lib.ERR_clear_error()
        _key_share_syntax_known = False
        return False
    return True


@functools.cache
def _groups_sharing_first(group: str) -> bytes | None:
    """The default group list with a key share for ``group`` only (built once per group)."""
    first = next((g for g in _DEFAULT_GROUPS if g.lower() == group), None)
    if first is None:
        return None
    return ":".join([f"?*{first}", *(f"?{g}" for g in _DEFAULT_GROUPS if g != first)]).encode()


def enable_hostname_verification(conn: SSL.Connection, name: str) -> None:
    """Make OpenSSL check the peer certificate's name during the handshake.

    pyOpenSSL has no public API for this; mitmproxy itself uses the same private bindings.
    Kept in this one function so that ``tests/test_tls_policy.py`` fails loudly if they change.
    """
    lib = SSL._lib  # type: ignore[attr-defined]
    param = lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]
    # No partial wildcards, and never fall back to the subject CN (browsers dropped it too).
    lib.X509_VERIFY_PARAM_set_hostflags(param, lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS |
                                        lib.X509_CHECK_FLAG_NEVER_CHECK_SUBJECT)
    if _is_ip(name):
        packed = ipaddress.ip_address(name).packed
        ok = lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    else:
        encoded = name.encode("idna")
        ok = lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded))
    if ok != 1:
        raise RuntimeError(f"OpenSSL refused to enable hostname verification for {name!r}")


def _record_verify_result(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int,
                          ok: int) -> bool:
    outcome = conn.get_app_data()
    if not ok and isinstance(outcome, VerifyOutcome) and outcome.code == 0:
        outcome.code, outcome.depth = code, depth
        outcome.subject = cert.to_cryptography().subject.rfc4514_string()
    return bool(ok)


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
        cert_pem, key_pem = _read_client_identity(settings.client_cert, settings.client_key)

    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
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
        ctx.set_verify(SSL.VERIFY_PEER, _record_verify_result)
    if cert_pem is not None:
        _load_openssl_client_cert(ctx, cert_pem, key_pem)
    return UpstreamTlsPolicy(
        verify=settings.verify, ca_source=ca_source, ca_pem=ca_pem,
        ca_certificates=tuple(infos), client_cert_pem=cert_pem, client_key_pem=key_pem,
        server_name=settings.server_name, openssl_context=ctx,
    )


def _read_client_identity(cert_path: Path, key_path: Path | None) -> tuple[bytes, bytes]:
    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes() if key_path is not None else cert_pem
    except OSError as exc:
        raise TlsMaterialError(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsMaterialError(f"{cert_path} is not a PEM certificate") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        where = key_path or cert_path
        raise TlsMaterialError(f"{where} holds no unencrypted PEM private key") from None
    return cert_pem, key_pem


def _load_openssl_client_cert(ctx: SSL.Context, cert_pem: bytes, key_pem: bytes | None) -> None:
    certs = x509.load_pem_x509_certificates(cert_pem)
    ctx.use_certificate(crypto.X509.from_cryptography(certs[0]))
    for extra in certs[1:]:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    key = serialization.load_pem_private_key(key_pem or cert_pem, password=None)
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TlsMaterialError("client_key does not match client_cert") from None


def _load_stdlib_client_cert(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes | None
                             ) -> None:
    # The stdlib only loads client identities from files; use a private temp directory.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cert_file = Path(tmp, "cert.pem")
        cert_file.write_bytes(cert_pem)
        key_file = None
        if key_pem is not None:
            key_file = Path(tmp, "key.pem")
            key_file.touch(mode=0o600)
            key_file.write_bytes(key_pem)
        ctx.load_cert_chain(cert_file, key_file)


def earliest_expiry(policy: UpstreamTlsPolicy) -> dt.datetime | None:
    return min((c.not_after for c in policy.ca_certificates), default=None)
