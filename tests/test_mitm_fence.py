"""The mitmproxy fence: private mitmproxy names are touched only by sidecar/proxy/mitm_compat.py
and sidecar/proxy/speedups.py, each one is listed in sidecar/proxy/mitm_private.py, every
listed name still resolves on the installed mitmproxy, and CI tests the releases the list was
checked on (docs/testing.md#ci-time)."""

from __future__ import annotations

import ast
import asyncio
import functools
import http.server
import importlib
import inspect
import re
import tomllib
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from importlib.metadata import version
from pathlib import Path

import h11
import mitmproxy
import pytest
from support.mitm_patches import PATCHED

from sidecar.proxy import mitm_private
from sidecar.proxy.mitm_private import PRIVATE_NAMES, PrivateName, covered, is_private

REPO = Path(__file__).resolve().parents[1]
FENCE = {REPO / path for path in mitm_private.FENCE}
# mitmproxy's documented API (its docs/scripts/api-render.py), plus ctx: its members are public.
DOCUMENTED = ("mitmproxy.certs", "mitmproxy.connection", "mitmproxy.coretypes.multidict",
              "mitmproxy.dns", "mitmproxy.flow", "mitmproxy.http", "mitmproxy.net.server_spec",
              "mitmproxy.proxy.context", "mitmproxy.proxy.mode_specs",
              "mitmproxy.proxy.server_hooks", "mitmproxy.tcp", "mitmproxy.tls",
              "mitmproxy.udp", "mitmproxy.websocket", "mitmproxy.addonmanager.Loader")
CTX = frozenset({"master", "addons", "options", "log"})


# -- (b) every listed name resolves, on a release the list was checked on ----------------------

@pytest.mark.parametrize("entry", PRIVATE_NAMES, ids=lambda entry: entry.path)
def test_every_listed_private_name_resolves_on_the_installed_mitmproxy(
        entry: PrivateName) -> None:
    mitm_private.resolve(entry)
    assert is_private(entry.path), f"{entry.path} is public: it needs no entry"
    assert entry.breaks and entry.by


@pytest.mark.parametrize(("path", "instance", "words", "expected"), [
    ("mitmproxy.proxy.layers.http._http9.Http9Server", False, None, "no attribute"),
    ("mitmproxy.proxy.server.ConnectionHandler.vanished", False, None, "no attribute"),
    ("mitmproxy.proxy.server.ConnectionHandler.vanished", True, None, "no longer declares"),
    ("mitmproxy.proxy.server.ConnectionHandler", False, "words nobody wrote", "no longer says"),
    ("nomitmproxy.thing", False, None, "no such module"),
])
def test_a_name_that_is_gone_does_not_resolve(path: str, instance: bool, words: str | None,
                                              expected: str) -> None:
    entry = PrivateName(path, "read", "-", "-", words=words, instance=instance)
    with pytest.raises(LookupError, match=expected):
        mitm_private.resolve(entry)


def test_instance_attributes_resolve_by_annotation_or_assignment() -> None:
    for path in ("mitmproxy.proxy.server.ConnectionHandler.max_conns",  # annotated
                 "mitmproxy.addonmanager.AddonManager.chain"):  # self.chain = ... only
        mitm_private.resolve(PrivateName(path, "read", "-", "-", instance=True))
    assert not is_private("h11.Connection") and not is_private("mitmproxy.http.Request")
    assert not is_private("mitmproxy.addonmanager.Loader")
    assert is_private("mitmproxy.addonmanager.AddonManager")
    assert not is_private("mitmproxy")


def test_the_installed_mitmproxy_is_a_release_the_fence_was_checked_on() -> None:
    installed = version("mitmproxy")
    assert installed in mitm_private.CHECKED_ON, (
        f"mitmproxy {installed} was never checked: run the modules listed in "
        "sidecar/proxy/mitm_private.py's docstring on it, then add it to CHECKED_ON")


def _floors() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    found = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z][\w.-]*)>=([\w.]+)(?:,<[\w.]+)?", requirement)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def _release(text: str) -> tuple[int, ...]:
    """``"26.1"`` and ``"26.1.0"`` are the same release to pip."""
    parts = [int(part) for part in text.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def test_ci_tests_the_floor_and_the_locked_release_and_the_list_was_checked_on_both() -> None:
    floors = _floors()
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)$",
                           (REPO / ".ci" / "oldest-deps.txt").read_text(encoding="utf-8"), re.M))
    assert {name.lower() for name in pins} == {"mitmproxy", "pyopenssl", "cryptography"}
    for name, pinned in pins.items():
        assert _release(pinned) == _release(floors[name.lower()]), (
            f".ci/oldest-deps.txt pins {name}=={pinned}, pyproject.toml's floor is "
            f"{floors[name.lower()]}")
    lock = re.search(r"^mitmproxy==(\S+)", (REPO / "requirements.lock").read_text(
        encoding="utf-8"), re.M)
    assert lock is not None
    for release in (pins["mitmproxy"], lock.group(1)):
        assert release in mitm_private.CHECKED_ON, release
        assert all(release in entry.checked_on for entry in PRIVATE_NAMES), release


