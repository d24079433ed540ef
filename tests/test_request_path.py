"""Dot-segments and hidden separators in request paths (sidecar/request/path.py), without a proxy.

The property tests compare with an independent model: RFC 3986 §5.2.4 ``remove_dot_segments``
written out as the RFC states it (string buffers, not segment lists), and a model upstream that
decodes the path and splits it again, as a permissive server would.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.request.path import ResolvedPath, UnsafePath, confine, resolve


def rfc3986_remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, step by step, on an input whose dot-segments are literal dots."""
    source, output = path, ""
    while source:
        if source.startswith("../"):
            source = source[3:]
        elif source.startswith("./"):
            source = source[2:]
        elif source.startswith("/./"):
            source = "/" + source[3:]
        elif source == "/.":
            source = "/"
        elif source.startswith("/../"):
            source = "/" + source[4:]
            output = output[:output.rfind("/")] if "/" in output else ""
        elif source == "/..":
            source = "/"
            output = output[:output.rfind("/")] if "/" in output else ""
        elif source in (".", ".."):
            source = ""
        else:
            start = 1 if source.startswith("/") else 0
            end = source.find("/", start)
            end = len(source) if end == -1 else end
            output += source[:end]
            source = source[end:]
    return output


def climbs_above_root(path: str) -> bool:
    depth = 0
    for segment in path[1:].split("/"):
        if segment == "..":
            if depth == 0:
                return True
            depth -= 1
        elif segment != ".":
            depth += 1
    return False


def upstream_view(path: str) -> list[str]:
    """How a permissive upstream could see a path: fully decoded, split at / \\ and ;,
    dot-segments resolved (clamped at the root, as servers do)."""
    decoded = path
    for _ in range(4):
        decoded = unquote(decoded)
    stack: list[str] = []
    for piece in re.split(r"[/\\]", decoded)[1:]:
        piece = piece.split(";", 1)[0]
        if piece == "..":
            if stack:
                stack.pop()
        elif piece != ".":
            stack.append(piece)
    return stack


# -- examples ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "expected"), [
    ("/fhir/Patient", "/fhir/Patient"),
    ("/fhir/Patient/", "/fhir/Patient/"),
    ("/", "/"),
    ("/fhir/./Patient", "/fhir/Patient"),
    ("/fhir/x/../Patient", "/fhir/Patient"),
    ("/fhir/x/%2e%2E/Patient", "/fhir/Patient"),
    ("/fhir/x/.%2e/Patient", "/fhir/Patient"),
    ("/fhir/%2E/Patient", "/fhir/Patient"),
    ("/fhir/Patient/..", "/fhir/"),
    ("/fhir/Patient/.", "/fhir/Patient/"),
    ("/fhir//Patient", "/fhir//Patient"),
    ("/fhir/Patient/1.2.3", "/fhir/Patient/1.2.3"),
    ("/fhir/Patient/...", "/fhir/Patient/..."),
    ("/fhir/Patient/a%2Fb", "/fhir/Patient/a%2Fb"),  # no dot-segment behind the slash
    ("/fhir/Patient;v=1", "/fhir/Patient;v=1"),
])
def test_dot_segments_are_resolved(target: str, expected: str) -> None:
    assert resolve(target).path == expected


@pytest.mark.parametrize("query", ["", "?", "?name=../../admin", "?a=%2e%2e%2f&b=/../x#f",
                                   "?q=%ZZ\\;"])
def test_the_query_string_is_passed_on_untouched(query: str) -> None:
    assert resolve("/fhir/x/../Patient" + query).target == "/fhir/Patient" + query
    assert confine("/fhir/Patient" + query, "/fhir") == "/fhir/Patient" + query


@pytest.mark.parametrize("target", [
    "/..", "/../admin", "/%2e%2e/admin", "/%2E%2E/admin", "/.%2E/admin", "/a/../../admin",
    "/./../admin",
])
def test_climbing_above_the_root_is_refused(target: str) -> None:
    with pytest.raises(UnsafePath, match="above '/'"):
        resolve(target)


