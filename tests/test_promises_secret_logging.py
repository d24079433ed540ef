"""docs/configuration.md: "Secrets, private keys, assertions and tokens never appear in logs,
errors, metrics or exception texts." Checked for signed client assertions (private_key_jwt) on
the real process at debug level: every assertion the authorization server received, and each of
its three parts, is searched for in everything the process wrote (stdout and stderr), in its
metrics and in its verbose /readyz."""

from __future__ import annotations

from pathlib import Path

import httpx
from support.fhir_routes import fhir_upstream
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import free_port, wait_until
from support.sidecars import StartSidecar


def test_signed_client_assertions_never_appear_in_output_metrics_or_readyz(
        tmp_path: Path, pki: TestPKI, oauth_provider: OAuthTestProvider,
        start_sidecar: StartSidecar) -> None:
    """Promise (docs/configuration.md): "Secrets, private keys, assertions and tokens never
    appear in logs, errors, metrics or exception texts"."""
    client = oauth_provider.clients["rs384"]
    oauth_provider.settings(ttl=4)  # short lifetime: several refreshes, several assertions
    (tmp_path / "secrets").mkdir()
    key_pem = client.private_key_pem or b""
    (tmp_path / "secrets" / "key.pem").write_bytes(key_pem)
    port, admin_port = free_port(), free_port()
    with fhir_upstream(pki.server(name="jwt-logging")) as upstream:
        config = {
            "admin": {"listen": f"127.0.0.1:{admin_port}"},
            "oauth": {"smart": {
                "token_url": oauth_provider.token_url, "client_id": client.client_id,
                "client_auth": "private_key_jwt", "private_key_file": "secrets/key.pem",
                "key_id": client.key_id, "signing_alg": "RS384",
                "scopes": list(oauth_provider.scopes),
                "tls": {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)}}},
            "connections": {"c": {
                "url": upstream.base_url, "listen": f"127.0.0.1:{port}",
                "auth": {"oauth": "smart"},
                "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
        }
        running = start_sidecar(config, directory=tmp_path, args=("--log-level", "debug"))
        sidecar = running.process
        def assertions() -> list[str]:
            return [r["params"]["client_assertion"]
                    for r in oauth_provider.recent_requests()
                    if r.get("client_id") == client.client_id
                    and "client_assertion" in r.get("params", {})]

        def served_after_refreshes() -> bool:
            answer = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=30,
                               trust_env=False)
            assert answer.status_code == 200, answer.text
            return len(assertions()) >= 3
        wait_until(served_after_refreshes, 30, interval=0.3,
                   message="three signed assertions (start and two refreshes)")
        tokens = {r.headers["authorization"].split(" ", 1)[1]
                  for r in upstream.requests_seen}
        metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=30,
                            trust_env=False).text
        readyz = httpx.get(f"http://127.0.0.1:{admin_port}/readyz?verbose=1", timeout=30,
                           trust_env=False).text
        running.stop()
    shown = "\n".join([sidecar.output, metrics, readyz])
    assert sidecar.events("ready") and len(sidecar.stdout_lines) > 5  # output was captured
    for jwt in assertions():
        header, payload, signature = jwt.split(".")
        for part in (jwt, header, payload, signature, f"{header}.{payload}"):
            assert part not in shown
    for token in tokens:
        assert token not in shown and token.split(".")[-1] not in shown
    key_body = [line for line in key_pem.decode().splitlines() if "-----" not in line]
    assert key_body and not any(line in shown for line in key_body)
