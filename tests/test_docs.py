"""The documentation agrees with the code it describes, and the code points only at it.

Comments and docstrings point at files under docs/ (or nowhere), never at a document outside
the repository; wherever a text pairs an HTTP status with an error kind, the pair is the one
the sidecar answers with.
"""

from __future__ import annotations

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