def test_every_patched_name_is_restored_after_each_test() -> None:
    restored = {f"{_qualified(owner)}.{name}" for owner, name in PATCHED}
    for entry in PRIVATE_NAMES:
        if entry.use == "patched":
            owner = mitm_private.resolve(PrivateName(entry.path.rsplit(".", 1)[0], "read",
                                                     "", "-", instance=False))
            assert f"{_qualified(owner)}.{entry.attribute}" in restored, (
                f"{entry.path} is patched but tests/support/mitm_patches.py does not restore it")


def _qualified(owner: object) -> str:
    if inspect.ismodule(owner):
        return owner.__name__
    return f"{owner.__module__}.{owner.__qualname__}"  # type: ignore[attr-defined]


# -- reading code: which mitmproxy names a module uses ------------------------------------------

def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to mitmproxy modules or objects, by their dotted mitmproxy path."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mitmproxy":
                    names[alias.asname or "mitmproxy"] = alias.name if alias.asname else "mitmproxy"
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] == "mitmproxy"):
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def mitmproxy_uses(tree: ast.AST) -> Iterator[tuple[str, int, bool]]:
    """``(dotted path, line, assigned)`` for each mitmproxy name the code names: imports, and
    attribute chains from an imported name (the whole chain, ``_http1.Http1Server.send``)."""
    aliases = _aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mitmproxy":
                    yield alias.name, node.lineno, False
        elif (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
              and node.module.split(".")[0] == "mitmproxy"):
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno, False
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute | ast.Name) or id(node) in inner:
            continue
        chain: list[str] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            chain.append(current.attr)
            current = current.value
        if isinstance(current, ast.Name) and current.id in aliases:
            path = ".".join([aliases[current.id], *reversed(chain)])
            yield path, node.lineno, isinstance(node.ctx, ast.Store | ast.Del)


def _other_imports(tree: ast.AST) -> set[str]:
    """Local names bound to modules and objects that are not mitmproxy's (``struct``, ``h11``)."""
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names
                         if a.name.split(".")[0] != "mitmproxy")
        elif isinstance(node, ast.ImportFrom) and not (
                node.level == 0 and node.module and node.module.split(".")[0] == "mitmproxy"):
            bound.update(a.asname or a.name for a in node.names)
    return bound


def attribute_names(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Every ``x.name`` and ``getattr(x, "name")``-style name the code reads or writes, except
    on a name imported from elsewhere than mitmproxy (``struct.pack``, ``mitm_compat.x``)."""
    elsewhere = _other_imports(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if not (isinstance(node.value, ast.Name) and node.value.id in elsewhere):
                yield node.attr, node.lineno
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            yield node.args[1].value, node.lineno


def defined_names(tree: ast.AST) -> set[str]:
    """Names the code defines itself: functions, classes, class attributes, ``self.x``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            names.update(arg.arg for arg in ast.walk(node) if isinstance(arg, ast.arg))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return names


@functools.cache
def _mitmproxy_attribute_names() -> frozenset[str]:
    """Every attribute name mitmproxy's own source defines (methods, fields, ``self.x``)."""
    names: set[str] = set()
    for file in Path(mitmproxy.__file__).parent.rglob("*.py"):
        if "test" in file.relative_to(Path(mitmproxy.__file__).parent).parts:
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        names.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)
    return frozenset(names)


@functools.cache
def _public_attribute_names() -> frozenset[str]:
    """Attribute names mitmproxy documents: the members of its documented modules' classes."""
    names: set[str] = set(CTX)
    for dotted in DOCUMENTED:
        module_name, _, member = dotted.rpartition(".")
        try:
            module = importlib.import_module(dotted)
            members = [getattr(module, n) for n in dir(module) if not n.startswith("_")]
        except ImportError:
            members = [getattr(importlib.import_module(module_name), member)]
        for obj in members:
            if not inspect.isclass(obj) or not obj.__module__.startswith("mitmproxy"):
                continue
            for klass in obj.__mro__:
                if not klass.__module__.startswith("mitmproxy"):
                    continue
                names.update(n for n in vars(klass) if not n.startswith("_"))
                names.update(inspect.get_annotations(klass))
                if is_dataclass(klass):
                    names.update(f.name for f in fields(klass))
                try:
                    source = inspect.getsource(klass)
                except (OSError, TypeError):
                    continue
                names.update(re.findall(r"\bself\.([a-z]\w*)\s*(?::[^=\n]*)?=[^=]", source))
    return frozenset(names)


