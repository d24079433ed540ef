"""The dependency rules (docs/architecture.md#dependency-rules), checked so that they hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sidecar"


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_only_the_proxy_adapter_imports_mitmproxy() -> None:
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "proxy" not in p.relative_to(PACKAGE).parts
                 and any(m == "mitmproxy" or m.startswith("mitmproxy.")
                         for m in imported_modules(p))]
    assert offenders == []


def test_nothing_imports_the_addon_but_entry_points() -> None:
    entry_points = {"runner.py", "proxy/master.py"}
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if str(p.relative_to(PACKAGE)) not in entry_points
                 and p.name != "addon.py"
                 and "sidecar.proxy.addon" in imported_modules(p)]
    assert offenders == []


def test_the_token_request_imports_without_authlibs_deprecated_httpx_integration() -> None:
    # docs/architecture.md, "authlib and httpx": its import warns that httpx is deprecated.
    probe = ("import sys, sidecar.credentials.token_endpoint, sidecar.credentials.oauth\n"
             "assert 'authlib.integrations.httpx_client' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-W", "error", "-c", probe], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_basic_only_sidecar_does_not_load_the_oauth_client_stack(tmp_path: Path) -> None:
    # httpx and authlib cost ~7 MiB of RSS at ready and ~0.1 s of start-up; only OAuth
    # definitions (and the 401 retry of a bearer token) need them.
    config = tmp_path / "sidecar.yaml"
    config.write_text("basic_auth:\n  b: {username: u, password_file: pw}\n"
                      "connections:\n  c: {url: 'https://fhir.example.org/fhir',"
                      " listen: '127.0.0.1:0', auth: {basic: b}}\n")
    (tmp_path / "pw").write_text("secret\n")
    probe = (
        "import sys\n"
        "from pathlib import Path\n"
        "import sidecar.cli, sidecar.runner\n"
        "from sidecar.runtime.live import LiveConfig\n"
        "LiveConfig(Path(sys.argv[1]))\n"
        "print(sorted(m for m in ('httpx', 'authlib', 'sidecar.credentials.oauth')"
        " if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _module_name(package_root: Path, path: Path) -> str:
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(tree: ast.AST) -> set[str]:
    """Every module an import statement names, at any depth, except under TYPE_CHECKING
    (those never run). ``from a import b`` names ``a`` and, if it is a module, ``a.b``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def import_cycles(package_root: Path) -> list[list[str]]:
    """The groups of a package's modules that import each other in a circle (Tarjan's
    strongly connected components of the import graph); lazy imports inside functions count."""
    modules = {_module_name(package_root, p): p for p in package_root.rglob("*.py")}
    graph = {name: sorted(m for m in _runtime_imports(ast.parse(path.read_text("utf-8")))
                          if m in modules and m != name)
             for name, path in modules.items()}
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = lowest[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                lowest[node] = min(lowest[node], lowest[target])
            elif target in stack:
                lowest[node] = min(lowest[node], index[target])
        if lowest[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_no_sidecar_modules_import_each_other_in_a_circle() -> None:
    assert import_cycles(PACKAGE) == []


def test_the_cycle_check_finds_a_lazy_import_cycle(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import B\n")
    (package / "b.py").write_text("def f():\n    from pkg import c\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\nimport pkg.a\n"
                                  "if TYPE_CHECKING:\n    from pkg.d import D\n")
    (package / "d.py").write_text("import pkg.c\n")
    assert import_cycles(package) == [["pkg.a", "pkg.b", "pkg.c"]]


# The rooms of sidecar/, lowest first (docs/architecture.md#the-rooms-of-the-package): a room
# imports only from rooms of lower layers, never sideways or up. The entry points (cli, runner,
# __main__) sit on top of everything.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"config", "testkit"}),
    frozenset({"report", "tls", "request"}),
    frozenset({"egress", "fhir", "tracing"}),
    frozenset({"credentials", "callers"}),
    frozenset({"runtime"}),
    frozenset({"audit", "observe"}),
    frozenset({"check"}),
    frozenset({"proxy", "admin", "demo"}),
)
ENTRY_POINTS = frozenset({"cli", "runner", "__main__"})


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "sidecar" and len(parts) > 1 else None


def room_imports(package_root: Path) -> dict[str, set[str]]:
    """Which rooms each room imports (TYPE_CHECKING imports count too: they are arrows)."""
    found: dict[str, set[str]] = {}
    for path in package_root.rglob("*.py"):
        source = _room(_module_name(package_root, path))
        if source is None:
            continue
        targets = {_room(m) for m in imported_modules(path)}
        found.setdefault(source, set()).update(
            t for t in targets if t is not None and t != source
            and ((package_root / t).is_dir() or (package_root / f"{t}.py").exists()))
    return found


def upward_imports(package_root: Path) -> list[str]:
    layer_of = {room: index for index, rooms in enumerate(LAYERS) for room in rooms}
    top = len(LAYERS)
    problems = []
    for source, targets in sorted(room_imports(package_root).items()):
        if source in ENTRY_POINTS:
            continue
        if source not in layer_of:
            problems.append(f"sidecar/{source}: a room (or loose module) with no layer")
            continue
        for target in sorted(targets):
            if layer_of.get(target, top) >= layer_of[source]:
                problems.append(f"sidecar/{source} imports sidecar/{target}")
    return problems


def test_the_package_root_holds_only_the_entry_points() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")} - ENTRY_POINTS - {"__init__"}
    assert loose == set()
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set().union(*LAYERS)


def test_every_import_between_rooms_points_down() -> None:
    assert upward_imports(PACKAGE) == []


def test_the_layer_check_finds_an_upward_and_a_sideways_import(tmp_path: Path) -> None:
    package = tmp_path / "sidecar"
    for room in ("config", "report", "tls", "proxy"):
        (package / room).mkdir(parents=True)
        (package / room / "__init__.py").write_text("")
    (package / "config" / "models.py").write_text("from sidecar.report.logs import x\n")
    (package / "report" / "logs.py").write_text("from sidecar.tls import policy\n")
    (package / "proxy" / "addon.py").write_text("from sidecar.config import models\n")
    assert upward_imports(package) == ["sidecar/config imports sidecar/report",
                                       "sidecar/report imports sidecar/tls"]
