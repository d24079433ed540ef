"""The one way tests start a real sidecar: ``fhir-sidecar run`` on a config written for the test.

Two fixtures in tests/conftest.py hand out a ``StartSidecar``:

- ``start_sidecar`` (function scope): every sidecar it starts stops when the test ends.
- ``start_module_sidecar`` (module scope): for a sidecar shared by the tests of a module, which
  read it or restore what they change; it stops when the module ends.

``start(config, directory=None, env=None, args=(), wait_ready=True)`` writes any config dict
into ``directory`` (put the files it names there first; a fresh directory when none is given),
starts the process (``env`` added to the test's environment, ``args`` after
``run -c CONFIG --state-dir DIR``), waits for its ready line (``wait_ready=False``: only for
the process to start, for a test that watches the start-up or logs in text) and returns a
``RunningSidecar`` with the listeners the config gave it.
``start.basic()`` does the same for the common case, ``basic_sidecar_config``: one Basic
connection to a TLS upstream. At the end each process gets SIGTERM and must exit 0; a test
that needs the whole log of a stopped sidecar calls ``RunningSidecar.stop()`` itself.

The config must say where the admin listener is (an address, or ``None`` for none): its
default port would collide between tests running side by side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sidecar.testkit.ports import LOOPBACK
from support.constants import UPSTREAM_PASSWORD, UPSTREAM_USER
from support.pki import TestPKI
from support.sidecar_process import SidecarProcess, free_port, write_config

Config = dict[str, Any]


class Upstream(Protocol):
    """A loopback TLS server with a certificate from ``pki.ca`` for localhost."""

    @property
    def port(self) -> int: ...


def _port(listen: str | None) -> int | None:
    # HOST:PORT or [V6]:PORT. Not ListenAddress.parse: importing the config models (pydantic)
    # would add a quarter second to every test run that needs none of them.
    return None if listen is None else int(listen.rpartition(":")[2])


@dataclass(frozen=True)
class RunningSidecar:
    """A started sidecar and the listeners its config gave it."""

    process: SidecarProcess
    config: Config  # as written to ``config_path``
    ports: dict[str, int]  # each connection's own listener, by connection name
    proxy_port: int | None  # the forward proxy listener
    admin: str | None  # HOST:PORT of the admin listener
    admin_token: str | None  # the content of admin.token_file

    @classmethod
    def of(cls, process: SidecarProcess, config: Config) -> RunningSidecar:
        admin = config["admin"]
        token_file = admin.get("token_file")
        token = None if token_file is None else \
            (process.config.parent / token_file).read_text(encoding="utf-8").strip()
        ports = {name: int(c["listen"].rpartition(":")[2])
                 for name, c in config.get("connections", {}).items() if c.get("listen")}
        return cls(process, config, ports, _port(config.get("proxy", {}).get("listen")),
                   admin["listen"], token)

    @property
    def config_path(self) -> Path:
        return self.process.config

    @property
    def directory(self) -> Path:
        """Where the config is; relative paths in it start here."""
        return self.process.config.parent

    @property
    def connection(self) -> str:
        """The one connection with a listener of its own."""
        [name] = self.ports
        return name

    @property
    def port(self) -> int:
        return self.ports[self.connection]

    @property
    def base(self) -> str:
        """The FHIR base URL an app uses: the connection's listener."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def proxies(self) -> dict[str, str]:
        assert self.proxy_port is not None, "started without a proxy listener"
        return {"http": f"http://{LOOPBACK}:{self.proxy_port}"}

    @property
    def admin_port(self) -> int:
        port = _port(self.admin)
        assert port is not None, "started without an admin listener"
        return port

    @property
    def admin_url(self) -> str:
        assert self.admin is not None, "started without an admin listener"
        return f"http://{self.admin}"

    def stop(self) -> None:
        """SIGTERM; the sidecar must exit 0. Stopping twice is stopping once."""
        code = self.process.stop()
        assert code == 0, f"the sidecar exited with {code}:\n{self.process.output[-5000:]}"


def basic_sidecar_config(
    pki: TestPKI, upstream: Upstream, *, connection: str, port: int,
    settings: Config | None = None,
) -> Config:
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


@contextlib.contextmanager
def running_sidecar(directory: Path, config: Config, env: dict[str, str] | None = None,
                    args: tuple[str, ...] = (), wait_ready: bool = True
                    ) -> Iterator[RunningSidecar]:
    """Runs the sidecar on ``config``, written to ``directory``, until the block ends."""
    if "listen" not in config.get("admin", {}):
        raise ValueError("give admin.listen (an address or None): the default port would "
                         "collide between tests")
    process = SidecarProcess(write_config(directory, config), directory / "state", env=env,
                             args=args)
    try:
        process.start(wait_ready)
        sidecar = RunningSidecar.of(process, config)
        yield sidecar
    except BaseException:
        process.stop()
        raise
    sidecar.stop()


class StartSidecar:
    """What ``start_sidecar`` and ``start_module_sidecar`` hand out; see the module docstring."""

    def __init__(self, running: ExitStack, new_directory: Callable[[], Path], pki: TestPKI,
                 default_upstream: Callable[[], Upstream]):
        self._running = running
        self._new_directory = new_directory
        self._pki = pki
        self._default_upstream = default_upstream

    def __call__(self, config: Config, *, directory: Path | None = None,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = (),
                 wait_ready: bool = True) -> RunningSidecar:
        return self._running.enter_context(
            running_sidecar(directory or self._new_directory(), config, env, args, wait_ready))

    def basic(self, upstream: Upstream | None = None, *, connection: str = "fhir",
              proxy: bool = False, admin: bool = False, settings: Config | None = None,
              extra: Config | None = None) -> RunningSidecar:
        """``basic_sidecar_config`` to ``upstream`` (default: the good one). ``proxy``/``admin``
        add those listeners on free ports; ``extra`` adds top-level sections."""
        config = basic_sidecar_config(self._pki, upstream or self._default_upstream(),
                                      connection=connection, port=free_port(),
                                      settings=settings)
        if proxy:
            config["proxy"] = {"listen": f"{LOOPBACK}:{free_port()}"}
        if admin:
            config["admin"] = {"listen": f"{LOOPBACK}:{free_port()}"}
        config.update(extra or {})
        return self(config)