@pytest.mark.parametrize("target", [
    "/fhir/Patient/..%2f..%2fadmin",
    "/fhir/Patient/..%2F..%2Fadmin",
    "/fhir/Patient/%2e%2e%2fadmin",
    "/fhir/Patient/..%5cadmin",
    "/fhir/Patient/..%5Cadmin",
    "/fhir/Patient/..\\admin",
    "/fhir/Patient/x\\..\\..\\admin",
    "/fhir/Patient/%252e%252e",
    "/fhir/Patient/%25252e%25252e%25252fadmin",
    "/fhir/Patient/..;/admin",
    "/fhir/Patient/.%2e;x",
])
def test_segments_that_hide_a_dot_segment_are_refused(target: str) -> None:
    with pytest.raises(UnsafePath, match="hides"):
        resolve(target)


@pytest.mark.parametrize(("target", "base"), [
    ("/fhir/../admin", "/fhir"),
    ("/fhir/%2e%2e/admin", "/fhir"),
    ("/fhir/../fhir/Patient", "/fhir"),  # steps out and back in: refused all the same
    ("/api/FHIR/R4/../../other", "/api/FHIR/R4"),
    ("/other/../skip/Patient", "/skip"),
    ("/fhir-other/Patient", "/fhir"),
])
def test_leaving_the_base_path_is_refused(target: str, base: str) -> None:
    with pytest.raises(UnsafePath, match="leaves the connection's base path"):
        confine(target, base)


@pytest.mark.parametrize(("target", "base", "expected"), [
    ("/fhir/Patient/x/../y", "/fhir", "/fhir/Patient/y"),
    ("/fhir/x/..", "/fhir", "/fhir/"),
    ("/fhir", "/fhir", "/fhir"),
    ("/fhir/.", "/fhir", "/fhir/"),
    ("/x/../Patient", "", "/Patient"),
])
def test_dot_segments_below_the_base_path_are_fine(target: str, base: str, expected: str
                                                   ) -> None:
    assert confine(target, base) == expected


@pytest.mark.parametrize("target", ["/fhir/Patient\x00", "/fhir/Pa\rtient", "/fhir/x?q=\x01",
                                    "/fhir/x?q=a\nb", "/fhir/\x7f", "/fhir/a b"])
def test_raw_control_bytes_anywhere_in_the_target_are_refused(target: str) -> None:
    with pytest.raises(UnsafePath, match="control character"):
        resolve(target)


def test_a_target_must_be_an_absolute_path() -> None:
    with pytest.raises(UnsafePath, match="must start with '/'"):
        resolve("*")
    with pytest.raises(UnsafePath):
        resolve("fhir/Patient")


def test_resolved_path_records_the_lowest_depth() -> None:
    assert resolve("/a/b/../../c") == ResolvedPath("/c", "", 0)
    assert resolve("/a/b/c") == ResolvedPath("/a/b/c", "", None)


# -- properties ----------------------------------------------------------------------------------

# Segments built from the characters that matter (dots, percent escapes of dots, slashes and
# backslashes, ';') and ordinary ones.
_PIECES = st.sampled_from([".", "..", "%2e", "%2E", "%2f", "%5c", "\\", ";", "%25", "a", "Patient",
                           "1", "-", "%41", "%"])
_SEGMENT = st.lists(_PIECES, min_size=0, max_size=4).map("".join)
_PATH = st.lists(_SEGMENT, min_size=1, max_size=8).map(lambda s: "/" + "/".join(s))
_BASE = st.sampled_from(["", "/fhir", "/api/FHIR/R4"])
_QUERY = st.sampled_from(["", "?x=../..", "?%2e%2e=%2f"])


@settings(max_examples=600, deadline=None)
@given(_PATH, _QUERY)
def test_resolution_matches_rfc3986(path: str, query: str) -> None:
    literal = _decode_dot_segments(path)
    try:
        resolved = resolve(path + query)
    except UnsafePath:
        return
    assert not climbs_above_root(literal)
    # Dot-segments written with %2e resolve as if written with dots.
    expected = rfc3986_remove_dot_segments(_decode_dot_segments(path))
    assert _decode_dot_segments(resolved.path) == _decode_dot_segments(expected)
    assert resolved.query == query


def _decode_dot_segments(path: str) -> str:
    return "/".join(
        re.sub(r"(?i)%2e", ".", s) if re.sub(r"(?i)%2e", ".", s) in (".", "..") else s
        for s in path.split("/"))


