"""The fast path of link rewriting (entries jumped over, sidecar.fhir.bundle_scan) against the full
scanner it replaces, on generated Bundles: link before and after entry, nested ``link`` keys and
nested Bundles in entries, escaped strings, whitespace variants, XML namespaces and comments."""

from __future__ import annotations

import json
import os
import random
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.fhir.bundle_scan import json_top_level_link_urls
from sidecar.fhir.links import LinkRewriter, _json_bundle_link_urls, _xml_bundle_link_urls

UP = "https://fhir.example.com/r4"
APP = "http://127.0.0.1:8081"
LINKS = LinkRewriter(UP, APP)

SETTINGS = settings(max_examples=int(os.environ.get("LINKS_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

urls = st.sampled_from([
    f"{UP}/Patient?_count=2&page=3", UP, f"{UP}?_getpages=x", f"{UP}-other/Patient",
    "HTTPS://FHIR.Example.com/r4/Observation", "https://fhir.example.com:443/r4/x#f",
    "https://other.example.com/r4/Patient", "Patient?page=2", f"{UP}/Patient?name=M\u00fcller",
])
texts = st.text(alphabet=st.sampled_from(list("ab {}[]<>&\"'\\/:,Bülink")), max_size=12)


@st.composite
def bundles(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    links = [{"relation": draw(st.sampled_from(["self", "next", "previous"])), "url": draw(urls)}
             for _ in range(draw(st.integers(0, 3)))]
    entries = []
    for i in range(draw(st.integers(0, 4))):
        resource: dict[str, Any] = {"resourceType": draw(st.sampled_from(["Patient",
                                                                           "Observation"])),
                                    "id": str(i), "note": draw(texts)}
        if draw(st.booleans()):  # Patient.link: another resource's link, never rewritten
            resource["link"] = [{"type": "seealso", "url": draw(urls)}]
        if depth == 0 and draw(st.integers(0, 5)) == 0:
            resource = draw(bundles(depth=1))  # a nested Bundle (batch-response style)
        entry: dict[str, Any] = {"fullUrl": f"{UP}/Patient/{i}", "resource": resource}
        if draw(st.booleans()):  # entry.link: not Bundle.link
            entry["link"] = [{"relation": "x", "url": draw(urls)}]
        entries.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": links,
                              "entry": entries}
    order = draw(st.sampled_from([
        ["resourceType", "type", "link", "entry"],      # the usual order
        ["resourceType", "link", "type", "entry"],
        ["resourceType", "type", "entry", "link"],      # link after entry
        ["type", "link", "entry", "resourceType"],      # resourceType last
        ["link", "resourceType", "entry"],
    ]))
    if draw(st.booleans()):
        order = [key for key in order if key != "entry"]
    return {key: bundle[key] for key in order if key in bundle}


class JsonWriter:
    """json.dumps with random (valid) whitespace and string escapes."""

    def __init__(self, rnd: random.Random, letter_escapes: bool = True) -> None:
        self.rnd = rnd
        self.letter_escapes = letter_escapes

    def ws(self) -> str:
        return self.rnd.choice(["", "", " ", "\n  ", "\t", " \r\n"])

    def string(self, value: str) -> str:
        ascii_only = self.rnd.random() < 0.3
        letters = [i for i, c in enumerate(value) if c in "Bundlek"]
        if self.letter_escapes and letters and self.rnd.random() < 0.2:
            i = self.rnd.choice(letters)
            text = (json.dumps(value[:i], ensure_ascii=ascii_only)[:-1]
                    + f"\\u{ord(value[i]):04x}"
                    + json.dumps(value[i + 1:], ensure_ascii=ascii_only)[1:])
        else:
            text = json.dumps(value, ensure_ascii=ascii_only)
        if self.rnd.random() < 0.3:
            text = text.replace("/", "\\/")
        return text

    def dump(self, value: Any) -> str:
        if isinstance(value, dict):
            members = [f"{self.ws()}{self.string(k)}{self.ws()}:{self.ws()}{self.dump(v)}"
                       for k, v in value.items()]
            return "{" + ",".join(members) + self.ws() + "}"
        if isinstance(value, list):
            return "[" + ",".join(self.ws() + self.dump(v) for v in value) + self.ws() + "]"
        if isinstance(value, str):
            return self.string(value)
        return json.dumps(value)


def xml_dump(bundle: dict[str, Any], rnd: random.Random, prefix: str) -> str:
    def tag(name: str) -> str:
        return f"{prefix}{name}"

    def comment() -> str:
        return rnd.choice(["", "", "<!-- <link><url value=\"" + UP + "/c\"/></link> -->",
                           "<!-- </entry> -->", "\n  "])

    def attr(value: str) -> str:
        quote = rnd.choice(['"', "'"])
        return quote + xml_escape(value, {'"': "&quot;", "'": "&apos;"}) + quote

    def element(name: str, value: Any) -> str:
        if isinstance(value, list):
            return "".join(element(name, item) for item in value)
        if isinstance(value, dict):
            if "resourceType" in value and name != "":
                return f"<{tag(name)}>{resource(value)}</{tag(name)}>"
            inner = "".join(comment() + element(k, v) for k, v in value.items())
            return f"<{tag(name)}>{inner}</{tag(name)}>"
        return f"<{tag(name)} value={attr(str(value))}{rnd.choice(['', ' '])}/>"

    def resource(value: dict[str, Any]) -> str:
        kind = value["resourceType"]
        inner = "".join(comment() + element(k, v) for k, v in value.items()
                        if k != "resourceType")
        return f"<{tag(kind)}>{inner}</{tag(kind)}>"

    ns = f'xmlns{":" + prefix[:-1] if prefix else ""}="http://hl7.org/fhir"'
    body = resource(bundle).replace(f"<{tag('Bundle')}>", f"<{tag('Bundle')} {ns}>", 1)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + comment() + body + comment()


def reference(raw: bytes, kind: str, host_check: bool = True) -> bytes:
    """What the full scanner (the behaviour before the fast path) makes of ``raw``: like
    before, a body that does not name the upstream host as written is left alone (only a
    body over 64 KB now skips that check, and may then rewrite a host spelled with escapes)."""
    if host_check and LINKS._host not in raw.lower():
        return raw
    if kind == "json":
        spans = _json_bundle_link_urls(raw) or []
        return LINKS._splice(raw, spans, LINKS._json_string)
    spans = _xml_bundle_link_urls(raw) or []
    return LINKS._splice(raw, spans, LINKS._xml_attribute)


def _json_bundle(bundle: dict[str, Any], seed: int, letter_escapes: bool = True) -> bytes:
    return JsonWriter(random.Random(seed), letter_escapes).dump(bundle).encode()


@SETTINGS
@given(bundles(), st.integers(0, 2**32))
def test_json_fast_path_equals_the_full_scan(bundle: dict[str, Any], seed: int) -> None:
    raw = _json_bundle(bundle, seed)
    assert json.loads(raw) == bundle  # the writer's variations are valid JSON
    assert LINKS.body(raw, "application/fhir+json") == reference(raw, "json")
    full = _json_bundle_link_urls(raw)
    fast = _json_bundle_link_urls(raw, skip_entries=True)
    if fast is not None:
        assert fast == full
    fastest = json_top_level_link_urls(raw)
    if fastest is not None:
        assert fastest == full


@SETTINGS
@given(bundles(), st.integers(0, 2**32), st.sampled_from(["", "f:"]))
def test_xml_fast_path_equals_the_full_scan(bundle: dict[str, Any], seed: int,
                                            prefix: str) -> None:
    raw = xml_dump(bundle, random.Random(seed), prefix).encode()
    assert LINKS.body(raw, "application/fhir+xml") == reference(raw, "xml")
    fast = _xml_bundle_link_urls(raw, skip_entries=True)
    if fast is not None:
        assert fast == _xml_bundle_link_urls(raw)


@SETTINGS
@given(bundles(), st.integers(0, 2**32), st.data())
def test_a_cut_json_body_is_left_alone_or_only_its_links_rewritten(
        bundle: dict[str, Any], seed: int, data: st.DataObject) -> None:
    raw = _json_bundle(bundle, seed)
    cut = raw[:data.draw(st.integers(0, len(raw) - 1))]
    out = LINKS.body(cut, "application/fhir+json")
    # Never corrupted: untouched, or exactly the start of the correctly rewritten whole body.
    assert out == cut or reference(raw, "json").startswith(out)


def _usual_page(entries: int) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "searchset", "total": entries,
            "link": [{"relation": "self", "url": f"{UP}/Observation?_count={entries}"},
                     {"relation": "next", "url": f"{UP}/Observation?_count={entries}&p=2"}],
            "entry": [{"fullUrl": f"{UP}/Observation/{i}",
                       "resource": {"resourceType": "Observation", "id": str(i),
                                    "status": "final"}} for i in range(entries)]}


@pytest.mark.parametrize("seed", range(20))
def test_the_usual_page_takes_the_fast_path(seed: int) -> None:
    """Links before entries, no nested Bundle: the entries are jumped over (letters written
    as \\u escapes could spell a nested "Bundle", so those would not be)."""
    raw = _json_bundle(_usual_page(50), seed, letter_escapes=False)
    fast = _json_bundle_link_urls(raw, skip_entries=True)
    assert fast is not None and len(fast) == 2
    assert json_top_level_link_urls(raw) == fast
    xml = xml_dump(_usual_page(50), random.Random(seed), "").encode()
    fast_xml = _xml_bundle_link_urls(xml, skip_entries=True)
    assert fast_xml is not None and len(fast_xml) == 2


def test_link_after_entry_falls_back_to_the_full_scan() -> None:
    page = _usual_page(3)
    page["link"] = page.pop("link")
    raw = json.dumps(page).encode()
    assert _json_bundle_link_urls(raw, skip_entries=True) is None
    assert json_top_level_link_urls(raw) is None
    assert json.loads(LINKS.body(raw, "application/json"))["link"][1]["url"] == \
        f"{APP}/Observation?_count=3&p=2"


def test_a_nested_bundle_in_the_entries_falls_back_to_the_full_scan() -> None:
    page = _usual_page(2)
    page["entry"][1]["resource"] = {"resourceType": "Bundle", "link": [{"url": f"{UP}/n"}]}
    raw = json.dumps(page).encode()
    assert _json_bundle_link_urls(raw, skip_entries=True) is None
    assert json_top_level_link_urls(raw) is None
    out = json.loads(LINKS.body(raw, "application/json"))
    assert out["entry"][1]["resource"]["link"][0]["url"] == f"{APP}/n"
    escaped = raw.replace(b'"Bundle"}', b'"B\\u0075ndle"}')
    assert _json_bundle_link_urls(escaped, skip_entries=True) is None
    assert json_top_level_link_urls(escaped) is None


def test_requests_share_one_rewriter_per_base_pair() -> None:
    """Built per request it would cost more than rewriting a page: it is immutable and
    shared, and a different app base (Host) gets its own."""
    from sidecar.request.routing import Upstream

    upstream = Upstream.from_url(UP)
    first = LinkRewriter.between(upstream, APP)
    assert first is LinkRewriter.between(upstream, APP + "/")
    other = LinkRewriter.between(upstream, "http://localhost:8081")
    assert other is not None and other is not first
    assert other.url(f"{UP}/x") == "http://localhost:8081/x"
