"""Streaming link rewriting (sidecar.fhir.links_stream) against the full scanner on generated
Bundles cut into random chunks: URLs split across chunk boundaries, link after entry,
resourceType after link, XML namespaces and comments, and gzip/deflate/br coded bodies."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import zlib
from typing import Any

import brotli
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_links_fast import (
    APP,
    LINKS,
    SETTINGS,
    UP,
    JsonWriter,
    bundles,
    reference,
    xml_dump,
)

from sidecar.fhir.links_stream import HOLD_LIMIT, StreamingBody, StreamingLinks


def _in_chunks(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(raw)) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def _stream(raw: bytes, kind: str, cuts: list[int], coding: str = "") -> bytes:
    body = StreamingBody(LINKS, "json" if kind == "json" else "xml", coding)
    return b"".join([body.feed(chunk) for chunk in _in_chunks(raw, cuts)] + [body.finish()])


def _flat(bundle: dict[str, Any]) -> dict[str, Any]:
    """Without nested Bundles: a streamed body rewrites the top-level Bundle's links only."""
    for entry in bundle.get("entry", []):
        if entry["resource"]["resourceType"] == "Bundle":
            entry["resource"] = {"resourceType": "Patient", "id": "n"}
    return bundle


cuts = st.lists(st.integers(0, 4000), max_size=12)


@SETTINGS
@given(bundles(), st.integers(0, 2**32), cuts)
def test_streamed_json_equals_the_full_scan(bundle: dict[str, Any], seed: int,
                                            cut: list[int]) -> None:
    raw = JsonWriter(random.Random(seed)).dump(_flat(bundle)).encode()
    assert _stream(raw, "json", cut) == reference(raw, "json", host_check=False)


@SETTINGS
@given(bundles(), st.integers(0, 2**32), cuts, st.sampled_from(["", "f:"]))
def test_streamed_xml_equals_the_full_scan(bundle: dict[str, Any], seed: int, cut: list[int],
                                           prefix: str) -> None:
    raw = xml_dump(_flat(bundle), random.Random(seed), prefix).encode()
    assert _stream(raw, "xml", cut) == reference(raw, "xml", host_check=False)