@settings(max_examples=600, deadline=None)
@given(_PATH, _BASE, _QUERY)
def test_what_is_forwarded_never_leaves_the_base_path(path: str, base: str, query: str
                                                      ) -> None:
    """Whatever an upstream makes of a forwarded path, it stays under the base path."""
    try:
        forwarded = confine(base + path + query, base)
    except UnsafePath:
        return
    assert forwarded.endswith(query)
    forwarded_path = forwarded[: len(forwarded) - len(query)] if query else forwarded
    seen = upstream_view(forwarded_path)
    base_segments = base.split("/")[1:] if base else []
    assert seen[: len(base_segments)] == base_segments, (forwarded_path, seen)
    # and nothing the upstream could resolve is left in it
    assert ".." not in upstream_view_unclamped(forwarded_path)


def upstream_view_unclamped(path: str) -> list[str]:
    decoded = path
    for _ in range(4):
        decoded = unquote(decoded)
    return [piece.split(";", 1)[0] for piece in re.split(r"[/\\]", decoded)[1:]]


@settings(max_examples=300, deadline=None)
@given(_PATH)
def test_a_path_without_dots_or_escapes_is_forwarded_unchanged(path: str) -> None:
    if any(c in path for c in ".%\\;"):
        return
    assert resolve(path).path == path


# -- exact words and corner cases (each kills a mutant of .ci/mutate, docs/testing.md) -----------

@pytest.mark.parametrize(("target", "base", "words"), [
    ("/fhir/a b", None, "the request target contains a control character or a space"),
    ("fhir/Patient", None, "the request path must start with '/'"),
    ("/fhir/../..", None, "the path climbs above '/' with '..'"),
    ("/fhir/../admin", "/fhir", "the path leaves the connection's base path /fhir with '..'"),
    ("/fhir/Patient/..%2fadmin", None, "a path segment hides '..' or '.' behind an encoded "
                                       "slash or a backslash (%2F, %5C or \\)"),
    ("/fhir/Patient/..%2Fadmin", None, "a path segment hides '..' or '.' behind an encoded "
                                       "slash or a backslash (%2F, %5C or \\)"),
    ("/fhir/Patient/..%5cadmin", None, "a path segment hides '..' or '.' behind an encoded "
                                       "slash or a backslash (%2F, %5C or \\)"),
    ("/fhir/Patient/..%5Cadmin", None, "a path segment hides '..' or '.' behind an encoded "
                                       "slash or a backslash (%2F, %5C or \\)"),
    ("/fhir/Patient/x\\..", None, "a path segment hides '..' or '.' behind an encoded "
                                  "slash or a backslash (%2F, %5C or \\)"),
    ("/fhir/Patient/..;x", None, "a path segment hides '..' or '.' before a ';' parameter"),
    ("/fhir/Patient/%252e%252e", None, "a path segment hides '..' or '.' behind repeated "
                                       "percent-encoding"),
])
def test_each_refusal_says_why_in_its_own_words(target: str, base: str | None,
                                                words: str) -> None:
    # These words are the body of the app's 400 (docs/errors.md): the app learns what to fix.
    with pytest.raises(UnsafePath) as refused:
        resolve(target) if base is None else confine(target, base)
    assert str(refused.value) == words


def test_stepping_out_of_the_base_path_is_remembered_past_a_later_shallower_dot_dot() -> None:
    # The lowest point is kept over every '..', not just the last one: here the last '..'
    # leaves one segment, but the first left none -- the path was outside /fhir on the way.
    assert resolve("/fhir/../fhir/Patient/..").lowest_depth == 0
    with pytest.raises(UnsafePath, match="leaves the connection's base path /fhir"):
        confine("/fhir/../fhir/Patient/..", "/fhir")


def test_a_dot_segment_that_appears_only_after_the_fourth_decoding_is_refused() -> None:
    # %2525252e is %2e after three rounds of percent-decoding; the fourth look must still
    # recognise the encoded dots, before the ';' parameter that some servers strip.
    with pytest.raises(UnsafePath, match="hides"):
        resolve("/fhir/Patient/%2525252e%2525252e;x")


@pytest.mark.parametrize("target", ["/fhir/Patient/caf%E9", "/fhir/Patient/caf%E9;v=1",
                                    "/fhir/Patient/%FF%FE%2e"])
