"""FHIR Bulk Data export through the real sidecar, step by step as the IG describes it.

A Bulk Data server on loopback over TLS (tests/support/bulk_data_server.py) checks the real
oidc-provider's tokens; a second TLS host plays the object storage a manifest may point at.
The app is plain ``requests``, following the IG: kick-off, poll the status URL, read the
manifest, download each file, cancel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from support.bearer import BearerValidator
from support.bulk_data_server import (
    NDJSON,
    RETRY_AFTER,
    BulkDataServer,
    ndjson_chunks,
    ndjson_line,
    ndjson_sha256,
)
from support.oauth_provider import OAuthTestProvider
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, wait_until
from support.sidecars import StartSidecar
from test_streaming import MAX_RSS_GROWTH, rss_bytes

POLL_DEADLINE = 20.0
LARGE = 48 * 1024 * 1024
KICKOFF_HEADERS = {"Accept": "application/fhir+json", "Prefer": "respond-async"}


@dataclass
class BulkSetup:
    fhir: BulkDataServer
    storage: BulkDataServer
    sidecar: SidecarProcess
    app_base: str
    forward_proxy: str
    ca_bundle: Path

    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxy or CA bundle from this machine's environment
        session.verify = str(self.ca_bundle)
        return session


@pytest.fixture
def bulk_servers(pki: TestPKI, bearer_validator: BearerValidator
                 ) -> Iterator[tuple[BulkDataServer, BulkDataServer]]:
    """The FHIR server checking the provider's tokens, and the storage host it points at."""
    with BulkDataServer(pki.server(name="bulk-fhir"), auth=bearer_validator) as fhir, \
            BulkDataServer(pki.server(name="bulk-storage"), auth=None,
                           host_name="localhost") as storage:
        fhir.storage_base = storage.origin
        yield fhir, storage


@pytest.fixture
def bulk(tmp_path: Path, pki: TestPKI, oauth_provider: OAuthTestProvider,
         bulk_servers: tuple[BulkDataServer, BulkDataServer],
         start_sidecar: StartSidecar) -> BulkSetup:
    fhir, storage = bulk_servers
    smart = oauth_provider.clients["rs384"]
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "smart.pem").write_bytes(smart.private_key_pem or b"")
    sidecar = start_sidecar({
        "admin": {"listen": None},
        "proxy": {"listen": f"127.0.0.1:{free_port()}"},
        "oauth": {"smart": {
            "token_url": oauth_provider.token_url, "client_id": smart.client_id,
            "client_auth": "private_key_jwt", "private_key_file": "keys/smart.pem",
            "key_id": smart.key_id, "signing_alg": "RS384",
            "scopes": list(oauth_provider.scopes),
            "tls": {"verify": "custom", "ca_bundle": str(oauth_provider.ca_bundle)}}},
        "connections": {"bulk": {
            "url": fhir.base_url, "listen": f"127.0.0.1:{free_port()}",
            "auth": {"oauth": "smart"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)}}},
    }, directory=tmp_path)
    return BulkSetup(fhir, storage, sidecar.process, sidecar.base,
                     f"http://127.0.0.1:{sidecar.proxy_port}", pki.ca_bundle_path)


def kick_off(s: BulkSetup, session: requests.Session, path: str = "/$export") -> str:
    started = session.get(f"{s.app_base}{path}", params={"_type": "Patient,Observation"},
                          headers=KICKOFF_HEADERS, timeout=30)
    assert started.status_code == 202, started.text
    status_url = started.headers["Content-Location"]
    job = status_url.rsplit("/", 1)[1]
    # The status URL points at the sidecar, at the same place under its base.
    assert status_url == f"{s.app_base}/bulkstatus/{job}"
    return job


def poll_until_complete(session: requests.Session, status_url: str
                        ) -> tuple[list[requests.Response], requests.Response]:
    """The IG's polling: 202 with Retry-After while running, then 200 with the manifest.
    (Retry-After is checked, not waited out: the server counts polls, not seconds.)"""
    running: list[requests.Response] = []

    def poll() -> requests.Response | None:
        answer = session.get(status_url, headers={"Accept": "application/json"}, timeout=30)
        if answer.status_code == 202:
            running.append(answer)
            return None
        return answer

    done: requests.Response = wait_until(poll, timeout=POLL_DEADLINE, interval=0.05,
                                         message="the export to complete")
    return running, done


