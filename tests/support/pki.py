"""The kit's PKI plus what only tests need: an unrelated CA, broken server certificates and
client certificates for mTLS."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.testkit.pki import (
    DEFAULT_HOSTNAMES,
    PUBLIC_MODE,
    SECRET_MODE,
    Authority,
    DemoPKI,
    IssuedCert,
    KeyType,
    ServerIdentity,
)


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate (for mTLS) and its private key."""

    cert: Path
    key: Path


class TestPKI(DemoPKI):
    """``ca`` is the internal CA a connection is configured to trust; ``other_ca`` is unrelated,
    so a server certificate from it must be rejected by a policy that trusts only ``ca``."""

    __test__ = False  # a helper, not a test class, when a test module imports it

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.other_ca = Authority("fhir-sidecar demo unrelated CA")
        self._other_ca_bundle = self.write("other-ca.pem", self.other_ca.cert_pem, PUBLIC_MODE)

    @property
    def other_ca_bundle_path(self) -> Path:
        """PEM file with the unrelated CA's certificate."""
        return self._other_ca_bundle

    def server_from_other_ca(
        self, hostnames: Sequence[str] = DEFAULT_HOSTNAMES, *, name: str = "server-other-ca"
    ) -> ServerIdentity:
        """Correct names and dates, but signed by the unrelated CA."""
        return self.issue_server(self.other_ca, self._other_ca_bundle, name, hostnames)

    def server_wrong_host(
        self, hostnames: Sequence[str] = ("other.example",), *, name: str = "server-wrong-host"
    ) -> ServerIdentity:
        """Signed by the internal CA, but for names that are not the loopback address."""
        return self.issue_server(self.ca, self.ca_bundle_path, name, hostnames)

    def server_expired(
        self, hostnames: Sequence[str] = DEFAULT_HOSTNAMES, *, name: str = "server-expired"
    ) -> ServerIdentity:
        """Signed by the internal CA for the right names, but valid only in the past."""
        now = dt.datetime.now(dt.UTC)
        return self.issue_server(self.ca, self.ca_bundle_path, name, hostnames,
                                 not_before=now - dt.timedelta(days=30),
                                 not_after=now - dt.timedelta(days=1))

    def client_identity(
        self, *, name: str = "client", common_name: str = "fhir-sidecar demo client"
    ) -> ClientIdentity:
        """A client certificate from the internal CA, for servers that require mTLS."""
        issued = self.ca.issue(common_name=common_name, san=["sidecar-client.demo.internal"],
                               usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))
        cert = self.write(f"{name}.pem", issued.chain_pem, PUBLIC_MODE)
        key = self.write(f"{name}.key", issued.key_pem, SECRET_MODE)
        return ClientIdentity(cert=cert, key=key)

    def server_exactly(
        self,
        name: str,
        *,
        common_name: str,
        san: Sequence[str] = (),
        other_ca: bool = False,
        key_type: KeyType = "ec",
        not_after: dt.datetime | None = None,
    ) -> ServerIdentity:
        """A server certificate with exactly this subject CN and these subjectAltName entries.

        ``san`` may be empty (a certificate named only by its CN, which clients must refuse);
        IP literals become IP entries. ``key_type="rsa"`` suits servers restricted to suites
        with RSA key exchange.
        """
        issuer = self.other_ca if other_ca else self.ca
        not_after = not_after or dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
        issued = issuer.issue(common_name=common_name, san=san, key_type=key_type,
                              not_before=not_after - dt.timedelta(days=60), not_after=not_after,
                              usages=(ExtendedKeyUsageOID.SERVER_AUTH,))
        # These servers send their CA after the leaf, as some real servers do.
        issued = IssuedCert(issued.chain_pem + issuer.cert_pem, issued.key_pem)
        bundle = self._other_ca_bundle if other_ca else self.ca_bundle_path
        return self.write_identity(name, issued, bundle)
