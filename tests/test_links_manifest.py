"""Bulk Data export manifests (sidecar.fhir.links, sidecar.fhir.bundle_scan,
sidecar.fhir.links_stream): the ``url`` of ``output[]`` and ``error[]`` elements under the
upstream base is rewritten, nothing else is; the fast path, the full scan and the streamed
rewrite agree on generated manifests; NDJSON is never looked into."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_links_fast import APP, LINKS, SETTINGS, UP, JsonWriter, reference, urls
from test_links_stream import _stream

from sidecar.fhir.bundle_scan import json_top_level_link_urls
from sidecar.fhir.links import _json_bundle_link_urls, body_kind
from sidecar.fhir.links_stream import StreamingLinks

STORAGE = "https://bucket.storage.example.net/exports/7/Observation.ndjson?X-Sig=abc%2F"

MANIFEST = f"""{{
  "transactionTime":"2026-11-28T15:00:00Z" ,
  "request" : "{UP}/$export?_type=Patient,Observation",
  "requiresAccessToken": true,
  "output" : [
    {{"type":"Patient","url":"{UP}/files/7/Patient.ndjson","count":120}},
    {{"url" : "{STORAGE}", "type": "Observation",
      "extension": {{"url": "{UP}/not-a-file-url"}} }},
    {{"type":"Encounter","url":"https:\\/\\/fhir.example.com\\/r4\\/files\\/7\\/Enc.ndjson"}},
    {{"type":"Condition","url":"{UP}-other/files/7/Condition.ndjson"}}
  ],
  "error": [ {{ "type":"OperationOutcome", "url":"{UP}/files/7/err.ndjson" }} ],
  "extension": {{"http://example.org/source": "{UP}/metadata", "link": [{{"url": "{UP}/x"}}]}}
}}
""".encode()


def test_manifest_file_urls_rewritten_and_nothing_else() -> None:
    out = LINKS.body(MANIFEST, "application/json")
    expected = (MANIFEST
                .replace(f'"{UP}/files/7/Patient.ndjson"'.encode(),
                         f'"{APP}/files/7/Patient.ndjson"'.encode())
                .replace(b'"https:\\/\\/fhir.example.com\\/r4\\/files\\/7\\/Enc.ndjson"',
                         f'"{APP}/files/7/Enc.ndjson"'.encode())
                .replace(f'"{UP}/files/7/err.ndjson"'.encode(),
                         f'"{APP}/files/7/err.ndjson"'.encode()))
    assert out == expected
    parsed = json.loads(out)
    assert parsed["request"].startswith(UP)  # the kick-off request: not a file URL
    assert parsed["output"][1]["url"] == STORAGE  # another host: exactly as sent
    assert parsed["output"][1]["extension"]["url"] == f"{UP}/not-a-file-url"
    assert parsed["output"][3]["url"].startswith(f"{UP}-other/")  # no base boundary
    assert parsed["extension"]["link"][0]["url"] == f"{UP}/x"
    # The fast path and the full scan find the same five file URLs (three are under the base).
    spans = _json_bundle_link_urls(MANIFEST)
    assert spans is not None and len(spans) == 5
    assert json_top_level_link_urls(MANIFEST) == spans


def _manifest(**changes: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "transactionTime": "2026-11-28T15:00:00Z", "request": f"{UP}/$export",
        "requiresAccessToken": True,
        "output": [{"type": "Patient", "url": f"{UP}/files/p.ndjson"}],
        "error": [{"type": "OperationOutcome", "url": f"{UP}/files/e.ndjson"}],
    }
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    if "resourceType" in manifest:  # first, as FHIR JSON writes it (and as a stream needs it)
        manifest = {"resourceType": manifest.pop("resourceType"), **manifest}
    return manifest


@pytest.mark.parametrize("changes", [
    {"transactionTime": None},
    {"request": None},
    {"output": None},
    {"transactionTime": 1764342000},                 # not a string
    {"request": [f"{UP}/$export"]},
    {"output": {"type": "Patient", "url": f"{UP}/files/p.ndjson"}},  # not an array
    {"resourceType": "Parameters"},                  # a FHIR resource is no manifest
    {"resourceType": "Bundle"},                      # ... and a Bundle's output is no link
])
def test_almost_manifests_are_left_alone(changes: dict[str, Any]) -> None:
    raw = json.dumps(_manifest(**changes)).encode()
    assert LINKS.body(raw, "application/json") is raw
    for cut in (5, 40, 90):
        assert _stream(raw, "json", [cut]) == raw


def test_a_nested_manifest_shape_is_not_a_manifest() -> None:
    raw = json.dumps({"resourceType": "Parameters", "parameter": [_manifest()]}).encode()
    assert LINKS.body(raw, "application/json") is raw


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    def files() -> list[Any]:
        items: list[Any] = []
        for _ in range(draw(st.integers(0, 3))):
            item: dict[str, Any] = {"type": draw(st.sampled_from(["Patient", "Bundle"])),
                                    "url": draw(urls)}
            if draw(st.booleans()):
                item["extension"] = {"url": draw(urls), "link": [{"url": draw(urls)}]}
            if draw(st.booleans()):
                item = {k: item[k] for k in reversed(item)}
            items.append(item)
        if draw(st.integers(0, 6)) == 0:
            items.append(draw(urls))  # not an object: no url member
        return items

    members: dict[str, Any] = {
        "transactionTime": "2026-11-28T15:00:00Z",
        "request": draw(urls),
        "requiresAccessToken": draw(st.booleans()),
        "output": files(),
        "error": files(),
        "extension": {"link": [{"url": draw(urls)}]},
    }
    keys = draw(st.permutations(list(members)))
    if draw(st.integers(0, 4)) == 0:
        keys = keys[1:]  # one member missing: maybe no manifest any more
    return {k: members[k] for k in keys}


def expected_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the app must get, computed on the parsed document (an independent oracle)."""
    is_manifest = isinstance(manifest.get("transactionTime"), str) \
        and isinstance(manifest.get("request"), str) and isinstance(manifest.get("output"), list)
    out = json.loads(json.dumps(manifest))
    if is_manifest:
        for key in ("output", "error"):
            for item in out.get(key, []):
                if isinstance(item, dict) and isinstance(item.get("url"), str):
                    item["url"] = LINKS.url(item["url"])
    return out


