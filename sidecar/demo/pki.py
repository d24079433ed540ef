"""A throw-away PKI for the demo and the tests, built on ``trustme``.

Every certificate is written as PEM into one directory so that the sidecar under test reads it
exactly as it would read an operator's files (paths in a config), never from memory.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme

_PUBLIC_MODE = 0o644
# Private keys must not be readable by other users, also on shared demo machines.
_SECRET_MODE = 0o600


@dataclass(frozen=True)
class ServerIdentity:
    """What a TLS server needs, plus the CA bundle a client must trust to accept it."""

    cert_chain: Path
    key: Path
    ca_bundle: Path


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate (for mTLS) and its private key."""

    cert: Path
    key: Path


class DemoPKI:
    """Two independent CAs and helpers that issue certificates into ``directory``.

    ``ca`` is the "internal" CA a connection is configured to trust; ``other_ca`` is unrelated,
    so a server certificate from it must be rejected by a policy that trusts only ``ca``.
    Each issuing method takes a ``name`` that becomes the file stem, so several identities can
    live side by side; issuing again under the same name replaces the files atomically.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="fhir-sidecar demo internal CA")
        self.other_ca = trustme.CA(organization_name="fhir-sidecar demo unrelated CA")
        self._ca_bundle = self._write("ca.pem", self.ca.cert_pem.bytes(), _PUBLIC_MODE)
        self._other_ca_bundle = self._write(
            "other-ca.pem", self.other_ca.cert_pem.bytes(), _PUBLIC_MODE
        )

    @property
    def ca_bundle_path(self) -> Path:
        """PEM file with the internal CA's certificate."""
        return self._ca_bundle

    @property
    def other_ca_bundle_path(self) -> Path:
        """PEM file with the unrelated CA's certificate."""
        return self._other_ca_bundle

    def server(
        self, hostnames: Sequence[str] = ("localhost", "127.0.0.1"), *, name: str = "server"
    ) -> ServerIdentity:
        """A valid server certificate from the internal CA (IP literals become IP SANs)."""
        return self._issue_server(self.ca, name, hostnames)

    def server_from_other_ca(
        self,
        hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
        *,
        name: str = "server-other-ca",
    ) -> ServerIdentity:
        """Correct names and dates, but signed by the unrelated CA."""
        return self._issue_server(self.other_ca, name, hostnames)

    def server_wrong_host(
        self, hostnames: Sequence[str] = ("other.example",), *, name: str = "server-wrong-host"
    ) -> ServerIdentity:
        """Signed by the internal CA, but for names that are not the loopback address."""
        return self._issue_server(self.ca, name, hostnames)

    def server_expired(
        self,
        hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
        *,
        name: str = "server-expired",
    ) -> ServerIdentity:
        """Signed by the internal CA for the right names, but valid only in the past."""
        now = dt.datetime.now(dt.UTC)
        return self._issue_server(
            self.ca,
            name,
            hostnames,
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        )

    def client_identity(
        self, *, name: str = "client", common_name: str = "fhir-sidecar demo client"
    ) -> ClientIdentity:
        """A client certificate from the internal CA, for servers that require mTLS."""
        leaf = self.ca.issue_cert("sidecar-client.demo.internal", common_name=common_name)
        cert = self._write(f"{name}.pem", _chain_bytes(leaf), _PUBLIC_MODE)
        key = self._write(f"{name}.key", leaf.private_key_pem.bytes(), _SECRET_MODE)
        return ClientIdentity(cert=cert, key=key)

    def _issue_server(
        self,
        issuer: trustme.CA,
        name: str,
        hostnames: Sequence[str],
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> ServerIdentity:
        if not hostnames:
            raise ValueError("a server certificate needs at least one hostname")
        leaf = issuer.issue_cert(*hostnames, not_before=not_before, not_after=not_after)
        cert_chain = self._write(f"{name}.pem", _chain_bytes(leaf), _PUBLIC_MODE)
        key = self._write(f"{name}.key", leaf.private_key_pem.bytes(), _SECRET_MODE)
        bundle = self._ca_bundle if issuer is self.ca else self._other_ca_bundle
        return ServerIdentity(cert_chain=cert_chain, key=key, ca_bundle=bundle)

    def _write(self, filename: str, data: bytes, mode: int) -> Path:
        # Write beside the target and rename, so a reader (a sidecar reloading its config) never
        # sees a half-written file; mkstemp creates it 0600, so a key is never briefly readable.
        target = self.directory / filename
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{filename}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(tmp_name, mode)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return target


def _chain_bytes(leaf: trustme.LeafCert) -> bytes:
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