def token_sent_to(fhir: BulkDataServer) -> str:
    authorizations = {r.headers.get("authorization") for r in fhir.seen()}
    assert len(authorizations) == 1, "every upstream request carries the one cached token"
    [authorization] = authorizations
    assert authorization is not None and authorization.startswith("Bearer ")
    return authorization.removeprefix("Bearer ")


def test_export_through_the_sidecar_follows_the_ig(bulk: BulkSetup) -> None:
    s = bulk
    with s.session() as app:
        job = kick_off(s, app)
        status_url = f"{s.app_base}/bulkstatus/{job}"
        running, done = poll_until_complete(app, status_url)

        # 202 while running: Retry-After and X-Progress exactly as the server sent them.
        assert [r.headers.get("Retry-After") for r in running] == [RETRY_AFTER] * 2
        assert [r.headers.get("X-Progress") for r in running] == [
            "Exporting: 1 of 3 steps", "Exporting: 2 of 3 steps"]

        # The manifest: file URLs under the upstream base now point at the sidecar; the
        # storage URL, `request`, the extension and every other byte are as the server sent.
        assert done.status_code == 200
        upstream_manifest = s.fhir.manifest(job)
        patient_file = s.fhir.file_url(job, "Patient")
        error_file = s.fhir.file_url(job, "errors")
        expected = upstream_manifest \
            .replace(f'"{patient_file}"'.encode(),
                     f'"{s.app_base}/bulkfiles/{job}/Patient.ndjson"'.encode()) \
            .replace(f'"{error_file}"'.encode(),
                     f'"{s.app_base}/bulkfiles/{job}/errors.ndjson"'.encode())
        assert expected != upstream_manifest
        assert done.content == expected
        manifest: dict[str, Any] = done.json()
        assert manifest["request"].startswith(s.fhir.base_url)  # not a file URL: kept
        assert manifest["output"][1]["url"] == s.fhir.storage_url(job)

        # Downloads through the sidecar carry the token; NDJSON arrives unchanged.
        for entry in (manifest["output"][0], manifest["error"][0]):
            file = app.get(entry["url"], headers={"Accept": NDJSON}, timeout=30)
            assert file.status_code == 200, file.text
            assert file.headers["Content-Type"] == NDJSON
            assert file.content == b"".join(ndjson_chunks(s.fhir.base_url,
                                                          s.fhir.small_file_size))

        # The file on the other host is fetched there directly, as the app got it.
        signed = app.get(manifest["output"][1]["url"], headers={"Accept": NDJSON}, timeout=30)
        assert signed.status_code == 200

        # Cancel: DELETE on the status URL goes through; the job is gone afterwards.
        deleted = app.delete(status_url, timeout=30)
        assert deleted.status_code == 202, deleted.text
        assert app.get(status_url, timeout=30).status_code == 404

    token = token_sent_to(s.fhir)
    methods = [(r.method, r.target.split("?")[0]) for r in s.fhir.seen()]
    assert methods[0] == ("GET", "/fhir/$export")
    assert ("DELETE", f"/fhir/bulkstatus/{job}") in methods
    assert ("GET", f"/fhir/bulkfiles/{job}/Patient.ndjson") in methods
    # The storage host got exactly the app's own request: no credentials of any kind.
    storage_bytes = s.storage.all_bytes()
    assert storage_bytes.startswith(b"GET /signed/")
    assert b"authorization" not in storage_bytes.lower()
    assert token.encode() not in storage_bytes


def test_credentials_never_reach_the_other_host_through_the_sidecar(bulk: BulkSetup) -> None:
    """An app that sends the storage URL through the sidecar's forward proxy anyway gets a
    refusal: the storage host is not a configured connection, so nothing reaches it."""
    s = bulk
    proxies = {"http": s.forward_proxy, "https": s.forward_proxy}
    with s.session() as app:
        job = kick_off(s, app)
        storage_url = s.fhir.storage_url(job)
        with pytest.raises(requests.exceptions.ProxyError):
            app.get(storage_url, proxies=proxies, timeout=30)  # CONNECT: refused
        plain = app.get(storage_url.replace("https://", "http://", 1), proxies=proxies,
                        timeout=30)
        assert plain.status_code == 403
        assert plain.headers["X-Sidecar-Error"] == "no-route"
    assert s.storage.all_bytes() == b""
    assert s.storage.connections == []