@functools.cache
def _common_attribute_names() -> frozenset[str]:
    """What builtin and asyncio objects have: a name like ``get`` or ``writer`` is no clue."""
    names: set[str] = set()
    for kind in (dict, list, set, frozenset, tuple, bytes, bytearray, str, int, object, type,
                 asyncio.StreamReader, asyncio.StreamWriter, asyncio.Transport, asyncio.Task,
                 BaseException, h11.Connection, http.server.BaseHTTPRequestHandler):
        names.update(dir(kind))
    return frozenset(names)


def _modules(*folders: str) -> Iterator[Path]:
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py"))


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def _sidecar_names_outside_the_fence() -> set[str]:
    names: set[str] = set()
    for path in _modules("sidecar", "addons"):
        if path not in FENCE:
            names |= defined_names(_tree(path))
    return names


def _telltale_attributes() -> dict[str, str]:
    """The listed attribute names that can only mean mitmproxy's private one, by path.

    A listed name that mitmproxy documents elsewhere (``state``, ``conn``, ``flow``), that
    builtins have, or that the sidecar defines itself (``connections``) is no telltale; such a
    name is caught where it is imported or reached from an import instead."""
    ambiguous = (_public_attribute_names() | _common_attribute_names()
                 | _sidecar_names_outside_the_fence())
    # Classes and modules (``Event``, ``_http2``) are caught where they are imported.
    return {entry.attribute: entry.path for entry in PRIVATE_NAMES
            if entry.attribute not in ambiguous and entry.attribute[:1].islower()}


def private_uses_outside_the_fence(tree: ast.AST, telltales: dict[str, str]) -> list[str]:
    found = []
    for path, line, _ in mitmproxy_uses(tree):
        if is_private(path):
            found.append(f"line {line}: {path}")
    for name, line in attribute_names(tree):
        if name in telltales:
            found.append(f"line {line}: .{name} ({telltales[name]})")
    return found


# -- (a) nothing outside the fence touches a private name -----------------------------------

def test_no_code_outside_the_fence_uses_a_private_mitmproxy_name() -> None:
    telltales = _telltale_attributes()
    assert {"transports", "timeout_watchdog", "command_sources", "read_headers",
            "make_error_response", "get_connection", "state_wait_for_request_headers",
            "max_conns"} <= set(telltales), telltales
    problems = []
    for path in _modules("sidecar", "addons"):
        if path in FENCE:
            continue
        problems += [f"{path.relative_to(REPO)}: {use}"
                     for use in private_uses_outside_the_fence(_tree(path), telltales)]
    assert not problems, ("private mitmproxy names belong in sidecar/proxy/mitm_compat.py "
                          "(listed in sidecar/proxy/mitm_private.py):\n" + "\n".join(problems))


def test_the_outside_check_sees_each_way_of_reaching_a_private_name() -> None:
    telltales = _telltale_attributes()

    def flagged(source: str) -> list[str]:
        return private_uses_outside_the_fence(ast.parse(source), telltales)

    assert flagged("from mitmproxy.proxy.layers.http import _http1")
    assert flagged("from mitmproxy.proxy.layers import http\nhttp.HttpLayer.get_connection")
    assert flagged("import mitmproxy.proxy.server as s\ns.ConnectionHandler")
    assert flagged("from mitmproxy.addonmanager import AddonManager")
    assert flagged("from mitmproxy import http\nhttp.Request._private_thing")
    assert flagged("def f(handler):\n    return handler.transports")
    assert flagged("def f(handler):\n    return getattr(handler, 'timeout_watchdog')")
    assert not flagged("from mitmproxy import connection, ctx, http\n"
                       "from mitmproxy.addonmanager import Loader\n"
                       "from mitmproxy.proxy import server_hooks\n"
                       "def f(flow: http.HTTPFlow):\n"
                       "    return flow.server_conn.via, ctx.options.mode, flow.client_conn.id")


# -- (c) the fence lists every private name it uses -----------------------------------------

def test_the_fence_uses_only_private_names_the_list_names() -> None:
    listed = {entry.attribute for entry in PRIVATE_NAMES}
    patched = {entry.path for entry in PRIVATE_NAMES if entry.use in ("patched", "shadowed")}
    ignore = (_public_attribute_names() | _common_attribute_names())
    problems = []
    for path in sorted(FENCE):
        tree = _tree(path)
        where = path.relative_to(REPO)
        for dotted, line, assigned in mitmproxy_uses(tree):
            if assigned and dotted not in patched:
                problems.append(f"{where}:{line}: patches {dotted}, not listed as patched")
            elif is_private(dotted) and not covered(dotted):
                problems.append(f"{where}:{line}: {dotted}")
        own = defined_names(tree)
        for name, line in attribute_names(tree):
            if (name in _mitmproxy_attribute_names() and name not in ignore
                    and name not in own and name not in listed):
                problems.append(f"{where}:{line}: .{name} (mitmproxy's)")
    assert not problems, ("private mitmproxy names the fence uses but "
                          "sidecar/proxy/mitm_private.py does not list:\n" + "\n".join(problems))
