"""Request paths, made safe before they are routed: dot-segments resolved, escapes refused.

A path like ``/fhir/../admin`` (or ``/%2e%2e/admin``, or ``/Patient/..%2f..%2fadmin``) must not
reach an upstream that resolves it to ``/admin`` while carrying the credentials of ``/fhir``.
So every path is resolved here with RFC 3986 ``remove_dot_segments`` (a percent-encoded dot,
either case, counts as a dot) and what the upstream receives is the resolved path:

- a dot-segment that climbs above ``/``, or above the connection's base path, is refused;
- a segment that only becomes a dot-segment on a second look -- behind an encoded slash or
  backslash, a raw backslash, a ``;`` parameter, or a second round of percent-decoding -- is
  refused too: some servers decode and split once more, and the sidecar cannot know which;
- a target with a raw control byte (NUL, CR, ...) anywhere, query included, is refused;
- otherwise the query string is passed on byte for byte.

This module has no mitmproxy import: it works on the request target as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_DOT_SEGMENTS = frozenset({".", ".."})
_ENCODED_DOT = re.compile(r"%2e", re.IGNORECASE)
# Characters some servers treat as segment boundaries after decoding (``;`` starts a path
# parameter on Tomcat/Jetty: ``..;x`` is ``..`` there).
_HIDDEN_BOUNDARY = re.compile(r"[/\\;]")
# Percent-decoding rounds tried when looking for a hidden dot-segment (``%252e`` is ``%2e``
# after one round, ``.`` after two).
_DECODING_ROUNDS = 4
# Raw control bytes (and space) are never valid in a request target; C servers may stop
# reading at a NUL, others split at a CR.
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
# Without any of these a path has no dot-segment to resolve and nothing hidden in it.
_NEEDS_A_LOOK = re.compile(r"[.%\\;]")


class UnsafePath(ValueError):
    """The path cannot be forwarded; the message says why in plain words (no query)."""


@dataclass(frozen=True)
class ResolvedPath:
    """A request target with its dot-segments resolved.

    ``lowest_depth`` is how few segments were left on the way after a ``..`` removed one
    (``None`` when no ``..`` removed anything): with it, a caller can tell whether the path
    ever stepped out of a base path, even if it came back in afterwards.
    """

    path: str  # resolved; always starts with "/"
    query: str  # "" or "?..." exactly as received
    lowest_depth: int | None

    @property
    def target(self) -> str:
        return self.path + self.query

    def stays_under(self, base_path: str) -> bool:
        """Whether the path is ``base_path`` or below it, and never stepped out on the way."""
        base_segments = _segments(base_path) if base_path else []
        if self.lowest_depth is not None and self.lowest_depth < len(base_segments):
            return False
        if not base_path:
            return True
        return self.path == base_path or self.path.startswith(base_path + "/")


def resolve(target: str) -> ResolvedPath:
    """Resolve the dot-segments of an origin-form request target (``/path?query``).

    Raises :class:`UnsafePath` when a ``..`` climbs above ``/`` or a segment hides a
    dot-segment (see the module docstring).
    """
    if _CONTROL.search(target):
        raise UnsafePath("the request target contains a control character or a space")
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        raise UnsafePath("the request path must start with '/'")
    if not _NEEDS_A_LOOK.search(path):
        return ResolvedPath(path, sep + query, None)
    output: list[str] = []
    lowest: int | None = None
    segments = _segments(path)
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        dots = _ENCODED_DOT.sub(".", segment)
        if dots == ".":
            if last:
                output.append("")  # "/a/." is "/a/"
            continue
        if dots == "..":
            if not output:
                raise UnsafePath("the path climbs above '/' with '..'")
            output.pop()
            lowest = len(output) if lowest is None else min(lowest, len(output))
            if last:
                output.append("")  # "/a/b/.." is "/a/"
            continue
        _refuse_hidden_dot_segment(segment)
        output.append(segment)
    return ResolvedPath("/" + "/".join(output), sep + query, lowest)


def confine(target: str, base_path: str) -> str:
    """The resolved target, provided it stays under ``base_path`` all the way.

    ``base_path`` is a connection's base path ("" or "/a/b", no trailing slash).
    """
    resolved = resolve(target)
    if not resolved.stays_under(base_path):
        raise UnsafePath(f"the path leaves the connection's base path {base_path or '/'} "
                         "with '..'")
    return resolved.target


def _segments(path: str) -> list[str]:
    """``/a/b/`` -> ``["a", "b", ""]``; the path must start with "/"."""
    return path[1:].split("/")


def _refuse_hidden_dot_segment(segment: str) -> None:
    if "%" not in segment and "\\" not in segment and ";" not in segment:
        return  # the common case: nothing can hide in it
    seen = segment
    for _ in range(_DECODING_ROUNDS):
        for piece in _HIDDEN_BOUNDARY.split(seen):
            if _ENCODED_DOT.sub(".", piece) in _DOT_SEGMENTS:
                raise UnsafePath(_hidden_reason(segment))
        decoded = unquote(seen, errors="surrogateescape")
        if decoded == seen:
            return
        seen = decoded


def _hidden_reason(segment: str) -> str:
    lowered = segment.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in segment:
        return ("a path segment hides '..' or '.' behind an encoded slash or a backslash "
                "(%2F, %5C or \\)")
    if ";" in segment:
        return "a path segment hides '..' or '.' before a ';' parameter"
    return "a path segment hides '..' or '.' behind repeated percent-encoding"
