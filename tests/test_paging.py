"""FHIR links keep apps inside the sidecar: paging with fhirpy and requests, Location after a
create, XML bundles (larger, streamed Bundles: test_links_streaming.py). Real TLS upstream, the real
``fhir-sidecar run`` process, reverse and forward mode."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from fhirpy import SyncFHIRClient
from support.constants import EXPECTED_BASIC
from support.fhir_bodies import large_bundle_chunks
from support.sidecar_process import SidecarProcess
from support.sidecars import StartSidecar
from support.upstreams import Upstreams

from sidecar.testkit.fhir_server import FhirTestServer

PATIENTS = 7
PAGE = 2
PAGES = -(-PATIENTS // PAGE)
FHIR_NS = {"f": "http://hl7.org/fhir"}


@dataclass
class Setup:
    sidecar: SidecarProcess
    server: FhirTestServer
    reverse_port: int
    proxy_port: int
    family: str

    @property
    def reverse_base(self) -> str:
        return f"http://127.0.0.1:{self.reverse_port}"

    @property
    def forward_base(self) -> str:
        """The upstream's own base URL in plain http, as a forward-proxy app uses it."""
        return f"http://localhost:{self.server.port}/fhir"

    @property
    def proxies(self) -> dict[str, str]:
        return {"http": f"http://127.0.0.1:{self.proxy_port}"}

    def session(self, forward: bool) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        if forward:
            session.proxies.update(self.proxies)
        return session

    def base(self, forward: bool) -> str:
        return self.forward_base if forward else self.reverse_base


@pytest.fixture(scope="module")
def setup(start_module_sidecar: StartSidecar, upstreams: Upstreams) -> Setup:
    running = start_module_sidecar.basic(connection="paged", proxy=True)
    assert running.proxy_port is not None
    family = "Pager" + uuid.uuid4().hex[:8]
    result = Setup(running.process, upstreams.get("good"), running.port, running.proxy_port,
                   family)
    with result.session(forward=False) as session:
        for i in range(PATIENTS):
            created = session.post(f"{result.reverse_base}/Patient", timeout=30, json={
                "resourceType": "Patient", "name": [{"family": family, "given": [f"P{i}"]}]})
            assert created.status_code == 201, created.text
    return result


def _paging_requests(setup: Setup) -> list[Any]:
    return [r for r in setup.server.requests_seen
            if r.method == "GET" and r.path.startswith("/fhir/Patient?")]


def _assert_credentials_on_every_page(setup: Setup, pages: int = PAGES) -> None:
    seen = _paging_requests(setup)
    assert len(seen) == pages, [r.path for r in seen]
    for record in seen:
        assert record.headers["authorization"] == EXPECTED_BASIC


def _value(element: ET.Element, child: str) -> str:
    found = element.find(f"f:{child}", FHIR_NS)
    assert found is not None, child
    return found.get("value", "")


def _given(patient: Any) -> str:
    return str(patient["name"][0]["given"][0])


@pytest.mark.parametrize("forward", [False, True], ids=["reverse", "forward"])
def test_fhirpy_iterates_every_page_through_the_sidecar(setup: Setup, forward: bool) -> None:
    setup.server.clear()
    config: dict[str, Any] = {"timeout": 30}
    if forward:
        config["proxies"] = setup.proxies
    # fhirpy refuses (ValueError, "possible security issue") a next link outside its base URL.
    client = SyncFHIRClient(setup.base(forward), requests_config=config)
    found = list(client.resources("Patient").search(name=setup.family).limit(PAGE))
    assert sorted(_given(p) for p in found) == [f"P{i}" for i in range(PATIENTS)]
    _assert_credentials_on_every_page(setup)


@pytest.mark.parametrize("forward", [False, True], ids=["reverse", "forward"])
def test_requests_follows_next_links(setup: Setup, forward: bool) -> None:
    setup.server.clear()
    base = setup.base(forward)
    upstream_base = setup.server.base_url
    url: str | None = f"{base}/Patient?name={setup.family}&_count={PAGE}"
    names: list[str] = []
    with setup.session(forward) as session:
        while url is not None:
            response = session.get(url, timeout=30)
            assert response.status_code == 200, response.text
            bundle = response.json()
            links = {link["relation"]: link["url"] for link in bundle["link"]}
            assert links["self"].startswith(base + "/Patient?")
            for entry in bundle["entry"]:
                # Identity stays the upstream's: fullUrl is never rewritten.
                assert entry["fullUrl"].startswith(upstream_base + "/Patient/")
                names.append(_given(entry["resource"]))
            url = links.get("next")
            if url is not None:
                assert url.startswith(base + "/Patient?")
    assert sorted(names) == [f"P{i}" for i in range(PATIENTS)]
    _assert_credentials_on_every_page(setup)


@pytest.mark.parametrize("forward", [False, True], ids=["reverse", "forward"])
def test_location_after_create_points_at_the_sidecar(setup: Setup, forward: bool) -> None:
    base = setup.base(forward)
    with setup.session(forward) as session:
        response = session.post(f"{base}/Patient", timeout=30, json={
            "resourceType": "Patient", "name": [{"family": "Located"}]})
    assert response.status_code == 201, response.text
    patient_id = response.json()["id"]
    expected = f"{base}/Patient/{patient_id}/_history/1"
    assert response.headers["Location"] == expected
    assert response.headers["Content-Location"] == expected
    # The created resource itself is passed through as the upstream sent it.
    assert response.json()["name"] == [{"family": "Located"}]
    with setup.session(forward) as session:
        read = session.get(expected.rsplit("/_history/", 1)[0], timeout=30)
    assert read.status_code == 200 and read.json()["id"] == patient_id


@pytest.mark.parametrize("forward", [False, True], ids=["reverse", "forward"])
def test_xml_bundles_page_through_the_sidecar(setup: Setup, forward: bool) -> None:
    setup.server.clear()
    base = setup.base(forward)
    url: str | None = f"{base}/Patient?name={setup.family}&_count={PAGE}&_format=xml"
    ids: list[str] = []
    with setup.session(forward) as session:
        while url is not None:
            response = session.get(url, timeout=30)
            assert response.status_code == 200, response.text
            assert response.headers["Content-Type"].startswith("application/fhir+xml")
            root = ET.fromstring(response.content)
            assert root.tag == "{http://hl7.org/fhir}Bundle"
            links = {_value(link, "relation"): _value(link, "url")
                     for link in root.findall("f:link", FHIR_NS)}
            for entry in root.findall("f:entry", FHIR_NS):
                full_url = entry.find("f:fullUrl", FHIR_NS)
                assert full_url is not None
                assert full_url.get("value", "").startswith(setup.server.base_url + "/")
                ids.append(full_url.get("value", "").rsplit("/", 1)[1])
            assert links["self"].startswith(base + "/Patient?")
            url = links.get("next")
    assert len(ids) == len(set(ids)) == PATIENTS
    _assert_credentials_on_every_page(setup)


def test_bundles_under_the_threshold_are_rewritten(setup: Setup) -> None:
    size = 512 * 1024
    with setup.session(forward=False) as session:
        response = session.get(f"{setup.reverse_base}/Bundle/large", params={"size": size},
                               timeout=30)
    expected = b"".join(large_bundle_chunks(setup.server.base_url, size))
    upstream_next = f"{setup.server.base_url}/Bundle/large".encode()
    assert response.content == expected.replace(
        upstream_next, f"{setup.reverse_base}/Bundle/large".encode(), 1)
    assert int(response.headers["Content-Length"]) == len(response.content)
