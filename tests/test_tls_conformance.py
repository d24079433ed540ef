"""One certificate matrix through every leg that opens upstream TLS: the same verdict on each.

The legs: the proxy (the real sidecar process, pyOpenSSL), the token endpoint, SMART
discovery, the replay after a 401, and ``check --online`` (stdlib ``ssl``). Each matrix case is
one real TLS server on loopback that serves FHIR, the SMART document and a token endpoint, so
every leg meets exactly the same certificate and handshake. A verdict is ``ok`` or the reason
of the refusal (``sidecar.tls.verdict.TlsFailureReason``), read from what the user sees: the
proxy's OperationOutcome and metric, ``check``'s result, the token source's failure.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, write_config
from support.sidecars import StartSidecar
from support.tls_matrix import MatrixServer, server_context

from sidecar.check.online import handshake
from sidecar.credentials.oauth import TokenUnavailable
from sidecar.proxy.upstream_replay import replay
from sidecar.runtime.live import load_snapshot
from sidecar.runtime.snapshot import Snapshot
from sidecar.tls.verdict import reason_of_stdlib_error

LEGS = ("proxy", "token", "discovery", "replay", "check")


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # "ok" or the TlsFailureReason every leg must report
    server: Callable[[TestPKI], ssl.SSLContext]
    tls: Callable[[TestPKI], dict[str, Any]]
    url_host: str = "localhost"
    sni: str | None = None  # the name every leg must send, when the case is about it


def _custom(pki: TestPKI) -> dict[str, Any]:
    return {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}


def _with_client_cert(pki: TestPKI) -> dict[str, Any]:
    client = pki.client_identity(name="matrix-client")
    return {**_custom(pki), "client_cert": str(client.cert), "client_key": str(client.key)}


def _cert(name: str, common_name: str, *san: str, **kwargs: Any
          ) -> Callable[[TestPKI], ssl.SSLContext]:
    configure = kwargs.pop("configure", None)

    def build(pki: TestPKI) -> ssl.SSLContext:
        identity = pki.server_exactly(f"matrix-{name}", common_name=common_name, san=san,
                                      **kwargs)
        return server_context(str(identity.cert_chain), str(identity.key), configure=configure)
    return build


def _requires_client_cert(pki: TestPKI) -> ssl.SSLContext:
    context = _cert("mtls", "localhost", "localhost")(pki)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki.ca_bundle_path)
    return context


def _only(version: ssl.TLSVersion) -> Callable[[ssl.SSLContext], None]:
    def configure(context: ssl.SSLContext) -> None:
        with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = version
            context.maximum_version = version
        # OpenSSL 3 refuses TLS 1.0/1.1 (SHA-1 signatures) above security level 0.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return configure


def _cbc_only(context: ssl.SSLContext) -> None:
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-SHA")  # static RSA key exchange, CBC: neither PFS nor AEAD


def _expired(name: str) -> Callable[[TestPKI], ssl.SSLContext]:
    import datetime as dt

    return _cert(name, "localhost", "localhost",
                 not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))


CASES = [
    Case("cn-only", "hostname_mismatch", _cert("cn-only", "localhost"), _custom),
    Case("san-dns", "ok", _cert("san-dns", "matrix server", "localhost"), _custom),
    Case("san-ip", "ok", _cert("san-ip", "matrix server", "127.0.0.1"), _custom,
         url_host="127.0.0.1"),
    Case("ip-in-cn-only", "hostname_mismatch", _cert("ip-cn", "127.0.0.1"), _custom,
         url_host="127.0.0.1"),
    Case("wildcard", "ok", _cert("wildcard", "matrix server", "*.sidecar.test"),
         lambda pki: {**_custom(pki), "server_name": "fhir.sidecar.test"},
         url_host="127.0.0.1", sni="fhir.sidecar.test"),
    Case("wildcard-two-labels", "hostname_mismatch",
         _cert("wildcard-2", "matrix server", "*.sidecar.test"),
         lambda pki: {**_custom(pki), "server_name": "a.fhir.sidecar.test"},
         url_host="127.0.0.1"),
    Case("partial-wildcard", "hostname_mismatch",
         _cert("partial-wildcard", "matrix server", "f*.sidecar.test"),
         lambda pki: {**_custom(pki), "server_name": "fhir.sidecar.test"},
         url_host="127.0.0.1"),
    Case("expired", "expired", _expired("expired"), _custom),
    Case("wrong-host", "hostname_mismatch", _cert("wrong-host", "other.example",
                                                  "other.example"), _custom),
    Case("other-ca", "unknown_ca", _cert("other-ca", "localhost", "localhost", other_ca=True),
         _custom),
    Case("server-name", "ok", _cert("server-name", "matrix server", "fhir.internal"),
         lambda pki: {**_custom(pki), "server_name": "fhir.internal"},
         url_host="127.0.0.1", sni="fhir.internal"),
    Case("server-name-not-set", "hostname_mismatch",
         _cert("server-name-2", "matrix server", "fhir.internal"), _custom),
    Case("client-cert", "ok", _requires_client_cert, _with_client_cert),
    Case("client-cert-missing", "client_certificate", _requires_client_cert, _custom),
    Case("tls10-only", "protocol_version",
         _cert("tls10", "localhost", "localhost", configure=_only(ssl.TLSVersion.TLSv1)),
         _custom),
    Case("tls11-only", "protocol_version",
         _cert("tls11", "localhost", "localhost", configure=_only(ssl.TLSVersion.TLSv1_1)),
         _custom),
    Case("aes128-sha-only", "handshake_refused",
         _cert("cbc", "localhost", "localhost", key_type="rsa", configure=_cbc_only),
         _custom),
    Case("skip-accepts-other-ca", "ok",
         _cert("skip", "localhost", "localhost", other_ca=True), lambda pki: {"verify": "skip"}),
]

# What each reason says in the shared words of sidecar.tls.verdict.describe, in the order
# they are tried (the handshake_refused words also mention client certificates).
_MARKERS = [
    ("refused the handshake", "handshake_refused"),
    ("speaks no TLS version", "protocol_version"),
    ("is not signed by a CA in", "unknown_ca"),
    ("is not valid for the name", "hostname_mismatch"),
    ("has expired or is not yet valid", "expired"),
    ("client certificate", "client_certificate"),
]


def reason_in_words(words: str) -> str:
    return next((reason for marker, reason in _MARKERS if marker in words),
                f"unclassified: {words}")


@dataclass
class Matrix:
    servers: dict[str, MatrixServer]
    snapshot: Snapshot  # compiled in this process, for the stdlib legs
    sidecar: SidecarProcess
    listen_ports: dict[str, int]
    admin_port: int


@pytest.fixture(scope="module")
def matrix(pki: TestPKI, tmp_path_factory: pytest.TempPathFactory,
           start_module_sidecar: StartSidecar) -> Iterator[Matrix]:
    tmp = tmp_path_factory.mktemp("tls-matrix")
    with ExitStack() as stack:
        servers = {c.name: stack.enter_context(MatrixServer(c.server(pki), c.url_host))
                   for c in CASES}
        listen_ports = {c.name: free_port() for c in CASES}
        admin_port = free_port()
        connections = {
            c.name: {"url": servers[c.name].url("/fhir"), "tls": c.tls(pki),
                     "listen": f"127.0.0.1:{listen_ports[c.name]}"}
            for c in CASES}
        oauth: dict[str, Any] = {}
        for c in CASES:
            client = {"client_id": "matrix", "client_secret": "matrix-secret",
                      "tls": c.tls(pki)}
            oauth[f"token-{c.name}"] = {**client, "token_url": servers[c.name].url("/token")}
            oauth[f"discovery-{c.name}"] = {**client,
                                            "discover_from": servers[c.name].url("/fhir")}
        legs_config = write_config(tmp, {"admin": {"listen": None}, "connections": connections,
                                         "oauth": oauth}, name="legs.yaml")
        sidecar = start_module_sidecar({"admin": {"listen": f"127.0.0.1:{admin_port}"},
                                        "connections": connections}, directory=tmp)
        yield Matrix(servers, load_snapshot(legs_config), sidecar.process, listen_ports,
                     admin_port)


def proxy_verdict(matrix: Matrix, case: Case) -> str:
    with httpx.Client(trust_env=False, timeout=30) as client:
        response = client.get(f"http://127.0.0.1:{matrix.listen_ports[case.name]}/Patient")
        if response.status_code == 200:
            assert "/fhir/Patient" in matrix.servers[case.name].paths
            return "ok"
        assert response.status_code == 502, response.text
        assert response.headers["X-Sidecar-Error"] == "upstream-tls", response.text
        reason = reason_in_words(response.json()["issue"][0]["diagnostics"])
        metrics = client.get(f"http://127.0.0.1:{matrix.admin_port}/metrics").text
    # Every reason is exported at 0 from the start; the failure counts under one of them.
    labelled = [found for found, count in re.findall(
        rf'fhir_sidecar_upstream_tls_failures_total{{connection="{re.escape(case.name)}",'
        r'reason="([a-z_]+)"} ([0-9.e+]+)', metrics) if float(count) > 0]
    assert labelled == [reason], metrics
    return reason


async def _token_verdict(matrix: Matrix, definition: str) -> str:
    source = matrix.snapshot.token_sources[definition]
    try:
        fetched = await source.fetch_once()
    except TokenUnavailable as exc:
        return reason_in_words(exc.reason)
    finally:
        await source.aclose()
    assert fetched.expires_in == 300  # as the matrix server said
    return "ok"


def token_verdict(matrix: Matrix, case: Case) -> str:
    return asyncio.run(_token_verdict(matrix, f"token-{case.name}"))


def discovery_verdict(matrix: Matrix, case: Case) -> str:
    verdict = asyncio.run(_token_verdict(matrix, f"discovery-{case.name}"))
    if verdict == "ok":
        assert "/fhir/.well-known/smart-configuration" in matrix.servers[case.name].paths
    return verdict


def replay_verdict(matrix: Matrix, case: Case) -> str:
    conn = matrix.snapshot.connections[case.name]
    try:
        answer = asyncio.run(replay(conn, "GET", "/fhir/Patient", [], b""))
    except httpx.HTTPError as exc:
        return reason_of_stdlib_error(exc) or f"unclassified: {exc!r}"
    assert answer.status == 200
    return "ok"


def check_verdict(matrix: Matrix, case: Case) -> str:
    result = handshake(matrix.snapshot.connections[case.name])
    if result.ok:
        return "ok"
    assert reason_in_words(result.result) == result.reason, result.result
    return result.reason


VERDICTS: dict[str, Callable[[Matrix, Case], str]] = {
    "proxy": proxy_verdict, "token": token_verdict, "discovery": discovery_verdict,
    "replay": replay_verdict, "check": check_verdict,
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_leg_reaches_the_same_verdict(matrix: Matrix, case: Case) -> None:
    server = matrix.servers[case.name]
    server.clear()
    verdicts = {leg: VERDICTS[leg](matrix, case) for leg in LEGS}
    assert verdicts == dict.fromkeys(LEGS, case.expect)
    if case.sni is not None:
        # Every leg (the token endpoint and discovery included) sent the override name.
        assert len(server.sni_names) >= len(LEGS)
        assert set(server.sni_names) == {case.sni}


def test_check_online_refuses_a_certificate_named_only_in_its_cn(
        matrix: Matrix, tmp_path: Path) -> None:
    # The user-visible side of the CN rule: the CLI fails, naming the reason.
    import subprocess
    import sys

    case = next(c for c in CASES if c.name == "cn-only")
    config = write_config(tmp_path, {"admin": {"listen": None}, "connections": {
        "cn": {"url": matrix.servers[case.name].url("/fhir"),
               "tls": matrix.snapshot.connections[case.name].settings.tls.model_dump(
                   mode="json", exclude_none=True)}}})
    result = subprocess.run([sys.executable, "-m", "sidecar", "check", "--online", "-c",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "is not valid for the name localhost" in result.stdout
    assert "never the subject CN" in result.stdout
