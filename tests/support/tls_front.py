"""A TLS-terminating front for a plain proxy: an https:// egress proxy for tests.

``with TlsFront(identity, backend_port) as front:`` listens on ``front.port`` with the
identity's certificate, and relays each accepted connection's decrypted bytes to
``127.0.0.1:backend_port`` (a real tinyproxy) and back. asyncio on its own thread: each
connection is two copy tasks, and stopping the front closes everything it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from types import TracebackType

from sidecar.testkit.pki import ServerIdentity
from support.sidecar_process import free_port


class TlsFront:
    def __init__(self, identity: ServerIdentity, backend_port: int) -> None:
        self.backend_port = backend_port
        self.port = free_port()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(identity.cert_chain, identity.key)
        self.handshakes = 0  # TLS handshakes completed (connections relayed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tls-front")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def __enter__(self) -> TlsFront:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        started.result(timeout=30)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  ssl=self.context,
                                                  ssl_handshake_timeout=30)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        self._writers.add(writer)
        try:
            back_reader, back_writer = await asyncio.open_connection("127.0.0.1",
                                                                     self.backend_port)
        except OSError:
            writer.close()
            return
        self._writers.add(back_writer)
        await asyncio.gather(_copy(reader, back_writer), _copy(back_reader, writer))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                for writer in self._writers:
                    writer.close()
                await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
