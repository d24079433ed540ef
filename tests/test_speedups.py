"""The speed tweaks belong to the embedded master only (sidecar/proxy/speedups.py): its own
``fhir-sidecar run`` process has them; a user's mitmproxy that loads ``addons/fhir_sidecar.py``
gets none of them. Also fails loudly when a mitmproxy internal they use changes."""

from __future__ import annotations

import contextlib
import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from support.sidecar_process import write_config

from sidecar.proxy import speedups

REPO = Path(__file__).resolve().parents[1]


def test_message_type_checks_can_be_skipped() -> None:
    from mitmproxy.http import MessageData

    had_checks = "__post_init__" in MessageData.__dict__
    speedups.skip_message_type_checks()
    # Still constructible, and the generated __init__ still finds a __post_init__ to call.
    response = http.Response.make(200, b"{}", {"Content-Type": "application/fhir+json"})
    assert response.status_code == 200
    assert had_checks == (MessageData.__post_init__ is speedups._no_type_check)


def test_cached_hook_dispatch_follows_the_addon_chain() -> None:
    import asyncio

    from mitmproxy import exceptions, options
    from mitmproxy.addonmanager import AddonManager
    from mitmproxy.master import Master
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import tflow

    calls: list[str] = []

    class First:
        def request(self, flow: http.HTTPFlow) -> None:
            calls.append("first")

    class Halting:
        async def request(self, flow: http.HTTPFlow) -> None:
            calls.append("halting")
            raise exceptions.AddonHalt

    class Late:
        def request(self, flow: http.HTTPFlow) -> None:
            calls.append("late")

    async def scenario() -> None:
        master = Master(options.Options())
        assert type(master.addons) is AddonManager  # the class the cache replaces
        speedups.cache_hook_dispatch(master.addons)
        first = First()
        master.addons.add(first)
        flow = tflow.tflow()
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first"]
        master.addons.add(Halting(), Late())  # a changed chain is looked up again
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first", "first", "halting"]  # AddonHalt still stops the chain
        master.addons.remove(first)
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first", "first", "halting", "halting"]

    asyncio.run(scenario())



def test_cached_dispatch_keeps_mitmproxys_rules_for_odd_chains(
        caplog: pytest.LogCaptureFixture) -> None:
    """Nested addons and a hook name bound to something not callable go through mitmproxy's
    own dispatch (children called, the error logged, the rest of the chain still run);
    ``update`` handlers get each flow after its hook, as in mitmproxy; the lookup is cached
    while the chain stays the same."""
    import asyncio
    import logging

    from mitmproxy import options
    from mitmproxy.master import Master
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import tflow

    calls: list[str] = []

    class Recording:
        def __init__(self, name: str) -> None:
            self.name = name

        def request(self, flow: http.HTTPFlow) -> None:
            calls.append(self.name)

    class Updating(Recording):
        def update(self, flows: list[object]) -> None:
            calls.append(f"update {len(flows)}")

    class Parent:
        def __init__(self) -> None:
            self.addons = [Recording("child")]

    class NotCallable:
        request = "not a hook"

    async def scenario() -> None:
        master = Master(options.Options())
        speedups.cache_hook_dispatch(master.addons)
        manager_class = type(master.addons)
        speedups.cache_hook_dispatch(master.addons)  # twice: still the one caching manager
        assert type(master.addons) is manager_class
        first = Recording("first")
        master.addons.add(first)
        flow = tflow.tflow()
        for _ in range(2):  # the second time from the cache
            await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first", "first"]
        updating = Updating("updating")
        master.addons.add(updating)
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls[2:] == ["first", "updating", "update 1"]
        from mitmproxy.proxy.server_hooks import ClientConnectedHook
        calls.clear()
        await master.addons.handle_lifecycle(ClientConnectedHook(tflow.tclient_conn()))
        assert calls == []  # no flow: no update
        master.addons.remove(updating)
        parent = Parent()
        master.addons.add(parent)
        calls.clear()
        await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first", "child"]
        master.addons.remove(parent)
        odd = NotCallable()
        master.addons.add(odd, Recording("late"))
        calls.clear()
        with caplog.at_level(logging.ERROR):
            await master.addons.handle_lifecycle(HttpRequestHook(flow))
        assert calls == ["first", "late"]
        assert "Addon handler request" in caplog.text and "not callable" in caplog.text

    asyncio.run(scenario())


def test_gc_housekeeping_collects_until_done() -> None:
    import asyncio
    import gc

    collections: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            collections.append(info["generation"])

    async def scenario() -> asyncio.Task[None] | None:
        housekeeping = speedups.GcHousekeeping()
        housekeeping.done()  # before running: nothing to stop
        housekeeping.running()
        task = housekeeping._task
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while len(collections) < 2:  # two rounds: it keeps collecting
            assert loop.time() < deadline, "no full collection"
            await asyncio.sleep(0.05)
        housekeeping.done()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)  # type: ignore[arg-type]
        return task

    gc.callbacks.append(seen)
    try:
        task = asyncio.run(scenario())
    finally:
        gc.callbacks.remove(seen)
        gc.unfreeze()  # running() froze this test process's objects
    assert task is not None and task.cancelled()


