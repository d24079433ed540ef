"""Link rewriting (sidecar.fhir.links): exact base prefixes only, byte-exact everywhere else."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from sidecar.fhir.links import LinkRewriter, app_base_url, body_kind
from sidecar.request.routing import Upstream
from sidecar.testkit.fhir_resources import PatientStore, searchset, to_xml

UP = "https://fhir.example.com/r4"
APP = "http://127.0.0.1:8081"


@pytest.fixture
def links() -> LinkRewriter:
    return LinkRewriter(UP, APP)


# -- single URLs and headers -----------------------------------------------------------------

@pytest.mark.parametrize(("given", "expected"), [
    (UP, APP),
    (f"{UP}/Patient/1/_history/2", f"{APP}/Patient/1/_history/2"),
    (f"{UP}?_getpages=abc", f"{APP}?_getpages=abc"),
    (f"{UP}#frag", f"{APP}#frag"),
    ("HTTPS://FHIR.Example.COM/r4/Patient", f"{APP}/Patient"),  # scheme and host: any case
    ("https://fhir.example.com:443/r4/Patient", f"{APP}/Patient"),  # default port spelled out
])
def test_urls_under_the_base_are_rewritten(links: LinkRewriter, given: str,
                                           expected: str) -> None:
    assert links.url(given) == expected


@pytest.mark.parametrize("given", [
    "https://fhir.example.com/r4-other/Patient",   # shares characters only, no boundary
    "https://fhir.example.com/r40",
    "https://fhir.example.com/R4/Patient",         # paths are case-sensitive
    "https://fhir.example.com:8443/r4/Patient",    # another port is another server
    "http://fhir.example.com/r4/Patient",          # another scheme too
    "https://fhir.example.com.evil.test/r4/Patient",
    "https://other.example.com/r4/Patient",
    "Patient/1/_history/1",                        # relative: already relative to the app
    "",
])
def test_other_urls_are_left_alone(links: LinkRewriter, given: str) -> None:
    assert links.url(given) is given


def test_header_keeps_surrounding_blanks(links: LinkRewriter) -> None:
    assert links.header(f"  {UP}/Patient/1 ") == f"  {APP}/Patient/1 "
    assert links.header("Patient/1") == "Patient/1"


def test_base_without_path_and_with_explicit_port() -> None:
    links = LinkRewriter("https://h.example:8443", "http://localhost:9000")
    assert links.url("https://h.example:8443/Patient") == "http://localhost:9000/Patient"
    assert links.url("https://h.example:8443") == "http://localhost:9000"
    assert links.url("https://h.example:84430/Patient") == "https://h.example:84430/Patient"
    assert links.url("https://h.example/Patient") == "https://h.example/Patient"


def test_between_is_none_when_the_app_uses_the_upstream_base() -> None:
    upstream = Upstream.from_url("http://fhir.example.com/r4")
    assert LinkRewriter.between(upstream, "http://fhir.example.com/r4/") is None
    assert LinkRewriter.between(upstream, APP) == LinkRewriter("http://fhir.example.com/r4", APP)


def test_app_base_url() -> None:
    assert app_base_url("http", "127.0.0.1:8081") == "http://127.0.0.1:8081"
    assert app_base_url("http", "fhir.example.com", "/r4") == "http://fhir.example.com/r4"


def test_body_kind() -> None:
    assert body_kind("application/fhir+json; charset=utf-8") == "json"
    assert body_kind("application/json+fhir") == "json"
    assert body_kind("application/json") == "json"
    assert body_kind("application/fhir+xml") == "xml"
    assert body_kind("text/xml") == "xml"
    assert body_kind("application/octet-stream", b"{}") is None
    assert body_kind(None, b"  {") == "json"
    assert body_kind(None, b"<Bundle/>") == "xml"
    assert body_kind(None, b"hello") is None


# -- JSON bodies -------------------------------------------------------------------------------

# Odd but valid formatting everywhere, to prove nothing outside the link URLs is re-serialised.
JSON_BUNDLE = f"""{{
  "resourceType" : "Bundle",   "type":"searchset","total": 1.50E1,
  "link": [
    {{"relation": "self", "url": "{UP}/Patient?name=M\\u00fcller&_count=2"}},
    {{"url":"{UP}/Patient?_count=2&_offset=2" , "relation":"next"}},
    {{"relation": "alternate", "url": "{UP}-other/Patient"}},
    {{"relation": "previous", "url": "https:\\/\\/fhir.example.com\\/r4\\/Patient?p=1"}}
  ],
  "entry": [ {{
      "fullUrl": "{UP}/Patient/1",
      "resource": {{"resourceType": "Patient", "id": "1",
        "link": [{{"other": {{"reference": "Patient/2"}}, "type": "seealso",
                   "url": "{UP}/Patient/2"}}],
        "text": {{"div": "<div>{UP}/Patient/1</div>"}} }},
      "link": [{{"relation": "x", "url": "{UP}/entry-link"}}]
  }} ],
  "meta": {{"source": "{UP}"}}
}}
""".encode()


def test_json_bundle_links_rewritten_and_nothing_else(links: LinkRewriter) -> None:
    out = links.body(JSON_BUNDLE, "application/fhir+json")
    expected = (JSON_BUNDLE
                .replace(f'"{UP}/Patient?name='.encode(), f'"{APP}/Patient?name='.encode())
                .replace(f'"{UP}/Patient?_count=2&_offset=2"'.encode(),
                         f'"{APP}/Patient?_count=2&_offset=2"'.encode())
                .replace(b'"https:\\/\\/fhir.example.com\\/r4\\/Patient?p=1"',
                         f'"{APP}/Patient?p=1"'.encode()))
    assert out == expected
    parsed = json.loads(out)
    assert [link["url"] for link in parsed["link"]] == [
        f"{APP}/Patient?name=Müller&_count=2", f"{APP}/Patient?_count=2&_offset=2",
        f"{UP}-other/Patient", f"{APP}/Patient?p=1"]
    entry = parsed["entry"][0]
    assert entry["fullUrl"] == f"{UP}/Patient/1"  # identity, never rewritten
    assert entry["resource"]["link"][0]["url"] == f"{UP}/Patient/2"  # not a Bundle's link
    assert entry["link"][0]["url"] == f"{UP}/entry-link"  # entry.link is not Bundle.link
    assert parsed["meta"]["source"] == UP


def test_json_resource_type_after_link_and_nested_bundles(links: LinkRewriter) -> None:
    inner = {"link": [{"relation": "next", "url": f"{UP}/Observation?page=2"}],
             "resourceType": "Bundle", "type": "searchset"}
    outer = {"resourceType": "Bundle", "type": "batch-response",
             "entry": [{"resource": inner, "response": {"status": "200"}}]}
    raw = json.dumps(outer).encode()
    out = json.loads(links.body(raw, "application/fhir+json"))
    assert out["entry"][0]["resource"]["link"][0]["url"] == f"{APP}/Observation?page=2"


def test_json_other_resources_are_untouched(links: LinkRewriter) -> None:
    raw = json.dumps({"resourceType": "Patient", "id": "1",
                      "link": [{"url": f"{UP}/Patient/2"}]}).encode()
    assert links.body(raw, "application/fhir+json") is raw


@pytest.mark.parametrize("raw", [
    b'{"resourceType":"Bundle","link":[{"url":"' + UP.encode() + b'/x"}]',   # truncated
    b'{"resourceType":"Bundle","link":[{"url":"' + UP.encode() + b'/x"}]}}',  # extra brace
    b'{"resourceType":"Bundle","link":[{"url":"' + UP.encode() + b'/x"]}]}',  # mismatched
    b'{"resourceType":"Bundle","link":[{"url" "' + UP.encode() + b'/x"}]} {}',
])
def test_json_that_is_not_well_formed_is_left_alone(links: LinkRewriter, raw: bytes) -> None:
    assert links.body(raw, "application/fhir+json") is raw


def test_body_without_the_upstream_host_is_the_same_object(links: LinkRewriter) -> None:
    raw = b'{"resourceType":"Bundle","link":[{"url":"https://elsewhere/x"}]}'
    assert links.body(raw, "application/fhir+json") is raw
    assert links.body(b"", "application/fhir+json") == b""


def test_non_fhir_media_types_are_left_alone(links: LinkRewriter) -> None:
    raw = json.dumps({"resourceType": "Bundle", "link": [{"url": f"{UP}/x"}]}).encode()
    assert links.body(raw, "application/octet-stream") is raw
    assert links.body(raw, "text/html") is raw


def test_demo_searchset_round_trip(links: LinkRewriter) -> None:
    patients = PatientStore().search_by_name(None)
    bundle = searchset(UP, patients, total=3, self_url=f"{UP}/Patient?_count=3",
                       next_url=f"{UP}/Patient?_count=3&_offset=3")
    raw = json.dumps(bundle, separators=(",", ":")).encode()
    out = links.body(raw, "application/fhir+json")
    assert len(out) == len(raw) + 2 * (len(APP) - len(UP))
    assert json.loads(out)["entry"] == bundle["entry"]


# -- XML bodies --------------------------------------------------------------------------------

XML_BUNDLE = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- a comment with <link><url value="{UP}/comment"/></link> -->
<Bundle xmlns="http://hl7.org/fhir">
  <type value="searchset"/>
  <link>
    <relation value="self"/>
    <url value="{UP}/Patient?name=x&amp;_count=2"/>
  </link>
  <link><relation value='next'/><url   value='{UP}/Patient?_offset=2' /></link>
  <link><relation value="other"/><url value="{UP}-other/Patient"/></link>
  <entry>
    <fullUrl value="{UP}/Patient/1"/>
    <link><relation value="x"/><url value="{UP}/entry-link"/></link>
    <resource>
      <Patient>
        <id value="1"/>
        <text><div xmlns="http://www.w3.org/1999/xhtml"><p>a &gt; b &lt; c</p>
          <a href="{UP}/Patient/1">{UP}/Patient/1</a></div></text>
        <link><other><reference value="Patient/2"/></other><type value="seealso"/></link>
      </Patient>
    </resource>
  </entry>
  <entry><resource><Bundle><link><url value="{UP}/nested?p=2"/></link></Bundle></resource></entry>
  <entry><resource><f:Bundle xmlns:f="http://hl7.org/fhir">
    <f:link><f:url value="{UP}/p"/></f:link></f:Bundle></resource></entry>
</Bundle>
""".encode()


