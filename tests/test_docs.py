"""The documentation agrees with the code it describes, and the code points only at it.

Comments and docstrings point at files under docs/ (or nowhere), never at a document outside
the repository; wherever a text pairs an HTTP status with an error kind, the pair is the one
the sidecar answers with.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

from sidecar.request.errors import ErrorKind

REPO = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", ".venv", ".venv-py312", "node_modules", "__pycache__", ".mypy_cache",
                ".ruff_cache", ".pytest_cache", "mutants"}


def repo_files(*suffixes: str) -> list[Path]:
    found = []
    for directory, subdirectories, files in os.walk(REPO):
        subdirectories[:] = [name for name in subdirectories
                             if name not in SKIPPED_DIRS and not name.endswith(".egg-info")]
        found += [Path(directory, name) for name in files if Path(name).suffix in suffixes]
    assert found, suffixes
    return found


def test_no_comment_points_at_a_document_outside_the_repository() -> None:
    outside = re.compile("design" + r"( §|\.md)")  # split, so that this line is no match
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in repo_files(".py", ".yaml", ".tpl", ".sh", ".txt", ".toml")
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if outside.search(line)]
    assert offenders == []


def test_every_status_named_with_an_error_kind_is_the_status_of_that_kind() -> None:
    kinds = "|".join(re.escape(kind.value) for kind in ErrorKind)
    # "503 token-unavailable", "`503` `token-unavailable`", "502 upstream-tls", ...
    pair = re.compile(rf"\b([1-5][0-9][0-9])`? `?({kinds})\b")
    seen = set()
    wrong = []
    for path in repo_files(".md", ".yaml", ".py", ".txt", ".json"):
        for status, kind in pair.findall(path.read_text(encoding="utf-8")):
            seen.add(kind)
            if int(status) != ErrorKind(kind).status:
                wrong.append(f"{path.relative_to(REPO)}: {status} {kind} "
                             f"(the sidecar answers {ErrorKind(kind).status})")
    assert wrong == []
    assert "token-unavailable" in seen  # the pattern still finds what it is meant to find


CODE_REFERENCE = re.compile(r"`((?:sidecar|tests|addons|bench)/[\w/.-]+\.py):([A-Za-z_][\w.]*)`")
PATH_REFERENCE = re.compile(r"`((?:sidecar|tests|addons|bench|helm|docs|\.ci)/[\w/.-]*[\w-])`")


def defined_names(path: Path) -> set[str]:
    """Module-level functions, classes and assignments, and ``Class.member`` for their members."""
    names: set[str] = set()

    def targets(node: ast.stmt) -> list[str]:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return [node.name]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        if isinstance(node, ast.Assign):
            return [t.id for t in node.targets if isinstance(t, ast.Name)]
        return []

    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names.update(targets(node))
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{member}" for child in node.body
                         for member in targets(child))
    return names


def test_every_code_location_named_in_the_architecture_exists() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    references = CODE_REFERENCE.findall(text)
    assert len(references) > 20, "the architecture names where things are"
    missing = [f"{file}:{name}" for file, name in references
               if not (REPO / file).is_file() or name not in defined_names(REPO / file)]
    paths = [path for path in PATH_REFERENCE.findall(text) if not (REPO / path).exists()]
    assert missing + paths == [], "docs/architecture.md names code that is not there"


def test_the_architecture_draws_the_request_path_and_answers_the_newcomer_questions() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    for question in ("where is a request routed?", "where is a token fetched and refreshed?",
                     "where is upstream TLS decided?", "where are error answers made?"):
        assert f"| {question} |" in text
    for heading in ("## The request path", "## Contract decisions", "## Dependency rules"):
        assert heading in text.splitlines()


DOCS = REPO / "docs"
MARKDOWN_LINK = re.compile(r"\[[^\]\n]+\]\(([^)\s]+)\)")
DOCS_POINTER = re.compile(r"\bdocs/([\w-]+\.md)(?:#([\w-]+))?")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    anchors, fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (match := re.match(r"#{1,6} (.+)", line)):
            text = match.group(1).strip().lower().replace("`", "")
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def test_every_link_between_the_documents_leads_somewhere() -> None:
    broken = []
    for source in markdown_files():
        for target in MARKDOWN_LINK.findall(source.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            path = (source.parent / file).resolve() if file else source
            if not path.exists():
                broken.append(f"{source.relative_to(REPO)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
                broken.append(f"{source.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_every_pointer_from_the_code_to_docs_leads_somewhere() -> None:
    broken = []
    ci_scripts = [path for path in (REPO / ".ci").iterdir() if path.is_file() and not path.suffix]
    assert {"run", "image-check", "release-check"} <= {path.name for path in ci_scripts}
    for path in repo_files(".py", ".yaml", ".tpl", ".sh", ".txt", ".service") + ci_scripts:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for file, anchor in DOCS_POINTER.findall(line):
                target = DOCS / file
                if not target.is_file() or (anchor and anchor not in heading_anchors(target)):
                    broken.append(f"{path.relative_to(REPO)}:{number}: docs/{file}#{anchor}")
    assert broken == []


def test_the_readme_documentation_table_lists_every_document() -> None:
    table = readme_section("Documentation")
    listed = set(re.findall(r"^\| \[([^\]]+)\]\(\1\) \|", table, re.M))
    pages = {f"docs/{path.name}" for path in DOCS.glob("*.md")} | {"CHANGELOG.md"}
    assert pages - listed == set(), "add them to the README's Documentation table"


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_test_command() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Two commands on a fresh machine"
    demo, tests = re.findall(r"```sh\n(.+)\n```", readme_section(headings[0][3:]))
    assert demo.endswith("fhir-sidecar demo") and "pip install ." in demo
    # .ci/run runs the README's test command step by step (with quieter flags).
    quiet = re.compile(r" --(?:quiet|no-audit|no-fund)\b")
    ci_steps = {quiet.sub("", line).strip()
                for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()}
    for step in tests.split("&&"):
        assert step.strip() in ci_steps, f"the README's step {step.strip()!r} is not in .ci/run"


def test_every_error_kind_is_in_the_readme_table_and_in_docs_errors() -> None:
    table = readme_section("Errors the sidecar makes")
    errors = (DOCS / "errors.md").read_text(encoding="utf-8")
    for kind in ErrorKind:
        assert f"| `{kind.value}` | {kind.status} |" in table, kind
        assert f"| `{kind.value}` | {kind.status} |" in errors, kind


def test_every_metric_the_sidecar_exports_is_documented() -> None:
    from support.promql import exported_names

    from sidecar.observe.metrics import SidecarMetrics

    documented = (DOCS / "metrics.md").read_text(encoding="utf-8")
    exported = exported_names(SidecarMetrics().registry)
    # A histogram is documented under its own name, not its _bucket, _count and _sum series.
    histograms = {family.name for family in SidecarMetrics().registry.collect()
                  if family.type == "histogram"}
    names = {name for name in exported
             if not any(name in (f"{h}_bucket", f"{h}_count", f"{h}_sum") for h in histograms)}
    assert "fhir_sidecar_request_duration_seconds" in names | histograms
    assert [name for name in sorted(names | histograms) if f"`{name}`" not in documented] == []


def config_keys() -> dict[str, str]:
    """Every key the config file accepts, by dotted path, e.g. ``oauth.*.tls.verify``."""
    import pydantic

    from sidecar.config.models import SidecarConfig

    keys: dict[str, str] = {}

    def models_in(annotation: object) -> list[type[pydantic.BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]

    def walk(model: type[pydantic.BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = field.alias or name
            keys[prefix + key] = key
            mapping = typing.get_origin(field.annotation) is dict or any(
                typing.get_origin(arg) is dict for arg in typing.get_args(field.annotation))
            for nested in models_in(field.annotation):
                walk(nested, f"{prefix}{key}.*." if mapping else f"{prefix}{key}.")

    walk(SidecarConfig, "")
    return keys


def test_every_config_key_is_documented_in_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    # Keys count as documented in code: YAML examples and `inline` spans.
    code = " ".join(re.findall(r"```.*?```|`[^`\n]+`", text, flags=re.S))
    keys = config_keys()
    assert {"connections.*.tls.verify", "oauth.*.client_auth", "limits.max_request_header_bytes"
            } <= keys.keys()
    missing = [path for path, key in sorted(keys.items())
               if not re.search(rf"\b{re.escape(key)}\b", code)]
    assert missing == []


def test_the_quick_start_config_is_valid(tmp_path: Path) -> None:
    quick_start = readme_section("Quick start")
    config = re.search(r"```yaml\n(.*?)```", quick_start, flags=re.S)
    assert config is not None
    (tmp_path / "sidecar.yaml").write_text(config.group(1), encoding="utf-8")
    # The quick start's own first shell line writes the password file.
    assert "secrets/fhir-password" in quick_start
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "fhir-password").write_text("the password", encoding="utf-8")
    check = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", "sidecar.yaml"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "secrets" / "fhir-password").unlink()
    missing = subprocess.run([sys.executable, "-m", "sidecar", "check", "-c", "sidecar.yaml"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "basic_auth.my-basic.password_file" in missing.stdout \
        + missing.stderr
