"""Request paths, made safe before they are routed: dot-segments resolved, escapes refused.

A path like ``/fhir/../admin`` (or ``/%2e%2e/admin``, or ``/Patient/..%2f..%2fadmin``) must not
reach an upstream that resolves it to ``/admin`` while carrying the credentials of ``/fhir``.
So every path is resolved here with RFC 3986 ``remove_dot_segments`` (a percent-encoded dot,
either case, counts as a dot) and what the upstream receives is the resolved path:

- a dot-segment that climbs above ``/``, or above the connection's base path, is refused;
- a segment that only becomes a dot-segment on a second look -- behind an encoded slash or
  backslash, a raw backslash, a ``;`` parameter, or a second round of percent-decoding -- is
  refused too: some servers decode and split once more, and the sidecar cannot know which;
- so is a segment that other decoders read differently from RFC 3986: a ``%`` not followed by
  two hex digits (IIS decodes ``%u002e`` as ``.``), an overlong UTF-8 sequence (``%c0%ae`` is
  ``.`` to a lax decoder), a percent-encoded control byte (``%00`` ends the path in C), and a
  character that Unicode normalisation (NFKC) turns into ``.``, ``/``, a backslash, ``;`` or ``%``
  (the fullwidth dot ``%ef%bc%8e``);
- a target with a raw control byte (NUL, CR, ...) anywhere, query included, is refused;
- otherwise the query string is passed on byte for byte.

This module has no mitmproxy import: it works on the request target as text.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

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
_NEEDS_A_LOOK = re.compile(r"[.%\\;]|[^\x00-\x7f]")
# A '%' that does not start an RFC 3986 escape: ``%u002e`` (IIS), ``%zz``, a lone ``%``.
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# IIS's own escape, looked for again after each round of decoding (``%25u002e``).
_IIS_ESCAPE = re.compile(r"%u[0-9A-Fa-f]{4}")
# Percent-decoded control bytes: ``%00`` ends a string in C, ``%0d%0a`` splits lines.
_DECODED_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# Overlong UTF-8: a longer form of a code point than UTF-8 allows, which a lax decoder still
# decodes (``C0 AE`` is '.'). Never valid UTF-8, and not plausible Latin-1 either.
_OVERLONG_UTF8 = re.compile(rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f][\x80-\xbf]"
                            rb"|\xf0[\x80-\x8f][\x80-\xbf]{2}|[\xf8-\xfb][\x80-\xbf]{4}"
                            rb"|[\xfc\xfd][\x80-\xbf]{5}")
# What a character must not become under NFKC for a server that normalises before it splits.
_SEPARATING = frozenset("./\\;%")


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
    if segment.isascii() and "%" not in segment and "\\" not in segment and ";" not in segment:
        return  # the common case: nothing can hide in it
    if _MALFORMED_ESCAPE.search(segment):
        raise UnsafePath("a path segment has a '%' that does not start a %XX escape "
                         "(such as %u002e), which servers decode differently")
    seen = segment
    for _ in range(_DECODING_ROUNDS):
        for piece in _HIDDEN_BOUNDARY.split(seen):
            if _ENCODED_DOT.sub(".", piece) in _DOT_SEGMENTS:
                raise UnsafePath(_hidden_reason(segment))
        if _IIS_ESCAPE.search(seen):
            raise UnsafePath("a path segment hides a %u escape (such as %u002e) behind "
                             "repeated percent-encoding")
        # mitmproxy keeps raw bytes that are not UTF-8 as surrogates: these are those bytes.
        raw = unquote_to_bytes(seen.encode("utf-8", "surrogateescape"))
        _refuse_decoded_bytes(raw)
        decoded = raw.decode("utf-8", "surrogateescape")
        if decoded == seen:
            return
        seen = decoded


def _refuse_decoded_bytes(raw: bytes) -> None:
    if _DECODED_CONTROL.search(raw):
        raise UnsafePath("a path segment holds a percent-encoded control character "
                         "(such as %00)")
    if _OVERLONG_UTF8.search(raw):
        raise UnsafePath("a path segment holds an overlong UTF-8 sequence (such as %c0%ae), "
                         "which a lax decoder reads as '.' or '/'")
    if not raw.isascii():
        text = raw.decode("utf-8", "surrogateescape")
        if any(not c.isascii() and _SEPARATING.intersection(unicodedata.normalize("NFKC", c))
               for c in text):
            raise UnsafePath("a path segment holds a character that Unicode normalisation "
                             "turns into '.', '/', '\\', ';' or '%' (such as the fullwidth dot "
                             "%ef%bc%8e)")


def _hidden_reason(segment: str) -> str:
    lowered = segment.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in segment:
        return ("a path segment hides '..' or '.' behind an encoded slash or a backslash "
                "(%2F, %5C or \\)")
    if ";" in segment:
        return "a path segment hides '..' or '.' before a ';' parameter"
    return "a path segment hides '..' or '.' behind repeated percent-encoding"
