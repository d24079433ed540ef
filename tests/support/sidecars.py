"""The set-up most tests share: a real sidecar with one Basic connection to a TLS upstream.

The ``start_sidecar`` fixture (tests/conftest.py) starts one per call and stops them all when
the module ends; ``basic_sidecar`` is the same as a context manager for other scopes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sidecar.testkit.ports import LOOPBACK
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, write_config


class Upstream(Protocol):
    """A loopback TLS server with a certificate from ``pki.ca`` for localhost."""

    @property
    def port(self) -> int: ...


@dataclass(frozen=True)
class RunningSidecar:
    process: SidecarProcess
    connection: str
    port: int  # the connection's own listener
    proxy_port: int | None  # the forward proxy listener, when asked for
    admin: str | None  # host:port of the admin listener, when asked for

    @property
    def base(self) -> str:
        """The FHIR base URL an app uses: the connection's listener."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def proxies(self) -> dict[str, str]:
        assert self.proxy_port is not None, "started without proxy=True"
        return {"http": f"http://{LOOPBACK}:{self.proxy_port}"}


def basic_sidecar_config(
    pki: TestPKI, upstream: Upstream, *, connection: str, port: int,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config with Basic credentials for ``connection`` to ``upstream``'s /fhir, trusting only
    ``pki.ca``; ``settings`` are added to the connection's own keys."""
    return {
        "admin": {"listen": None},
        "basic_auth": {"b": {"username": UPSTREAM_USER, "password": UPSTREAM_PASSWORD}},
        "connections": {connection: {
            "url": f"https://localhost:{upstream.port}/fhir",
            "listen": f"{LOOPBACK}:{port}", "auth": {"basic": "b"},
            "tls": {"verify": "custom", "ca_bundle": str(pki.ca_bundle_path)},
            **(settings or {})}},
    }


StartSidecar = Callable[..., RunningSidecar]
"""The ``start_sidecar`` fixture: ``start_sidecar(upstream=None, **basic_sidecar options)``."""


@contextlib.contextmanager
def basic_sidecar(
    directory: Path, pki: TestPKI, upstream: Upstream, *, connection: str = "fhir",
    proxy: bool = False, admin: bool = False, settings: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Iterator[RunningSidecar]:
    """Runs the sidecar on ``basic_sidecar_config`` until the block ends.

    ``proxy``/``admin`` add those listeners on free ports; ``extra`` adds top-level sections.
    """
    port = free_port()
    config = basic_sidecar_config(pki, upstream, connection=connection, port=port,
                                  settings=settings)
    proxy_port = free_port() if proxy else None
    admin_address = f"{LOOPBACK}:{free_port()}" if admin else None
    if proxy_port is not None:
        config["proxy"] = {"listen": f"{LOOPBACK}:{proxy_port}"}
    if admin_address is not None:
        config["admin"] = {"listen": admin_address}
    config.update(extra or {})
    with SidecarProcess(write_config(directory, config), directory / "state") as process:
        yield RunningSidecar(process, connection, port, proxy_port, admin_address)
