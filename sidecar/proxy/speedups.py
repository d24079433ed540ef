"""Speed tweaks of the embedded master (``fhir-sidecar run``), never of a user's mitmproxy.

Each trades a mitmproxy behaviour a general-purpose proxy needs (type checks of every
message, hook lookup that follows any change of the addon chain, CPython's own GC pacing)
for throughput the sidecar's own master can afford; ``build_master(..., speedups=True)``
applies them. Loading ``addons/fhir_sidecar.py`` into ``mitmdump -s`` applies none: they
change the whole process. Each mitmproxy internal used here sits in one function, checked
by ``tests/test_speedups.py`` and listed in ``sidecar/proxy/mitm_private.py`` (checked on the
oldest and the newest mitmproxy allowed, like ``mitm_compat.py``); the measurements are in
bench/README.md.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import types
from collections.abc import Callable

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, safecall
from mitmproxy.connection import Connection
from mitmproxy.master import Master

GC_INTERVAL_SECONDS = 0.5


def apply(master: Master) -> list[object]:
    """Every speed tweak, on ``master`` (before its addons are added) and the process; returns
    the addons to add at the end of the chain."""
    skip_message_type_checks()
    cache_hook_dispatch(master.addons)
    read_in_large_chunks()
    return [GcHousekeeping()]  # no per-request hooks: costs nothing per request


def skip_message_type_checks() -> bool:
    """Stop mitmproxy from type-checking every field of every Request and Response it builds.

    ``MessageData.__post_init__`` runs ``typecheck.check_option_type`` on each field of each
    message (twice per proxied request, plus one throw-away Response per response read); it
    is a development aid that ``python -O`` compiles out, and a visible share of the sidecar's
    CPU per request (bench/README.md, profiling). Returns whether it was in place.
    """
    from mitmproxy.http import MessageData

    if "__post_init__" not in MessageData.__dict__:
        return False
    # A dataclass's generated __init__ calls __post_init__ when the class had one, so it is
    # replaced by a no-op rather than deleted.
    MessageData.__post_init__ = _no_type_check  # type: ignore[method-assign]
    return True


def _no_type_check(self: object) -> None:
    return None


READ_SIZE = 1 << 20  # what one socket read may return (mitmproxy asks for at most 65535)


def read_in_large_chunks() -> bool:
    """Let each socket read of a proxied connection return up to :data:`READ_SIZE` bytes.

    mitmproxy reads every connection 65535 bytes at a time, and each read travels the whole
    layer stack (TLS, HTTP/1, the body reader) as one event: a 400 KB search page from the
    upstream is seven trips. Whatever the socket has buffered now comes as one (asyncio's
    reader still stops reading at 128 KiB unread, so memory stays bounded); a 400 KB page
    costs 15% less CPU (bench/README.md, "Larger reads"). The readers are mitmproxy's own
    (``ConnectionHandler.transports``); the swap happens where it starts reading a
    connection. Returns whether it is in place.
    """
    from mitmproxy.proxy.server import ConnectionHandler

    current = ConnectionHandler.handle_connection
    if getattr(current, "_reads_large", False):
        return True
    if not inspect.iscoroutinefunction(current):
        return False

    @functools.wraps(current)
    async def handle_connection(self: ConnectionHandler, connection: Connection) -> None:
        transport = self.transports.get(connection)
        reader = transport.reader if transport is not None else None
        if type(reader) is asyncio.StreamReader:
            reader.__class__ = _LargeReads
        await current(self, connection)

    handle_connection._reads_large = True  # type: ignore[attr-defined]
    ConnectionHandler.handle_connection = handle_connection  # type: ignore[method-assign]
    return True


class _LargeReads(asyncio.StreamReader):
    async def read(self, n: int = -1) -> bytes:
        return await super().read(READ_SIZE if 0 < n < READ_SIZE else n)


def cache_hook_dispatch(addons: AddonManager) -> None:
    """Dispatch each hook only to the addons that implement it, looked up once per hook name.

    mitmproxy looks every hook up on every addon for every event (``trigger_event`` →
    ``invoke_addon`` → ``_iter_hooks`` → ``traverse``) and triggers an ``update`` hook after
    each flow hook, which none of the sidecar's addons implement: a visible share of the CPU
    per request (bench/README.md, profiling). The lookup is redone whenever the addon chain
    changes; a chain with nested addons (whose children may change unseen) keeps mitmproxy's
    own dispatch.
    """
    if type(addons) is AddonManager:
        addons.__class__ = _CachingAddonManager


class _CachingAddonManager(AddonManager):
    _handlers: dict[str, list[Callable[..., object]]]
    _handlers_chain: list[object] | None = None  # a copy of the chain the handlers are for

    def _handlers_for(self, name: str) -> list[Callable[..., object]] | None:
        if self._handlers_chain != self.chain:  # compares the addons by identity, in C
            if any(hasattr(addon, "addons") for addon in self.chain):
                return None
            self._handlers, self._handlers_chain = {}, list(self.chain)
        found = self._handlers.get(name)
        if found is None:
            found = []
            for addon in self.chain:
                func = getattr(addon, name, None)
                if func is None or isinstance(func, types.ModuleType):
                    continue
                if not callable(func):
                    return None  # mitmproxy's own dispatch reports this as an error
                found.append(func)
            self._handlers[name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self._handlers_for(event.name)
        if handlers is None:
            await super().trigger_event(event)
            return
        args = event.args()
        for func in handlers:
            try:
                with safecall():
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self._handlers_for("update") != []:
            message = event.args()[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


class GcHousekeeping:
    """Keeps memory bounded under connection churn.

    Every proxied connection leaves reference cycles (pyOpenSSL connections, mitmproxy layer
    trees) that hold OpenSSL's C memory until a full collection, which CPython runs rarely once
    the heap is large, so RSS climbs under connection churn (bench/README.md). Objects alive
    at start are frozen, never scanned again, so a full collection twice a second costs a few
    milliseconds.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        gc.freeze()
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            await asyncio.sleep(GC_INTERVAL_SECONDS)
            gc.collect()

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
