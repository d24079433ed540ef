"""A policy as a stdlib ``ssl.SSLContext``: the token endpoint, SMART discovery, the 401 replay
and ``check --online``.

It carries the whole policy, ``server_name`` included, so that no caller has to remember to
pass the override: whatever host name httpx or a socket wrap asks for, the policy's name is
used for SNI and verification, exactly as on the proxy leg.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import certifi
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from sidecar.tls.protocol import MINIMUM_VERSION, TLS12_CIPHERS

if TYPE_CHECKING:
    from sidecar.tls.policy import UpstreamTlsPolicy

_STDLIB_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class PolicySSLContext(ssl.SSLContext):
    """An SSLContext whose every connection uses the policy's server name, if it has one."""

    server_name: str | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, suppress_ragged_eofs: bool = True,
                    server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self._name(server_hostname), session=session)

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                server_hostname=self._name(server_hostname), session=session)

    def _name(self, requested: str | bytes | None) -> Any:
        return self.server_name if self.server_name is not None else requested


def build_stdlib_context(policy: UpstreamTlsPolicy) -> PolicySSLContext:
    ctx = PolicySSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.server_name = policy.server_name
    ctx.minimum_version = _STDLIB_VERSIONS[MINIMUM_VERSION]
    ctx.set_ciphers(TLS12_CIPHERS)
    # The subject CN is never a name: only subjectAltName DNS and IP entries are matched (the
    # proxy leg sets the same OpenSSL flag). Partial wildcards are refused by default.
    ctx.hostname_checks_common_name = False
    if policy.verify == "skip":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif policy.ca_pem is None:  # default: certifi's bundle, never SSL_CERT_FILE & co.
        ctx.load_verify_locations(cafile=certifi.where())
    else:
        # DER, read as the proxy leg reads the bundle (its certificates only): text around the
        # PEM blocks, such as a comment in any encoding, is not for the stdlib to parse.
        ctx.load_verify_locations(cadata=b"".join(
            cert.public_bytes(Encoding.DER)
            for cert in x509.load_pem_x509_certificates(policy.ca_pem)))
    if policy.client_cert_pem is not None:
        _load_client_cert(ctx, policy.client_cert_pem, policy.client_key_pem)
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes | None) -> None:
    # The stdlib only loads client identities from files; use a private temp directory.
    with tempfile.TemporaryDirectory() as tmp:
        cert_file = Path(tmp, "cert.pem")
        cert_file.write_bytes(cert_pem)
        key_file = None
        if key_pem is not None:
            key_file = Path(tmp, "key.pem")
            key_file.touch(mode=0o600)
            key_file.write_bytes(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