def test_export_through_the_forward_proxy(bulk: BulkSetup) -> None:
    """An app with the upstream's base URL (as http://) and the sidecar as HTTP proxy."""
    s = bulk
    base = s.fhir.base_url.replace("https://", "http://", 1)
    proxies = {"http": s.forward_proxy}
    with s.session() as app:
        started = app.get(f"{base}/$export", headers=KICKOFF_HEADERS, proxies=proxies,
                          timeout=30)
        assert started.status_code == 202, started.text
        status_url = started.headers["Content-Location"]
        job = status_url.rsplit("/", 1)[1]
        assert status_url == f"{base}/bulkstatus/{job}"
        app.proxies = proxies
        _, done = poll_until_complete(app, status_url)
        manifest = done.json()
        assert manifest["output"][0]["url"] == f"{base}/bulkfiles/{job}/Patient.ndjson"
        assert manifest["output"][1]["url"] == s.fhir.storage_url(job)
        file = app.get(manifest["output"][0]["url"], timeout=30)
        assert file.status_code == 200
        assert file.content == b"".join(ndjson_chunks(s.fhir.base_url, s.fhir.small_file_size))
    token_sent_to(s.fhir)


@pytest.mark.parametrize("path", ["/Patient/$export", "/Group/cohort-7/$export"])
def test_patient_and_group_kick_off(bulk: BulkSetup, path: str) -> None:
    with bulk.session() as app:
        job = kick_off(bulk, app, path)
        _, done = poll_until_complete(app, f"{bulk.app_base}/bulkstatus/{job}")
        assert done.json()["output"][0]["url"].startswith(f"{bulk.app_base}/bulkfiles/")
    assert bulk.fhir.seen()[0].target.startswith(f"/fhir{path}?")


def test_kick_off_without_respond_async_passes_the_servers_refusal(bulk: BulkSetup) -> None:
    with bulk.session() as app:
        refused = app.get(f"{bulk.app_base}/$export",
                          headers={"Accept": "application/fhir+json"}, timeout=30)
    assert refused.status_code == 400
    assert "respond-async" in refused.json()["issue"][0]["diagnostics"]


def test_ndjson_streams_with_flat_memory_and_is_never_scanned(bulk: BulkSetup) -> None:
    s = bulk
    assert s.sidecar.proc is not None
    pid = s.sidecar.proc.pid
    expected = ndjson_sha256(s.fhir.base_url, LARGE)
    with s.session() as app:
        job = kick_off(s, app)  # warm up: token, TLS, imports
        baseline = rss_bytes(pid, "VmRSS")
        for framing in ({}, {"chunked": "1"}):
            digest = hashlib.sha256()
            received = 0
            with app.get(f"{s.app_base}/bulkfiles/{job}/Patient.ndjson",
                         params={"size": str(LARGE), **framing}, headers={"Accept": NDJSON},
                         stream=True, timeout=120) as response:
                assert response.status_code == 200
                for chunk in response.raw.stream(256 * 1024, decode_content=False):
                    digest.update(chunk)
                    received += len(chunk)
            # Every line is a Bundle with a link under the upstream base: unchanged.
            assert (received, digest.hexdigest()) == (LARGE, expected), framing
        # One line, small enough to be buffered: a lone Bundle, and still not rewritten.
        one_line = ndjson_line(s.fhir.base_url, 0)
        small = app.get(f"{s.app_base}/bulkfiles/{job}/Patient.ndjson",
                        params={"size": str(len(one_line))}, headers={"Accept": NDJSON},
                        timeout=30)
        assert small.content == one_line
        peak = rss_bytes(pid, "VmHWM")
    assert peak - baseline < MAX_RSS_GROWTH, f"RSS grew by {(peak - baseline) >> 20} MiB"
