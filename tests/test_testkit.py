"""The test kit (sidecar/testkit/): one of each helper, and nothing test-only in the wheel."""

from __future__ import annotations

import ast
import collections
import contextlib
import re
import socket
import ssl
import tomllib
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from sidecar.testkit import ports
from sidecar.testkit.pki import DemoPKI
from sidecar.testkit.ports import free_port
from sidecar.testkit.token_server import TokenServer

REPO = Path(__file__).resolve().parents[1]


def _trusting(pki: DemoPKI) -> ssl.SSLContext:
    """Trusts exactly the kit's CA (not the machine's SSL_CERT_FILE)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki.ca_bundle_path)
    return context


def _python_files() -> list[Path]:
    return [path for top in ("sidecar", "tests", "bench") for path in (REPO / top).rglob("*.py")]


def test_the_package_neither_needs_nor_imports_trustme() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in
               project["dependencies"]]
    assert "trustme" not in runtime
    assert not re.search(r"^trustme==", (REPO / "requirements.lock").read_text(), re.M)
    for path in (REPO / "sidecar").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "trustme" for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "trustme", path


def test_one_free_port_helper_and_one_token_server_class() -> None:
    port_helpers, token_servers = [], []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "free_port":
                port_helpers.append(path.relative_to(REPO))
            if isinstance(node, ast.ClassDef) and node.name.endswith("TokenServer"):
                token_servers.append(path.relative_to(REPO))
    assert port_helpers == [Path("sidecar/testkit/ports.py")]
    assert token_servers == [Path("sidecar/testkit/token_server.py")]


def test_free_port_is_bindable_on_loopback() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # raises if the port was not free


def test_kit_certificates_verify_for_their_names_only(tmp_path: Path) -> None:
    pki = DemoPKI(tmp_path)
    identity = pki.server()
    leaf = x509.load_pem_x509_certificate(identity.cert_chain.read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert identity.key.stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate(pki.ca_bundle_path.read_bytes())
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)
    # A client trusting only the kit's CA accepts the leaf, through a real handshake.
    with TokenServer(identity, "kit-client", "kit-secret") as tokens, \
            httpx.Client(verify=_trusting(pki), trust_env=False) as http:
        answer = http.post(tokens.token_url, data={"grant_type": "client_credentials"},
                           auth=("kit-client", "kit-secret"))
        refused = http.post(tokens.token_url, data={"grant_type": "client_credentials"},
                            auth=("kit-client", "wrong"))
    assert answer.status_code == 200 and tokens.is_valid(answer.json()["access_token"])
    assert refused.status_code == 401 and tokens.issued == 1


def test_token_prefix_is_kept(tmp_path: Path) -> None:
    pki = DemoPKI(tmp_path)
    with TokenServer(pki.server(), "c", "s", token_prefix="bench-token-") as tokens, \
            httpx.Client(verify=_trusting(pki), trust_env=False) as http:
        token = http.post(tokens.token_url, data={"grant_type": "client_credentials"},
                          auth=("c", "s")).json()["access_token"]
    assert token.startswith("bench-token-") and len(token) > len("bench-token-") + 20


def test_a_server_certificate_needs_a_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one hostname"):
        DemoPKI(tmp_path).server(())


def test_free_port_stays_in_the_configured_range_and_skips_taken_ports(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Below the ranges CI gives the suites (docs/testing.md#ci-time), with a fresh memory of
    # recent ports: this process may have handed out ports of its own range already.
    monkeypatch.setattr(ports, "_recent", collections.deque(maxlen=256))
    with contextlib.ExitStack() as held:
        low = 19500
        for port in range(low, low + 8):  # all but the last port of the range are in use
            sock = held.enter_context(socket.socket())
            with contextlib.suppress(OSError):  # taken by someone else already: just as good
                sock.bind(("127.0.0.1", port))
        monkeypatch.setenv(ports.PORT_RANGE_ENV, f"{low}-{low + 8}")
        assert ports.free_port() == low + 8
    monkeypatch.setenv(ports.PORT_RANGE_ENV, "19000-19099")
    given = [ports.free_port() for _ in range(20)]
    assert all(19000 <= p <= 19099 for p in given), given
    assert len(set(given)) == 20, "a port was handed out twice in a row"


@pytest.mark.parametrize("value", ["24000", "24000-", "x-y", "99-2000", "30000-20000",
                                   "20000-70000"])
def test_a_bad_port_range_is_refused_in_words(monkeypatch: pytest.MonkeyPatch,
                                              value: str) -> None:
    monkeypatch.setenv(ports.PORT_RANGE_ENV, value)
    with pytest.raises(ValueError, match=r"FHIR_SIDECAR_TEST_PORTS=.*expected LOW-HIGH"):
        ports.free_port()
