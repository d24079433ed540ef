"""The one redactor (sidecar.report.redaction): every form of every known secret goes, and a cap
holds.

The forms are computed here independently of the module, as an echoing server would produce
them, so a form the redactor forgets fails the test.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.report.redaction import GENERIC, MAX_SHOWN_CHARS, REDACTED, Redactor

CLIENT_ID = "svc:client"
# "+", "/", "%", "&", space and non-ASCII make every encoding differ from the raw text.
SECRET = "s3cr+t/&%20 päss=wörd?"


def b64_variants(data: bytes) -> set[str]:
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    return {std, std.rstrip("="), url, url.rstrip("=")}


def echoed_forms(identity: str, secret: str) -> set[str]:
    forms = {secret, quote(secret, safe=""), quote_plus(secret), quote_plus(secret, safe=""),
             json.dumps(secret)[1:-1]}
    for pair in (f"{identity}:{secret}",
                 f"{quote_plus(identity, safe='')}:{quote_plus(secret, safe='')}"):
        forms |= b64_variants(pair.encode())
    return forms


@pytest.mark.parametrize("form", sorted(echoed_forms(CLIENT_ID, SECRET)))
def test_every_form_of_a_known_pair_is_removed(form: str) -> None:
    redactor = Redactor(pairs=[(CLIENT_ID, SECRET)])
    shown = redactor.scrub(f"invalid_client: you sent <<{form}>> which is wrong")
    assert form not in shown
    assert REDACTED in shown
    assert shown.startswith("invalid_client: you sent <<")


def test_the_whole_echoed_request_is_scrubbed() -> None:
    redactor = Redactor(pairs=[(CLIENT_ID, SECRET)])
    header = "Basic " + base64.b64encode(
        f"{quote_plus(CLIENT_ID, safe='')}:{quote_plus(SECRET, safe='')}".encode()).decode()
    body = f"grant_type=client_credentials&client_id=svc&client_secret={quote_plus(SECRET)}"
    shown = redactor.scrub(f"Authorization: {header}\r\n\r\n{body}")
    for form in echoed_forms(CLIENT_ID, SECRET):
        assert form not in shown
    assert "\r" not in shown and "\n" not in shown
    assert "grant_type=client_credentials" in shown


def test_secret_with_odd_white_space_is_known_collapsed_too() -> None:
    secret = "two  spaces\tand\na newline"
    shown = Redactor([secret]).scrub(f"echo: {secret} end")
    assert shown == f"echo: {REDACTED} end"


def test_unknown_credentials_and_jwts_are_removed_anyway() -> None:
    jwt = "eyJhbGciOiJSUzM4NCJ9.eyJpc3MiOiJzdmMifQ.c2lnbmF0dXJlLXZhbHVl"
    text = (f"client_assertion={jwt} Authorization: Basic dXNlcjpwYXNzd29yZDE= "
            "Bearer abc.def-123 -----BEGIN PRIVATE KEY-----\nMIIEv\n-----END PRIVATE KEY-----")
    shown = GENERIC.scrub(text, limit=10_000)
    for leaked in (jwt, "dXNlcjpwYXNzd29yZDE=", "abc.def-123", "MIIEv"):
        assert leaked not in shown
    # Words that only name an auth scheme stay readable.
    assert GENERIC.scrub("Basic authentication failed") == "Basic authentication failed"


def test_length_is_capped_after_redacting() -> None:
    # The secret straddles the cap: cutting first would leave its first half behind.
    secret = "Z" * 40 + "q7"
    text = "x" * (MAX_SHOWN_CHARS - 20) + secret + "y" * 10_000
    shown = Redactor([secret]).scrub(text)
    assert len(shown) <= MAX_SHOWN_CHARS
    assert "ZZZZZ" not in shown


def test_one_letter_secret_does_not_eat_the_marker() -> None:
    assert Redactor(["e"]).scrub("e-mail sent") == f"{REDACTED}-mail s{REDACTED}nt"


def outside_markers(shown: str) -> list[str]:
    """The parts of a scrubbed text that came from the input: a secret such as ``[red`` or
    ``acted]`` is spelled by the marker itself, which shows nothing of the input."""
    return shown.split(REDACTED)


def test_a_secret_that_spells_part_of_the_marker_is_removed() -> None:
    for secret in ("[red", "acted]", "edac"):
        shown = Redactor([secret]).scrub(f"a {secret} b")
        assert shown == f"a {REDACTED} b"


@settings(max_examples=200, deadline=None)
@given(identity=st.text(min_size=1, max_size=20),
       secret=st.text(min_size=4, max_size=40).filter(lambda s: s.strip() == s and s.isprintable()),
       before=st.text(max_size=30), after=st.text(max_size=30))
@example(identity="a", secret="[red", before="", after="")  # seen failing the plain `in`
def test_any_secret_in_any_form_is_gone(identity: str, secret: str, before: str,
                                        after: str) -> None:
    redactor = Redactor(pairs=[(identity, secret)])
    for form in echoed_forms(identity, secret):
        shown = redactor.scrub(f"{before} {form} {after}", limit=100_000)
        assert REDACTED in shown
        for part in outside_markers(shown):
            assert form not in part


def test_a_credential_keeps_its_scheme_name_and_loses_its_value() -> None:
    assert GENERIC.scrub("Authorization: Bearer abcdefgh123") == \
        "Authorization: Bearer [redacted]"
    assert GENERIC.scrub("authorization: basic dXNlcjpwYXNz") == \
        "authorization: basic [redacted]"


def test_control_characters_become_single_spaces() -> None:
    assert GENERIC.scrub("a\x00b\x1bc\x7fd\u2028e") == "a b c d e"


def test_the_marker_is_the_documented_word() -> None:
    assert REDACTED == "[redacted]"
    assert Redactor(["hunter22"]).scrub("pw=hunter22") == "pw=[redacted]"


@pytest.mark.parametrize("secret", ['"päss\\wörd"', "<a\"b'&c>/ ü"])
@pytest.mark.parametrize("encode", [
    pytest.param(lambda s: json.dumps(s)[1:-1], id="json-ascii"),
    pytest.param(lambda s: json.dumps(s, ensure_ascii=False)[1:-1], id="json-unicode"),
    pytest.param(lambda s: html.escape(s), id="html-quoted"),
    pytest.param(lambda s: html.escape(s, quote=False), id="html-unquoted"),
    pytest.param(lambda s: quote(s), id="url-path"),
])
def test_each_escaped_form_goes_whole(secret: str, encode: Callable[[str], str]) -> None:
    # Exact output: a form cut short by one character would leave that character shown.
    form = encode(secret)
    assert Redactor([secret]).scrub(f"echo {form} end") == f"echo {REDACTED} end"


def test_the_percent_encoded_pair_form_of_client_secret_basic_goes_whole() -> None:
    # RFC 6749 §2.3.1 with quote(): "/" encoded too, a space as %20 (quote_plus makes "+").
    identity, secret = "svc/a b", "p/w d"
    for pair in (f"{quote(identity, safe='')}:{quote(secret, safe='')}",
                 f"{quote_plus(identity, safe='')}:{quote_plus(secret, safe='')}"):
        for form in b64_variants(pair.encode()):
            shown = Redactor(pairs=[(identity, secret)]).scrub(f"Basic: {form} end")
            assert shown == f"Basic: {REDACTED} end", pair


def test_only_base64_padding_is_optional() -> None:
    # b"abW" encodes to "YWJX" in both alphabets: a form without its last "X" is no form.
    assert base64.b64encode(b"abW") == base64.urlsafe_b64encode(b"abW") == b"YWJX"
    redactor = Redactor(["abW"])
    assert redactor.scrub("YWJX") == REDACTED
    assert redactor.scrub("YWJ.") == "YWJ."


def test_every_secret_and_every_pair_is_known() -> None:
    redactor = Redactor(secrets=["first-secret", None, "second-secret"],
                        pairs=[("id1", "third-secret"), ("id2", None), ("id3", "fourth-secret")])
    shown = redactor.scrub("first-secret second-secret third-secret fourth-secret",
                           limit=10_000)
    assert shown == " ".join([REDACTED] * 4)
    assert repr(Redactor()) == "Redactor(0 forms)"


def test_the_cap_counts_the_ellipsis_and_cuts_nothing_that_fits() -> None:
    assert GENERIC.scrub("x" * MAX_SHOWN_CHARS) == "x" * MAX_SHOWN_CHARS
    assert MAX_SHOWN_CHARS == 300
    cut = GENERIC.scrub("x" * (MAX_SHOWN_CHARS + 1))
    assert cut == "x" * (MAX_SHOWN_CHARS - 3) + "..."
    assert GENERIC.scrub("abcdef", limit=3) == "..."
    assert GENERIC.scrub("abcdef", limit=4) == "a..."