def test_a_mitmproxy_without_type_checks_is_left_as_it_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mitmproxy release without ``MessageData.__post_init__`` (nothing to skip) gets no
    no-op added: the tweak reports it found nothing."""
    from mitmproxy.http import MessageData

    monkeypatch.delattr(MessageData, "__post_init__")
    assert speedups.skip_message_type_checks() is False
    assert "__post_init__" not in MessageData.__dict__


def test_mitmproxy_still_reads_each_connection_through_its_stream_reader() -> None:
    """What read_in_large_chunks relies on: ``handle_connection`` is a coroutine that reads
    ``self.transports[connection].reader`` with ``read(n)``. When mitmproxy changes that,
    this fails, before the tweak silently stops doing anything."""
    from mitmproxy.proxy.server import ConnectionHandler

    original = inspect.unwrap(ConnectionHandler.handle_connection)
    assert inspect.iscoroutinefunction(original)
    source = inspect.getsource(original)
    assert "self.transports[connection].reader" in source
    assert "await reader.read(65535)" in source


def test_large_reads_swap_the_reader_and_return_what_is_buffered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    from types import SimpleNamespace

    from mitmproxy.proxy.server import ConnectionHandler

    seen: list[tuple[type, bytes]] = []

    async def mitmproxys(self: Any, connection: object) -> None:  # the read loop, in short
        reader = self.transports[connection].reader
        seen.append((type(reader), await reader.read(65535)))

    monkeypatch.setattr(ConnectionHandler, "handle_connection", mitmproxys)
    assert speedups.read_in_large_chunks() is True
    assert speedups.read_in_large_chunks() is True  # twice: wrapped once
    assert inspect.unwrap(ConnectionHandler.handle_connection) is mitmproxys

    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"x" * 300_000)  # what the socket delivered while the loop was busy
        handler = SimpleNamespace(transports={"conn": SimpleNamespace(reader=reader)})
        await ConnectionHandler.handle_connection(handler, "conn")  # type: ignore[arg-type]
        reader.feed_eof()
        assert await reader.read(65535) == b""  # nothing left behind

    asyncio.run(scenario())
    [(reader_type, data)] = seen
    assert issubclass(reader_type, asyncio.StreamReader)
    assert reader_type is not asyncio.StreamReader
    assert len(data) == 300_000  # one read, not five of 65535


def _config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {
        "proxy": {"listen": "127.0.0.1:0"},
        "admin": {"listen": None},
        "connections": {"fhir": {"url": "https://fhir.example/base"}},
    })


# Run in a fresh interpreter: the tweaks change the process, and the tests of this module
# (or any other) may have applied them to this one already.
_PROBE = """
import asyncio, gc, json, sys, time
# Python 3.12 starts with objects in the permanent generation already (375 here): count ours.
FROZEN_AT_START = gc.get_freeze_count()
from mitmproxy import options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.http import MessageData
from mitmproxy.proxy.server import ConnectionHandler

async def main(kind, config):
    if kind == "embedded":
        from pathlib import Path
        from sidecar.runtime.live import LiveConfig
        from sidecar.proxy.master import build_master
        master, _ = build_master(LiveConfig(config), Path(sys.argv[3]))
    else:
        from mitmproxy.tools.dump import DumpMaster
        master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        master.options.update_defer(sidecar_config=config)  # set once the script declares it
        master.options.update(scripts=[sys.argv[3]])  # mitmproxy loads it in a task
        deadline = time.monotonic() + 60
        while getattr(master.options, "sidecar_config", "") != config:
            assert time.monotonic() < deadline, "the script did not load"
            await asyncio.sleep(0.05)
    names = []
    def walk(addons):  # mitmdump -s: the script's addons are nested in the script's
        for addon in addons:
            names.append(type(addon).__name__)
            walk(getattr(addon, "addons", None) or [])
    walk(master.addons.chain)
    post_init = MessageData.__dict__.get("__post_init__")
    print(json.dumps({
        "addons": names,
        "addon_manager": type(master.addons) is AddonManager,
        "type_checks": getattr(post_init, "__qualname__", "") == "MessageData.__post_init__",
        "speedups_loaded": "sidecar.proxy.speedups" in sys.modules,
        "large_reads": getattr(ConnectionHandler.handle_connection, "_reads_large", False),
        "gc_frozen": gc.get_freeze_count() - FROZEN_AT_START,
    }))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _probe(kind: str, config: Path, extra: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-c", _PROBE, kind, str(config), extra],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def test_the_embedded_master_has_the_speed_tweaks(tmp_path: Path) -> None:
    found = _probe("embedded", _config(tmp_path), str(tmp_path / "state"))
    assert found["addon_manager"] is False  # the caching dispatch replaced it
    assert found["type_checks"] is False
    assert found["large_reads"] is True
    assert "GcHousekeeping" in found["addons"]


def test_the_addon_script_in_a_plain_mitmproxy_installs_none_of_them(tmp_path: Path) -> None:
    found = _probe("mitmdump", _config(tmp_path), str(REPO / "addons" / "fhir_sidecar.py"))
    assert "UpstreamTls" in found["addons"], found  # the script's addons did load
    assert found["addon_manager"] is True
    assert found["type_checks"] is True
    assert found["speedups_loaded"] is False
    assert found["large_reads"] is False
    assert "GcHousekeeping" not in found["addons"]
    assert found["gc_frozen"] == 0


def test_the_embedded_master_can_do_without_them(tmp_path: Path) -> None:
    import asyncio

    from mitmproxy.addonmanager import AddonManager

    from sidecar.proxy.master import build_master
    from sidecar.runtime.live import LiveConfig

    async def build() -> list[str]:
        master, _ = build_master(LiveConfig(str(_config(tmp_path))), tmp_path / "state",
                                 speedups=False)
        assert type(master.addons) is AddonManager
        return [type(a).__name__ for a in master.addons.chain]

    names = asyncio.run(build())
    assert "GcHousekeeping" not in names and "UpstreamTls" in names