@SETTINGS
@given(bundles(), st.integers(0, 2**32), cuts, st.sampled_from(["gzip", "deflate", "br"]))
def test_coded_streams_are_decoded_rewritten_and_reencoded(
        bundle: dict[str, Any], seed: int, cut: list[int], coding: str) -> None:
    raw = JsonWriter(random.Random(seed)).dump(_flat(bundle)).encode()
    coded = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[coding](raw)
    out = _stream(coded, "json", [c // 4 for c in cut], coding)
    decoded = {"gzip": gzip.decompress, "deflate": zlib.decompress,
               "br": brotli.decompress}[coding](out)
    assert decoded == reference(raw, "json", host_check=False)


def test_raw_deflate_is_understood_too() -> None:
    raw = json.dumps({"resourceType": "Bundle", "link": [{"url": f"{UP}/x"}]}).encode()
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    coded = packer.compress(raw) + packer.flush()
    out = zlib.decompress(_stream(coded, "json", [5], "deflate"))
    assert json.loads(out)["link"][0]["url"] == f"{APP}/x"


def test_a_broken_coding_passes_the_rest_as_received() -> None:
    body = StreamingBody(LINKS, "json", "gzip")
    junk = b"not gzip at all"
    assert body.feed(junk).endswith(junk)
    assert body.feed(b"more") == b"more"
    assert body.finish() == b""


def test_entries_pass_through_untokenized_once_the_links_are_done() -> None:
    stream = StreamingLinks(LINKS, "json")
    head = (b'{"resourceType":"Bundle","link":[{"relation":"next","url":"' + UP.encode()
            + b'/p2"}],"entry":[')
    out = stream.feed(head)
    assert stream.passing
    assert out == head.replace(UP.encode(), APP.encode())
    garbage = b"{{{ not json, not tokenized }"
    assert stream.feed(garbage) is garbage


def test_a_url_split_anywhere_is_rewritten() -> None:
    raw = (b'{"resourceType":"Bundle","link":[{"url":"' + UP.encode()
           + b'/Patient?page=2"}],"entry":[]}')
    expected = raw.replace(UP.encode(), APP.encode())
    for cut in range(1, len(raw)):
        assert _stream(raw, "json", [cut]) == expected, cut
    xml = (b'<Bundle xmlns="http://hl7.org/fhir"><link><url value="' + UP.encode()
           + b'/p"/></link><entry/></Bundle>')
    for cut in range(1, len(xml)):
        assert _stream(xml, "xml", [cut]) == xml.replace(UP.encode(), APP.encode()), cut


def test_resource_type_too_far_behind_the_links_leaves_the_body_alone() -> None:
    head = b'{"link":[{"url":"' + UP.encode() + b'/x"}],"filler":"'
    stream = StreamingLinks(LINKS, "json")
    out = stream.feed(head)
    assert out == b'{"link":[{"url":'  # held back from the undecided URL on
    out += stream.feed(b"a" * (HOLD_LIMIT + 10))
    assert stream.passing
    out += stream.feed(b'","resourceType":"Bundle"}') + stream.finish()
    assert out == head + b"a" * (HOLD_LIMIT + 10) + b'","resourceType":"Bundle"}'


def test_other_resources_stream_unchanged() -> None:
    raw = json.dumps({"resourceType": "Patient", "link": [{"url": f"{UP}/x"}]}).encode()
    assert _stream(raw, "json", [3, 30]) == raw
    xml = f'<Patient><link><url value="{UP}/x"/></link></Patient>'.encode()
    assert _stream(xml, "xml", [7]) == xml


def test_a_stream_step_with_nothing_to_send_yet_sends_no_chunk() -> None:
    """An empty chunk would end a chunked body early: the adapter returns none instead."""
    from typing import cast

    from sidecar.proxy.flow_state import FlowState, byte_counter

    state = FlowState(snapshot=cast(Any, None), connection=None, request_id="r")
    stream = StreamingLinks(LINKS, "json")
    step = byte_counter(state, "bytes_out", stream.feed)
    head = b'{"resourceType":"Bundle","link":[{"url":'
    assert step(head) == head
    assert step(b'"https://fhir.exa') == []  # the URL is not complete yet
    assert step(b'mple.com/r4/x"}],') == b'"' + APP.encode() + b'/x"}],'
    assert state.bytes_out == len(head) + len(APP) + 7


# -- hostile and cut-off bodies: each passes unchanged once it is not a Bundle's head ----------

U = UP.encode()
A = APP.encode()


@pytest.mark.parametrize("raw", [
    b'"just a string"',                    # not an object
    b"12345",                              # a number, not an object
    b"[1, 2]",                             # an array at the top
    b',{"resourceType":"Bundle"}',         # a comma before anything
    b'{{"resourceType":"Bundle"}}',        # an object where a key belongs
    b'{["resourceType"]}',                 # an array where a key belongs
    b'{"resourceType":"Bundle"]',          # a closer of the wrong kind
    b'{"resourceType"::"Bundle"}',         # two colons
    b'{"resourceType":"Bundle", "link":[{"url":"' + U + b'/x"}',  # cut off: no closers
    b'{"resourceType":"Bundle","note":"cut',                        # cut inside a string
])
@pytest.mark.parametrize("cut", [1, 7, 1000])
def test_malformed_json_before_the_links_passes_unchanged(raw: bytes, cut: int) -> None:
    out = _stream(raw, "json", [cut])
    if b'"url":"' in raw:  # the link itself was complete: rewritten, the rest kept as it is
        assert out == raw.replace(U, A)
    else:
        assert out == raw


def test_a_number_cut_by_the_chunk_boundary_is_read_whole() -> None:
    stream = StreamingLinks(LINKS, "json")
    out = stream.feed(b'{"resourceType":"Bundle","tag":["a","b"],"total":12')
    assert not stream.passing
    out += stream.feed(b'34,"link":[{"url":"' + U + b'/p"}],"entry":[')
    assert stream.passing
    assert out + stream.finish() == (b'{"resourceType":"Bundle","tag":["a","b"],"total":1234,'
                                     b'"link":[{"url":"'
                                     + A + b'/p"}],"entry":[')


def test_a_bundle_cut_off_before_its_end_keeps_its_rewritten_links() -> None:
    head = b'{"resourceType":"Bundle","link":[{"url":"' + U + b'/p"}],"type":"search'
    stream = StreamingLinks(LINKS, "json")
    out = stream.feed(head)
    assert not stream.passing
    assert out + stream.finish() == head.replace(U, A)


def test_links_held_for_resource_type_wait_behind_rewritten_file_urls() -> None:
    """A manifest with a stray ``link`` before its file lists: the link URL waits for a
    resourceType that never comes (and then goes out unchanged), the file URLs behind it are
    rewritten as soon as the manifest is recognised but sent only after the held link."""
    link = b'{"link":[{"url":"' + U + b'/l"}],'
    files = b'"output":[{"type":"Patient","url":"' + U + b'/f.ndjson"}],'
    members = b'"transactionTime":"2026-01-01T00:00:00Z","request":"' + U + b'/$export"'
    stream = StreamingLinks(LINKS, "json")
    out = stream.feed(link + files + members)
    assert out == b'{"link":[{"url":'  # held from the undecided link URL on
    errors = b',"error":[{"url":"' + U + b'/e.ndjson"}]}'  # recognised: rewritten at once
    out += stream.feed(errors) + stream.finish()
    expected = link + files.replace(U, A) + members + errors.replace(U, A)
    assert out == expected
    assert LINKS.body(link + files + members + errors, "application/json") == expected


def test_file_urls_of_a_bundle_are_not_file_urls() -> None:
    """File URLs held for the manifest members go out unchanged once resourceType says
    Bundle; the Bundle's held link URLs (behind them) are rewritten."""
    raw = (b'{"output":[{"url":"' + U + b'/f"}],"link":[{"url":"' + U + b'/l"}],'
           b'"resourceType":"Bundle"}')
    for cut in (5, 30, 60, len(raw)):
        assert _stream(raw, "json", [cut]) == (b'{"output":[{"url":"' + U + b'/f"}],'
                                               b'"link":[{"url":"' + A + b'/l"}],'
                                               b'"resourceType":"Bundle"}'), cut


@pytest.mark.parametrize("raw", [
    b'<Bundle xmlns="http://hl7.org/fhir"></link></Bundle>',  # a closer of the wrong kind
    b'<Bundle xmlns="http://hl7.org/fhir"><type value="searchset"/><lin',  # cut in a tag
    b'<Bundle xmlns="http://hl7.org/fhir"><link><url valu',
    b'<Bundle xmlns="http://hl7.org/fhir"><link>< url value="' + U + b'/x"/></link></Bundle>',
])
@pytest.mark.parametrize("cut", [3, 40, 1000])
def test_malformed_xml_passes_unchanged(raw: bytes, cut: int) -> None:
    assert _stream(raw, "xml", [cut]) == raw


def test_an_xml_url_without_a_value_is_left_as_it_is() -> None:
    raw = (b'<Bundle xmlns="http://hl7.org/fhir"><link><url/></link><link><url id="a">'
           b'</url></link><link><url value="' + U + b'/p"/></link><entry/></Bundle>')
    assert _stream(raw, "xml", [20, 60]) == raw.replace(U, A)


def test_a_deflate_body_fed_one_byte_first_is_understood() -> None:
    raw = json.dumps({"resourceType": "Bundle", "link": [{"url": f"{UP}/x"}]}).encode()
    coded = zlib.compress(raw)
    body = StreamingBody(LINKS, "json", "deflate")
    out = body.feed(coded[:1])  # one byte cannot tell zlib-wrapped from raw deflate
    out += body.feed(coded[1:]) + body.finish()
    assert json.loads(zlib.decompress(out))["link"][0]["url"] == f"{APP}/x"


def test_only_streamable_codings_are_accepted() -> None:
    with pytest.raises(ValueError, match="compress"):
        StreamingBody(LINKS, "json", "compress")