def test_xml_bundle_links_rewritten_and_nothing_else(links: LinkRewriter) -> None:
    out = links.body(XML_BUNDLE, "application/fhir+xml;charset=UTF-8")
    expected = XML_BUNDLE
    for tail in ("/Patient?name=x&amp;_count=2\"", "/Patient?_offset=2'", "/nested?p=2\"",
                 "/p\""):
        expected = expected.replace(f"{UP}{tail}".encode(), f"{APP}{tail}".encode())
    assert out == expected
    for kept in ("-other/Patient", "/Patient/1\"", "/entry-link", "/comment",
                 "/Patient/1\">"):
        assert f"{UP}{kept}".encode() in out


def test_xml_with_escaped_prefix_is_reescaped_only_there() -> None:
    links = LinkRewriter("https://h.example/a&b", APP)
    raw = b'<Bundle><link><url value="https://h.example/a&amp;b/Patient?x=1&amp;y=2"/></link></Bundle>'
    assert links.body(raw, "application/fhir+xml") == (
        f'<Bundle><link><url value="{APP}/Patient?x=1&amp;y=2"/></link></Bundle>'.encode())


@pytest.mark.parametrize("spelled", [
    "https:&#47;&#47;fhir.example.com&#x2F;r4",       # character references, decimal and hex
    "&#104;ttps://fhir.example.com/r4",
    "https://fhir.example.com&#x2f;r4",
])
def test_xml_link_spelled_with_character_references_is_rewritten(
        links: LinkRewriter, spelled: str) -> None:
    # An XML parser (the app's) reads these as the upstream's URL: left alone, the app would
    # follow the next page around the sidecar.
    raw = f'<Bundle><link><url value="{spelled}/Patient?page=2"/></link></Bundle>'.encode()
    assert links.body(raw, "application/fhir+xml") == (
        f'<Bundle><link><url value="{APP}/Patient?page=2"/></link></Bundle>'.encode())


