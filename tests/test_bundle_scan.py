"""The jumps of sidecar.fhir.bundle_scan on bodies built to trip them: every shape it is not sure
of answers ``None`` (the caller then tokenizes everything), and whatever it answers agrees
with the full scanner (tests/test_links_fast.py has the generated Bundles)."""

from __future__ import annotations

import pytest
from test_links_fast import APP, LINKS, UP, reference

from sidecar.fhir.bundle_scan import (
    contains,
    json_entries_end,
    json_top_level_link_urls,
    xml_entries_end,
)

U = UP.encode()
A = APP.encode()
LINK = b'{"relation":"next","url":"' + U + b'/p2"}'


@pytest.mark.parametrize("raw", [
    b'[{"resourceType":"Bundle","link":[' + LINK + b"]}]",          # an array at the top
    b'"a string with ' + U + b'"',                                   # not a container at all
    b'{"resourceType":"Bundle","link":[' + LINK + b"]]",             # ] closes the object
    b'{"resourceType":"Bundle","link":[' + LINK + b"]} {}",          # a second document
    b'{"resourceType":"Bundle","link":[' + LINK + b"}}",             # } closes the link list
    b'{"resourceType":"Bundle","link":[{"url":"' + U + b'/p2"]]}',  # ] closes a link
    b'{"resourceType":"Bundle","link":[' + LINK + LINK + b"]}",      # no comma between links
    b'{"resourceType":"Bundle","link":[{"url" "' + U + b'/p2"}]}',  # no colon
    b'{"resourceType":"Bundle","link":[' + LINK + b'],"entry":[{"resource":'
    b'{"resourceType":"Bundle","link":[' + LINK + b"]}}]}",         # a Bundle in the entries
])
def test_shapes_it_is_not_sure_of_fall_back_to_the_full_scan(raw: bytes) -> None:
    assert json_top_level_link_urls(raw) is None
    assert LINKS.body(raw, "application/fhir+json") == reference(raw, "json")


def test_an_empty_link_object_is_skipped_and_the_next_one_read() -> None:
    raw = b'{"resourceType":"Bundle","link":[{},' + LINK + b',{ }],"total":0}'
    spans = json_top_level_link_urls(raw)
    assert spans is not None and [raw[a:b] for a, b in spans] == [b'"' + U + b'/p2"']
    assert LINKS.body(raw, "application/fhir+json") == raw.replace(U, A)


def test_the_entry_list_must_end_the_body() -> None:
    head = b'{"resourceType":"Bundle","link":[' + LINK + b'],"entry":'
    start = len(head)
    assert json_entries_end(head + b'[{"a":1}]}', start) == start + 8
    assert json_entries_end(head + b'[{"a":1}],"total":1}', start) is None
    assert json_entries_end(head + b'[{"a":1}] ', start) is None  # no closing brace
    assert json_entries_end(head + b"[]}", start) == start + 1


XML_HEAD = (b'<Bundle xmlns="http://hl7.org/fhir"><link><relation value="next"/><url value="'
            + U + b'/p2"/></link><entry>')


@pytest.mark.parametrize("tail, end", [
    (b"<fullUrl value=\"x\"/></entry></Bundle>", len(b"<fullUrl value=\"x\"/>")),
    # "entry" after the last </entry>, in text and in an attribute: not a closing tag
    (b"</entry><note value=\"entry\"/></Bundle>", 0),
    (b"</entry><!-- entry --></Bundle>", 0),
    (b"</f:entry ></Bundle>", 0),  # a prefixed closing tag, blank before >
])
def test_the_last_closing_entry_tag_is_found(tail: bytes, end: int) -> None:
    raw = XML_HEAD + tail
    assert xml_entries_end(raw, len(XML_HEAD)) == len(XML_HEAD) + end


@pytest.mark.parametrize("tail", [
    b"<fullUrl value=\"x\"/></entry>",                 # cut before </Bundle>
    b"<fullUrl value=\"entry\"/></Bundle>",            # no </entry> at all, only the word
    b"<fullUrl value=\"x\"/></Bundle>",                # no entry after the first one
    b"<x/></entry><entry><Bundle/></entry></Bundle>",  # a Bundle in the entries
])
def test_xml_entries_it_is_not_sure_of_answer_none(tail: bytes) -> None:
    raw = XML_HEAD + tail
    assert xml_entries_end(raw, len(XML_HEAD)) is None
    assert LINKS.body(raw, "application/fhir+xml") == reference(raw, "xml")


def test_contains_finds_the_needle_through_its_rare_byte_on_large_ranges() -> None:
    needle = b'"Bundle"'
    plain = b"x" * 5000
    assert not contains(plain, needle, 0, len(plain))
    assert contains(plain + needle, needle, 0, len(plain) + len(needle))
    assert not contains(plain + needle, needle, 0, len(plain) + len(needle) - 1)  # range ends
    # The rare byte is common here: after its tries it searches the rest plainly.
    many = b"B" * 100 + plain
    assert not contains(many, needle, 0, len(many))
    assert contains(many + needle, needle, 0, len(many) + len(needle))
    assert contains(b"B" * 10 + needle + plain, needle, 0, 5018)
