"""Header bytes that split or smuggle requests (sidecar/request/headers.py), without a proxy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.proxy.flow_state import request_id_from
from sidecar.request.headers import (
    connection_options,
    header_problem,
    hop_by_hop_fields,
    persistence_option,
)

OK = [(b"Host", b"localhost"), (b"Accept", b"application/fhir+json"),
      (b"X-Tab", b"a\tb"), (b"X-Latin", "café".encode()), (b"X-Empty", b"")]


def test_ordinary_headers_pass() -> None:
    assert header_problem(OK) is None


@pytest.mark.parametrize(("value", "words"), [
    (b"a\rAuthorization: Bearer APP", "carriage return (CR)"),
    (b"a\nContent-Length: 0", "line feed (LF)"),
    (b"a\x00b", "NUL"),
    (b"a\x0bb", "control character 0x0b"),
    (b"a\x7fb", "control character 0x7f"),
    (b"first\r\n second", "obs-fold"),
    (b"first\r\n\tsecond", "obs-fold"),
])
def test_control_characters_and_folds_are_refused(value: bytes, words: str) -> None:
    problem = header_problem([*OK, (b"X-N", value)])
    assert problem is not None and words in problem and "X-N" in problem
    assert "Bearer" not in problem and "APP" not in problem  # the value is never quoted


@pytest.mark.parametrize("name", [b"X N", b"X-N ", b"", b"X:N", b"X\rN", b"X\x00", b"(X)",
                                  "Ü".encode(), b"X " * 100])
def test_names_that_are_not_tokens_are_refused(name: bytes) -> None:
    problem = header_problem([(name, b"v")])
    assert problem is not None and "not a valid HTTP token" in problem
    assert "\r" not in problem and "\x00" not in problem and len(problem) < 160


_TCHAR = st.sampled_from(list("!#$%&'*+-.^_`|~0123456789abcXYZ"))
_NAME = st.lists(_TCHAR, min_size=1, max_size=20).map("".join).map(str.encode)
_VISIBLE = st.binary(max_size=30).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7f))


@settings(max_examples=300, deadline=None)
@given(_NAME, _VISIBLE, st.integers(0, 30), st.sampled_from([0, 0x0A, 0x0D, 0x01, 0x1F, 0x7F]))
def test_any_control_character_anywhere_is_refused(name: bytes, value: bytes, at: int,
                                                   control: int) -> None:
    assert header_problem([(name, value)]) is None
    at = min(at, len(value))
    hostile = value[:at] + bytes([control]) + value[at:]
    assert header_problem([(name, hostile)]) is not None


@pytest.mark.parametrize(("given_id", "kept"), [
    ("abc-1", True),
    ("x" * 128, True),
    ("!~" * 64, True),
    ("x" * 129, False),
    ("", False),
    ("has space", False),
    ("tab\there", False),
    ("caf\u00e9", False),
    ("a\x7f", False),
    (None, False),
])
def test_request_id_is_kept_only_when_short_and_visible_ascii(given_id: str | None,
                                                              kept: bool) -> None:
    result = request_id_from(given_id)
    assert (result == given_id) is kept
    assert 1 <= len(result) <= 128 and all(0x21 <= ord(c) <= 0x7E for c in result)


# -- exact words (each kills a mutant of .ci/mutate, docs/testing.md) ----------------------------

def test_a_fold_is_refused_in_exact_words() -> None:
    assert header_problem([(b"X-N", b"first\r\n second")]) == (
        "the header X-N is folded over several lines (obs-fold), "
        "which HTTP/1.1 no longer allows")


@pytest.mark.parametrize(("name", "shown"), [
    (b"(" * 40, "'" + "(" * 40 + "'"),  # exactly at the limit: whole, no ellipsis
    (b"(" * 41, "'" + "(" * 40 + "...'"),  # one over: cut, with an ellipsis
    (b"X\rN", "'X\\x0dN'"),
])
def test_a_bad_name_is_quoted_cut_at_40_characters(name: bytes, shown: str) -> None:
    assert header_problem([(name, b"v")]) == f"the header name {shown} is not a valid HTTP token"


# -- hop-by-hop fields (issue 26 §4, RFC 9110 §7.6.1) ------------------------------------------

def test_connection_options_are_split_trimmed_and_lower_case() -> None:
    assert connection_options(["close, X-Hop", " Keep-Alive ,,TE"]) == {
        "close", "x-hop", "keep-alive", "te"}
    assert connection_options([]) == frozenset()


def test_what_connection_names_is_dropped_but_never_framing_or_host() -> None:
    dropped = hop_by_hop_fields(connection_options(
        ["X-Hop, Content-Length, Transfer-Encoding, Host, Cookie"]))
    assert {"x-hop", "cookie", "connection", "keep-alive", "proxy-connection", "te",
            "trailer", "upgrade", "http2-settings"} <= dropped
    assert not {"content-length", "transfer-encoding", "host"} & dropped


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
@pytest.mark.parametrize("values", [[], ["close"], ["keep-alive"], ["Keep-Alive, X-Hop"],
                                    ["X-Hop"], ["close, keep-alive"], ["upgrade"], [""]])
def test_the_sidecars_own_option_keeps_the_persistence_mitmproxy_decides(
        version: str, values: list[str]) -> None:
    # mitmproxy decides from the request headers whether the app's connection (and the
    # upstream's) stays open; the forwarded Connection must lead it to the same decision as
    # the app's own did -- read case-insensitively, as RFC 9110 says (mitmproxy compares
    # case-sensitively, so an HTTP/1.0 "Keep-Alive" used to close the connection).
    from mitmproxy.http import Headers
    from mitmproxy.net.http.http1 import connection_close

    original = Headers([(b"Connection", v.lower().encode()) for v in values])
    option = persistence_option(version, connection_options(values))
    rewritten = Headers([(b"Connection", option.encode())] if option else [])
    assert connection_close(version, rewritten) == connection_close(version, original)
    assert option in (None, "close", "keep-alive")
