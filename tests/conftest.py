"""Shared fixtures: a throw-away PKI, real TLS FHIR upstreams (see support/upstreams.py) and
real sidecars in front of them (see support/sidecars.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.mitm_patches import restored
from support.pki import TestPKI
from support.sidecars import StartSidecar
from support.upstreams import Upstreams

from sidecar.testkit.fhir_server import FhirTestServer

pytest_plugins = ["support.oauth_fixtures"]


@pytest.fixture(autouse=True)
def _restore_mitmproxy_patches() -> Iterator[None]:
    """Patches of mitmproxy made in the test process end with the test that made them
    (support/mitm_patches.py)."""
    with restored():
        yield


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return TestPKI(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture(scope="session")
def upstreams(pki: TestPKI) -> Iterator[Upstreams]:
    pool = Upstreams(pki)
    yield pool
    pool.close()


@pytest.fixture
def upstream_good(upstreams: Upstreams) -> FhirTestServer:
    """Valid certificate from ``pki.ca`` for localhost/127.0.0.1; Basic auth required."""
    return upstreams.get("good")


@pytest.fixture
def upstream_other_ca(upstreams: Upstreams) -> FhirTestServer:
    """Certificate from ``pki.other_ca``: rejected by a client trusting only ``pki.ca``."""
    return upstreams.get("other_ca")


@pytest.fixture
def upstream_wrong_host(upstreams: Upstreams) -> FhirTestServer:
    """Certificate from ``pki.ca`` for "other.example" only."""
    return upstreams.get("wrong_host")


@pytest.fixture
def upstream_expired(upstreams: Upstreams) -> FhirTestServer:
    """Certificate from ``pki.ca`` whose validity ended yesterday."""
    return upstreams.get("expired")


@pytest.fixture
def upstream_mtls(upstreams: Upstreams) -> FhirTestServer:
    """Valid certificate; also requires a client certificate from ``pki.ca``."""
    return upstreams.get("mtls")


def _starter(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
             upstreams: Upstreams) -> Iterator[StartSidecar]:
    with ExitStack() as running:
        yield StartSidecar(running, lambda: Path(tmp_path_factory.mktemp("sidecar")), pki,
                           lambda: upstreams.get("good"))


@pytest.fixture
def start_sidecar(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
                  upstreams: Upstreams) -> Iterator[StartSidecar]:
    """``start_sidecar(config)`` / ``start_sidecar.basic(...)`` run a real sidecar until the
    test ends (see support/sidecars.py)."""
    yield from _starter(tmp_path_factory, pki, upstreams)


@pytest.fixture(scope="module")
def start_module_sidecar(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI,
                         upstreams: Upstreams) -> Iterator[StartSidecar]:
    """The same, until the module ends: for tests that read a shared sidecar, or restore what
    they change."""
    yield from _starter(tmp_path_factory, pki, upstreams)