@pytest.mark.parametrize("reference", ["&#0;", "&#xD800;", "&#1114112;", "&#x110000;"])
def test_xml_reference_to_a_forbidden_character_is_left_alone(
        links: LinkRewriter, reference: str) -> None:
    # Not well-formed XML: the value is left as it is, like any body the sidecar is unsure of.
    raw = (f'<Bundle><link><url value="https:&#47;&#47;fhir.example.com/r4/{reference}"/>'
           '</link></Bundle>').encode()
    assert links.body(raw, "application/fhir+xml") == raw


@pytest.mark.parametrize("raw", [
    f'<Bundle><link><url value="{UP}/x"/></link>'.encode(),                # unclosed
    f'<Bundle><link><url value="{UP}/x"/></Bundle></link>'.encode(),       # crossed
    f'<Bundle><link><url value="{UP}/x"/></link></Bundle>< oops'.encode(),  # stray <
])
def test_xml_that_is_not_well_formed_is_left_alone(links: LinkRewriter, raw: bytes) -> None:
    assert links.body(raw, "application/fhir+xml") is raw


def test_demo_xml_searchset(links: LinkRewriter) -> None:
    patients = PatientStore().search_by_name(None)
    bundle = searchset(UP, patients, total=3, self_url=f"{UP}/Patient?_count=3&_format=xml",
                       next_url=None)
    raw = to_xml(bundle)
    out = links.body(raw, "application/fhir+xml")
    assert out == raw.replace(f'<url value="{UP}/'.encode(), f'<url value="{APP}/'.encode())
    assert out.count(f'<fullUrl value="{UP}/Patient/'.encode()) == 3


