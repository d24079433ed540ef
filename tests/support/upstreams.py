"""The test upstreams: real TLS FHIR servers, each with one certificate situation."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Literal

from sidecar.testkit.fhir_server import FhirTestServer, basic_auth_check
from sidecar.testkit.pki import ServerIdentity
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.fhir_routes import fhir_upstream
from support.pki import TestPKI

UpstreamKind = Literal["good", "other_ca", "wrong_host", "expired", "mtls"]


class Upstreams:
    """Starts each kind of upstream on first use and keeps it for the session.

    ``get`` clears the server's request record, so every test starts from an empty one.
    """

    def __init__(self, pki: TestPKI) -> None:
        self._pki = pki
        self._stack = ExitStack()
        self._servers: dict[UpstreamKind, FhirTestServer] = {}

    def get(self, kind: UpstreamKind) -> FhirTestServer:
        server = self._servers.get(kind)
        if server is None:
            server = self._stack.enter_context(self._create(kind))
            self._servers[kind] = server
        server.clear()
        return server

    def close(self) -> None:
        self._stack.close()

    def _create(self, kind: UpstreamKind) -> FhirTestServer:
        pki = self._pki
        issue: dict[UpstreamKind, Callable[[], ServerIdentity]] = {
            "good": pki.server,
            "other_ca": pki.server_from_other_ca,
            "wrong_host": pki.server_wrong_host,
            "expired": pki.server_expired,
            "mtls": lambda: pki.server(name="server-mtls"),
        }
        return fhir_upstream(
            issue[kind](),
            client_ca=pki.ca_bundle_path if kind == "mtls" else None,
            auth=basic_auth_check(UPSTREAM_USER, UPSTREAM_PASSWORD),
        )