def test_escapes_that_are_not_utf8_are_forwarded_as_sent(target: str) -> None:
    # Latin-1 escapes are not UTF-8; the look for hidden dots must not choke on them.
    assert resolve(target).path == target


# -- issue 26 §4: escapes other decoders read differently ----------------------------------------

_MALFORMED = "a path segment has a '%' that does not start a %XX escape (such as %u002e), " \
             "which servers decode differently"
_CONTROL_ESCAPE = "a path segment holds a percent-encoded control character (such as %00)"
_OVERLONG = "a path segment holds an overlong UTF-8 sequence (such as %c0%ae), which a lax " \
            "decoder reads as '.' or '/'"
_NORMALISED = "a path segment holds a character that Unicode normalisation turns into '.', " \
              "'/', '\\', ';' or '%' (such as the fullwidth dot %ef%bc%8e)"


@pytest.mark.parametrize(("target", "words"), [
    ("/fhir/Patient/%u002e%u002e/admin", _MALFORMED),  # IIS: ".."
    ("/fhir/Patient/%U002E", _MALFORMED),
    ("/fhir/Patient/a%zz", _MALFORMED),
    ("/fhir/Patient/a%", _MALFORMED),
    ("/fhir/Patient/a%2", _MALFORMED),
    ("/fhir/Patient/%25u002e%25u002e", "a path segment hides a %u escape (such as %u002e) "
                                       "behind repeated percent-encoding"),
    ("/fhir/Patient/a%00b", _CONTROL_ESCAPE),
    ("/fhir/Patient/a%0d%0aX-Injected:%20y", _CONTROL_ESCAPE),
    ("/fhir/Patient/a%7f", _CONTROL_ESCAPE),
    ("/fhir/Patient/a%2500", _CONTROL_ESCAPE),  # a NUL after a second decoding
    ("/fhir/Patient/%c0%ae%c0%ae/admin", _OVERLONG),
    ("/fhir/Patient/%C0%AE", _OVERLONG),
    ("/fhir/Patient/%c0%af", _OVERLONG),  # '/'
    ("/fhir/Patient/%e0%80%ae", _OVERLONG),
    ("/fhir/Patient/%f0%80%80%ae", _OVERLONG),
    ("/fhir/Patient/%25c0%25ae", _OVERLONG),
    ("/fhir/Patient/\udcc0\udcae", _OVERLONG),  # raw bytes C0 AE, as mitmproxy hands them on
    ("/fhir/Patient/%ef%bc%8e%ef%bc%8e/admin", _NORMALISED),  # fullwidth full stop, twice
    ("/fhir/Patient/\uff0e\uff0e/admin", _NORMALISED),  # the same, sent as raw UTF-8
    ("/fhir/Patient/%e2%80%a5", _NORMALISED),  # two dot leader: ".." under NFKC
    ("/fhir/Patient/a%ef%bc%8fb", _NORMALISED),  # fullwidth solidus
    ("/fhir/Patient/a%ef%bc%bcb", _NORMALISED),  # fullwidth reverse solidus
    ("/fhir/Patient/a%ef%bc%85b", _NORMALISED),  # fullwidth percent sign
])
def test_escapes_that_other_decoders_read_as_separators_are_refused(target: str,
                                                                    words: str) -> None:
    with pytest.raises(UnsafePath) as refused:
        resolve(target)
    assert str(refused.value) == words


@pytest.mark.parametrize("target", ["/fhir/Patient/caf%C3%A9", "/fhir/Patient/caf\u00e9",
                                    "/fhir/Patient/%E6%82%A3%E8%80%85", "/fhir/Patient/a%20b",
                                    "/fhir/Patient/a%2Fb", "/fhir/Patient/100%25"])
def test_ordinary_escapes_and_utf8_are_forwarded_as_sent(target: str) -> None:
    assert resolve(target).path == target


def test_the_query_may_hold_what_the_path_may_not() -> None:
    # The query is the app's business and passed on byte for byte (only raw controls refused).
    resolved = resolve("/fhir/Patient?name=%u002e%c0%ae%00%ef%bc%8e")
    assert resolved.query == "?name=%u002e%c0%ae%00%ef%bc%8e"