# -- the proxy adapter's use of it -------------------------------------------------------------

def _adapter_state(links: LinkRewriter) -> Any:
    from sidecar.proxy.flow_state import FlowState

    return FlowState(snapshot=cast(Any, None), connection=None, request_id="r", links=links)


def test_adapter_rewrites_a_compressed_body_and_headers(links: LinkRewriter) -> None:
    from mitmproxy import http

    from sidecar.proxy.response_links import rewrite_links

    body = json.dumps({"resourceType": "Bundle", "link": [{"url": f"{UP}/Patient?p=2"}]})
    response = http.Response.make(200, b"", {"Content-Type": "application/fhir+json",
                                             "Content-Encoding": "gzip",
                                             "Location": f"{UP}/Patient/1"})
    response.content = body.encode()  # gzip-encodes, as the upstream sent it
    assert response.raw_content != body.encode()
    rewrite_links(response, _adapter_state(links))
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Location"] == f"{APP}/Patient/1"
    assert json.loads(response.get_content() or b"")["link"][0]["url"] == f"{APP}/Patient?p=2"
    assert response.headers["Content-Length"] == str(len(response.raw_content or b""))


def test_adapter_leaves_streamed_bodies_alone(links: LinkRewriter) -> None:
    from mitmproxy import http

    from sidecar.proxy.response_links import rewrite_links

    raw = json.dumps({"resourceType": "Bundle", "link": [{"url": f"{UP}/x"}]}).encode()
    response = http.Response.make(200, raw, {"Content-Type": "application/fhir+json",
                                             "Content-Location": f"{UP}/x"})
    response.stream = True
    rewrite_links(response, _adapter_state(links))
    assert response.raw_content is raw
    assert response.headers["Content-Location"] == f"{APP}/x"


# -- the full scanner on hostile bodies: anything inconsistent is left alone ------------------

