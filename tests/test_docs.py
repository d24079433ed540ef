"""The documentation agrees with the code it describes, and the code points only at it.

Comments and docstrings point at files under docs/ (or nowhere), never at a document outside
the repository; wherever a text pairs an HTTP status with an error kind, the pair is the one
the sidecar answers with.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from sidecar.errors import ErrorKind

REPO = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".git", ".venv", ".venv-py312", "node_modules", "__pycache__", ".mypy_cache",
                ".ruff_cache", ".pytest_cache"}


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
