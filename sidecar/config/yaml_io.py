"""The config file's YAML: one library (ruamel.yaml) and one dialect (YAML 1.2), both ways.

What the dashboard writes must read back as the same values. With a YAML 1.1 reader and a
1.2 writer, a username ``no`` was written plain and read back as ``False``, and a client id
``12:30`` as the number 750. Here the reader and the writer share ruamel's 1.2 resolver, so the
writer quotes exactly the strings the reader would otherwise take for something else.

* :func:`load` reads a config text into plain dicts, lists and scalars (the safe constructor).
* :func:`round_trip` edits a config file keeping its comments, order and quoting;
  :func:`dump` writes the edited data back.
"""

from __future__ import annotations

import io
import re
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.representer import RoundTripRepresenter

__all__ = ["YAMLError", "dump", "error_position", "error_reason", "load", "round_trip"]

# Characters a YAML reader takes as line breaks inside a quoted scalar (folding them to a
# space) although the emitter writes them raw in single quotes; only double quotes escape them.
_LINE_BREAKS = frozenset("\x85\u2028\u2029")
_DUPLICATE_KEY = re.compile(r'found duplicate key "(.*?)" with value')


class _ConfigRepresenter(RoundTripRepresenter):
    def represent_str(self, data: str) -> Any:
        if _LINE_BREAKS.intersection(data):
            return self.represent_scalar("tag:yaml.org,2002:str", data, style='"')
        return super().represent_str(data)


_ConfigRepresenter.add_representer(str, _ConfigRepresenter.represent_str)


def load(text: str) -> Any:
    """Parse ``text`` (YAML 1.2); raise :class:`YAMLError` when it is not valid YAML."""
    return YAML(typ="safe", pure=True).load(text)


def round_trip() -> YAML:
    """A YAML 1.2 reader/writer that keeps comments, key order and quoting."""
    yaml = YAML()
    yaml.Representer = _ConfigRepresenter
    yaml.preserve_quotes = True
    yaml.width = 4096  # long values stay on one line
    return yaml


def dump(yaml: YAML, data: Any) -> str:
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def error_position(exc: YAMLError) -> str:
    mark = exc.problem_mark if isinstance(exc, MarkedYAMLError) else None
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def error_reason(exc: YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    if isinstance(exc, DuplicateKeyError):
        # ruamel's text quotes both values, which may be inline secrets.
        found = _DUPLICATE_KEY.search(str(problem or ""))
        return f"invalid YAML: duplicate key {found.group(1)!r}" if found else \
            "invalid YAML: duplicate key"
    return f"invalid YAML: {problem}" if problem else "invalid YAML"