_U = UP.encode()


@pytest.mark.parametrize("raw", [
    b'"' + _U + b'/x"',                                           # a string, not an object
    b"123 " + _U,                                                 # a bare literal
    b',{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"}]}',   # a comma first
    b'{{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"}]}}',  # an object as a key
    b'{["link"]:[{"url":"' + _U + b'/x"}],"resourceType":"Bundle"}',  # an array as a key
    b'{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"}}]}',   # } closes an array
    b'{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"]}]}',   # ] closes an object
    b'{"resourceType":"Bundle","link":[{"url"::"' + _U + b'/x"}]}',   # two colons
    b'{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"}]}{}',  # two documents
    b'{"resourceType":"Bundle","link":[[{"url":"' + _U + b'/x"}]]}',  # a list in the list
    b'{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"}]',     # cut off
])
def test_json_that_is_not_one_consistent_document_is_left_alone(links: LinkRewriter,
                                                                 raw: bytes) -> None:
    from sidecar.fhir.links import _json_bundle_link_urls

    assert _json_bundle_link_urls(raw) == []
    assert links.body(raw, "application/fhir+json") is raw


def test_json_keys_and_urls_with_broken_escapes_are_not_rewritten(links: LinkRewriter) -> None:
    # A key that does not decode is no key the scanner knows; a URL token that does not
    # decode is not rewritten, though written with escapes its neighbour is.
    escaped = UP.replace("/", "\\/")
    raw = ('{"resourceType":"Bundle","\\q":1,"link":[{"url":"' + escaped + '/a\\q"},'
           '{"url":"' + escaped + '/b"}]}').encode()
    assert links.body(raw, "application/fhir+json") == raw.replace(
        (escaped + "/b").encode(), f"{APP}/b".encode())


def test_xml_urls_without_a_value_or_outside_the_base_are_left_alone(links: LinkRewriter
                                                                     ) -> None:
    ns = b'<Bundle xmlns="http://hl7.org/fhir">'
    raw = (ns + b'<link><url/></link><link><url id="u"></url></link>'
           b'<link><url value="https://other.example/r4?a=1&amp;b=2"/></link>'
           b'<link><url value="https://other.example/r4?a=1&amp;b=\xff"/></link>'
           b'<link><url value="' + _U + b'/p?a=1&amp;b=\xff"/></link>'
           b"</Bundle>")
    # Only the value under the base changes, and only its prefix: the bytes after it
    # (an escaped ampersand, a byte that is not UTF-8) stay as they were.
    assert links.body(raw, "application/fhir+xml") == raw.replace(_U + b"/p",
                                                                  APP.encode() + b"/p")
    no_links = ns + b'<type value="' + _U + b'"/></Bundle>'
    assert links.body(no_links, "application/fhir+xml") is no_links


def test_a_subclass_gets_a_rewriter_of_its_own_class() -> None:
    class Recording(LinkRewriter):
        pass

    upstream = Upstream.from_url(UP)
    made = Recording.between(upstream, APP)
    assert type(made) is Recording and made.url(f"{UP}/x") == f"{APP}/x"
    assert type(LinkRewriter.between(upstream, APP)) is LinkRewriter  # the shared one


def test_adapter_leaves_a_body_it_cannot_decode_alone(links: LinkRewriter) -> None:
    from mitmproxy import http

    from sidecar.proxy.response_links import rewrite_links

    raw = b'{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"}]}'  # says gzip, is not
    response = http.Response.make(200, b"", {"Content-Type": "application/fhir+json",
                                             "Content-Encoding": "gzip",
                                             "Location": f"{UP}/x"})
    response.raw_content = raw
    rewrite_links(response, _adapter_state(links))
    assert response.raw_content is raw
    assert response.headers["Location"] == f"{APP}/x"  # the headers still are rewritten