@SETTINGS
@given(manifests(), st.integers(0, 2**32), st.lists(st.integers(0, 1500), max_size=10))
def test_generated_manifests_fast_full_and_streamed_agree(
        manifest: dict[str, Any], seed: int, cuts: list[int]) -> None:
    raw = JsonWriter(random.Random(seed)).dump(manifest).encode()
    buffered = LINKS.body(raw, "application/json")
    full = reference(raw, "json")
    assert buffered == full
    if LINKS._host in raw.lower():
        assert json.loads(buffered) == expected_manifest(manifest)
    fastest = json_top_level_link_urls(raw)
    if fastest is not None:
        assert fastest == _json_bundle_link_urls(raw)
    assert _stream(raw, "json", cuts) == reference(raw, "json", host_check=False)


def test_file_urls_before_the_manifest_is_recognised_are_held_then_rewritten() -> None:
    raw = (b'{"output":[{"url":"' + UP.encode() + b'/f/1.ndjson"}],'
           b'"request":"' + UP.encode() + b'/$export","transactionTime":"t"}')
    stream = StreamingLinks(LINKS, "json")
    first = stream.feed(raw[:60])
    assert first == b'{"output":[{"url":'  # held back from the undecided URL on
    out = first + stream.feed(raw[60:]) + stream.finish()
    assert out == raw.replace(f'"{UP}/f/'.encode(), f'"{APP}/f/'.encode())
    for cut in range(1, len(raw)):
        assert _stream(raw, "json", [cut]) == out, cut


@pytest.mark.parametrize("media", ["application/fhir+ndjson", "application/ndjson",
                                   "application/x-ndjson", "application/fhir+ndjson; charset=x"])
def test_ndjson_is_never_scanned(media: str) -> None:
    assert body_kind(media) is None
    one_line = json.dumps({"resourceType": "Bundle", "link": [{"url": f"{UP}/p2"}]}).encode()
    lone_manifest = json.dumps(_manifest()).encode()
    for raw in (one_line, one_line + b"\n" + one_line + b"\n", lone_manifest):
        assert LINKS.body(raw, media) is raw
