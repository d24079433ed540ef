"""Client-side TLS for tests, independent of the machine's CA environment variables."""

from __future__ import annotations

import ssl
from pathlib import Path

from support.pki import ClientIdentity

# OpenSSL X509_V_ERR_* codes, as reported by ssl.SSLCertVerificationError.verify_code.
UNKNOWN_ISSUER = 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
CERT_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH


def client_context(
    ca_bundle: Path | None,
    *,
    identity: ClientIdentity | None = None,
    check_hostname: bool = True,
    verify: bool = True,
) -> ssl.SSLContext:
    """A context that trusts exactly ``ca_bundle``.

    Built from a bare SSLContext rather than create_default_context() so that nothing is
    loaded from SSL_CERT_FILE / SSL_CERT_DIR, which this machine sets.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_bundle is not None:
        context.load_verify_locations(cafile=ca_bundle)
    context.check_hostname = check_hostname and verify
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    return context


def verification_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure somewhere in ``exc``'s cause chain, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