@pytest.mark.parametrize(("method", "status", "headers"), [
    ("HEAD", 200, {}),
    ("GET", 204, {}),
    ("GET", 304, {}),
    ("GET", 200, {"Content-Encoding": "gzip, br"}),   # a stack of codings
    ("GET", 200, {"Content-Encoding": "zstd"}),       # one it cannot undo while streaming
    ("GET", 200, {"Content-Type": "application/fhir+ndjson"}),
])
def test_chunked_bodies_that_cannot_hold_links_stream_untouched(
        links: LinkRewriter, method: str, status: int, headers: dict[str, str]) -> None:
    """No size, nothing to rewrite: the body is left to mitmproxy, unchanged and uncounted."""
    from mitmproxy import http
    from mitmproxy.test import tflow

    from sidecar.proxy.response_links import stream_body

    flow = tflow.tflow()
    flow.request.method = method
    flow.response = http.Response.make(status)
    del flow.response.headers["content-length"]
    # Set after make(), which drops a Content-Encoding its (empty) content does not have.
    flow.response.headers.update({"Content-Type": "application/fhir+json", **headers,
                                  "Transfer-Encoding": "chunked"})
    stream_body(flow, _adapter_state(links))
    assert flow.response.stream is False
    assert "content-length" not in flow.response.headers


def test_a_chunked_body_collected_whole_is_decoded_or_passed_as_received(
        links: LinkRewriter) -> None:
    """Below the threshold a chunked body is collected and rewritten whole; a body its coding
    does not decode (or without links) goes out exactly as it came."""
    import gzip

    from mitmproxy import http

    from sidecar.proxy.response_links import _CollectThenStream

    def collect(body: bytes, coding: str) -> bytes:
        headers = {"Content-Type": "application/fhir+json"}
        if coding:
            headers["Content-Encoding"] = coding
        response = http.Response.make(200, b"", headers)
        stream = _CollectThenStream(links, "json", response, threshold=1 << 20)
        assert stream(body[:10]) == b"" and stream(body[10:]) == b""  # held: below threshold
        return stream(b"")

    raw = b'{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"}]}'
    assert gzip.decompress(collect(gzip.compress(raw), "gzip")) == raw.replace(
        _U, APP.encode())
    assert collect(raw, "") == raw.replace(_U, APP.encode())
    assert collect(raw, "gzip") == raw  # says gzip, is not
    other = b'{"resourceType":"Patient","id":"' + _U + b'"}'
    assert collect(gzip.compress(other), "gzip") == gzip.compress(other)


@pytest.mark.parametrize(("threshold", "collected"), [("1m", True), (None, False)])
def test_a_chunked_bundle_is_collected_only_under_a_threshold(
        links: LinkRewriter, threshold: str | None, collected: bool) -> None:
    """mitmproxy's ``stream_large_bodies`` (set by the sidecar, a user's mitmproxy may clear
    it): with it a chunked Bundle is collected to be rewritten; without it mitmproxy buffers
    the whole body and the buffered rewrite applies."""
    from mitmproxy import http
    from mitmproxy.addons.proxyserver import Proxyserver
    from mitmproxy.test import taddons, tflow

    from sidecar.proxy.response_links import stream_body

    server = Proxyserver()  # declares the option; never started here
    with taddons.context(server) as context:
        context.configure(server, stream_large_bodies=threshold)
        flow = tflow.tflow()
        flow.response = http.Response.make(200)
        del flow.response.headers["content-length"]
        flow.response.headers.update({"Content-Type": "application/fhir+json",
                                      "Transfer-Encoding": "chunked"})
        state = _adapter_state(links)
        stream_body(flow, state)
        stream = flow.response.stream
        assert callable(stream) is collected
        if callable(stream):
            raw = b'{"resourceType":"Bundle","link":[{"url":"' + _U + b'/x"}]}'
            out = [stream(raw), stream(b"")]
            # a stream hook answers bytes or an iterable of bytes (the end chunk here is [])
            joined = b"".join(p if isinstance(p, bytes) else b"".join(p) for p in out)
            assert joined == raw.replace(_U, APP.encode())
            assert state.bytes_out == len(raw.replace(_U, APP.encode()))
