"""FHIR navigation links kept pointing at the sidecar.

Reference: docs/configuration.md#fhir-links-and-https-base-urls.

A FHIR server answers with absolute URLs under its own base: ``Location`` and
``Content-Location`` after a create or update (or a Bulk Data kick-off: the status URL),
``Bundle.link[].url`` (``self``, ``next``, ...) when paging, and ``output[].url`` /
``error[].url`` in a Bulk Data export manifest (see :mod:`sidecar.fhir.bundle_scan` for what counts
as one). An app that follows them as they are goes around the sidecar, without credentials.
:class:`LinkRewriter` replaces the upstream base URL with the base URL the app used, and only
there:

- only an exact base-URL prefix that ends on a boundary (``/``, ``?``, ``#`` or the end) is
  replaced: ``https://h/fhir-other`` is not under ``https://h/fhir``;
- bodies are edited in place, never re-serialised: every byte outside a rewritten URL prefix
  stays as it was (key order, whitespace, number formats, escapes);
- ``Bundle.entry[].fullUrl`` is identity, not navigation, and is never touched; nor is any
  other element, header or resource type, nor a manifest's ``request``. NDJSON bodies are not
  JSON documents (:func:`body_kind` answers ``None``) and are never looked into.

The scheme and host of the prefix are compared case-insensitively and the default port may be
spelled out (``https://h:443/fhir``); the path is compared exactly. This module never imports
mitmproxy: the proxy adapter decides *when* to rewrite (a buffered body here, a streaming one in
:mod:`sidecar.fhir.links_stream`), this decides
*what*.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from xml.sax.saxutils import escape as xml_escape

from sidecar.fhir.bundle_scan import (
    MANIFEST_COMPLETE,
    MANIFEST_FILE_LISTS,
    MANIFEST_OUTPUT_BIT,
    MANIFEST_OUTPUT_KEY,
    MANIFEST_STRING_KEYS,
    json_entries_end,
    json_top_level_link_urls,
    xml_entries_end,
)
from sidecar.request.routing import Upstream

REWRITTEN_HEADERS = ("Location", "Content-Location")

BodyKind = Literal["json", "xml"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_FIRST_BYTE = re.compile(rb"\s*(\S)")
# Up to this size a lowered copy is cheaper than looking for links in a body without them.
_SMALL_BODY = 64 * 1024


def app_base_url(scheme: str, host_header: str, base_path: str = "") -> str:
    """The base URL an app used: ``scheme://Host`` plus, for a forward proxy, the base path."""
    return f"{scheme}://{host_header}{base_path.rstrip('/')}"


def body_kind(content_type: str | None, body: bytes = b"") -> BodyKind | None:
    """JSON or XML by media type (FHIR's and the generic ones); sniffed when there is none."""
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if media in ("application/json", "text/json") or media.endswith("+json") \
                or media == "application/json+fhir":
            return "json"
        if media in ("application/xml", "text/xml") or media.endswith("+xml") \
                or media == "application/xml+fhir":
            return "xml"
        return None
    start = _FIRST_BYTE.match(body)
    first = start.group(1) if start else b""
    return "json" if first == b"{" else "xml" if first == b"<" else None


def _prefix_pattern(upstream: Upstream) -> str:
    host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
    port = re.escape(f":{upstream.port}")
    if _DEFAULT_PORTS.get(upstream.scheme) == upstream.port:
        port = f"(?:{port})?"
    return (f"(?i:{re.escape(upstream.scheme)}://{re.escape(host)}){port}"
            f"{re.escape(upstream.base_path)}(?=[/?#]|$)")


@dataclass(frozen=True)
class LinkRewriter:
    """Rewrites URLs under ``upstream_base`` to the same place under ``app_base``."""

    upstream_base: str
    app_base: str
    _str_prefix: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _bytes_prefix: re.Pattern[bytes] = field(init=False, repr=False, compare=False)
    _host: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        upstream = Upstream.from_url(self.upstream_base)
        pattern = _prefix_pattern(upstream)
        object.__setattr__(self, "_str_prefix", re.compile(pattern))
        object.__setattr__(self, "_bytes_prefix", re.compile(pattern.encode()))
        object.__setattr__(self, "_host", upstream.host.encode().lower())

    @classmethod
    def between(cls, upstream: Upstream, app_base: str) -> LinkRewriter | None:
        """A rewriter, or ``None`` when the app already uses the upstream's own base URL."""
        app_base = app_base.rstrip("/")
        if app_base == upstream.base_url:
            return None
        if cls is not LinkRewriter:
            return cls(upstream.base_url, app_base)
        return _shared_rewriter(upstream.base_url, app_base)

    # -- single values --------------------------------------------------------------------

    def url(self, value: str) -> str:
        """``value`` with its upstream base replaced, or unchanged when it is not under it."""
        match = self._str_prefix.match(value)
        if match is None:
            return value
        return self.app_base + value[match.end():]

    def header(self, value: str) -> str:
        """A ``Location`` / ``Content-Location`` value (surrounding blanks are kept)."""
        stripped = value.strip()
        rewritten = self.url(stripped)
        if rewritten is stripped:
            return value
        start = len(value) - len(value.lstrip())
        return value[:start] + rewritten + value[start + len(stripped):]

    # -- bodies ---------------------------------------------------------------------------

    def body(self, content: bytes, content_type: str | None) -> bytes:
        """The body with its Bundle links rewritten; the same object when nothing changed.

        Anything that is not well-formed enough to be sure of its structure is left alone.
        """
        if len(content) <= _SMALL_BODY and self._host not in content.lower():
            return content  # a small body never naming the upstream host (a resource read)
        kind = body_kind(content_type, content)
        if kind == "json":
            return self.json_body(content)
        if kind == "xml":
            return self.xml_body(content)
        return content

    def json_body(self, content: bytes) -> bytes:
        if b'"link"' not in content and b'"output"' not in content and b"\\" not in content:
            return content  # no ``link`` or ``output`` key, not even an escaped one
        spans = json_top_level_link_urls(content)
        if spans is None:
            spans = _json_bundle_link_urls(content, skip_entries=True)
        if spans is None:
            spans = _json_bundle_link_urls(content)
        if not spans:
            return content
        return self._splice(content, spans, self._json_string)

    def xml_body(self, content: bytes) -> bytes:
        if b"link" not in content:
            return content
        spans = _xml_bundle_link_urls(content, skip_entries=True)
        if spans is None:
            spans = _xml_bundle_link_urls(content)
        if not spans:
            return content
        return self._splice(content, spans, self._xml_attribute)

    def _splice(self, content: bytes, spans: list[tuple[int, int]],
                rewrite: Callable[[bytes], bytes | None]) -> bytes:
        view = memoryview(content)  # slices of it are not copies: the join copies once
        out: list[bytes | memoryview] = []
        last = 0
        changed = False
        for start, end in spans:
            new = rewrite(content[start:end])
            if new is None:
                continue
            out += (view[last:start], new)
            last = end
            changed = True
        if not changed:
            return content
        out.append(view[last:])
        return b"".join(out)

    def _raw(self, raw: bytes) -> bytes | None:
        # The usual case: the prefix is written literally, so only it is replaced.
        match = self._bytes_prefix.match(raw)
        if match is None:
            return None
        return self.app_base.encode() + raw[match.end():]

    def _json_string(self, token: bytes) -> bytes | None:
        """A JSON string token (with its quotes), rewritten; ``None`` when not under the base."""
        inner = self._raw(token[1:-1])
        if inner is not None:
            return b'"' + inner + b'"'
        if b"\\" not in token:
            return None
        # The prefix is written with escapes (``https:\/\/``): re-encode this one value only.
        try:
            value = json.loads(token)
        except ValueError:
            return None
        rewritten = self.url(value)
        if rewritten is value:
            return None
        return json.dumps(rewritten, ensure_ascii=False).encode()

    def _xml_attribute(self, raw: bytes) -> bytes | None:
        """An attribute value (without quotes), rewritten; ``None`` when not under the base."""
        inner = self._raw(raw)
        if inner is not None:
            return inner
        if b"&" not in raw:
            return None
        try:
            value = xml_unescape(raw.decode())
        except (UnicodeDecodeError, ValueError):
            return None
        rewritten = self.url(value)
        if rewritten is value:
            return None
        return xml_escape(rewritten, {'"': "&quot;", "'": "&apos;"}).encode()


_XML_REFERENCE = re.compile(r"&(?:#([0-9]{1,7})|#x([0-9a-fA-F]{1,6})|(lt|gt|amp|quot|apos));")
_XML_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


def xml_unescape(text: str) -> str:
    """An attribute value as an XML parser reads it: the five predefined entities and character
    references (``&#47;``, ``&#x2F;``), which a serializer may use for any character of a URL.
    ``ValueError`` for a reference to a character XML does not allow."""

    def character(match: re.Match[str]) -> str:
        decimal, hexadecimal, name = match.groups()
        if name is not None:
            return _XML_ENTITIES[name]
        code = int(decimal) if decimal is not None else int(hexadecimal, 16)
        if code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD \
                or 0x10000 <= code <= 0x10FFFF:
            return chr(code)
        raise ValueError(f"character reference to U+{code:04X}")

    return _XML_REFERENCE.sub(character, text)


@functools.lru_cache(maxsize=256)
def _shared_rewriter(upstream_base: str, app_base: str) -> LinkRewriter:
    # Every request needs one; building it parses the base URL and compiles its patterns,
    # which cost more than rewriting a page. It is immutable, so requests share it.
    return LinkRewriter(upstream_base, app_base)


# -- JSON: where are the Bundle.link[].url strings? -------------------------------------------

_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', re.DOTALL)
_K_LINK = "link"
_K_ENTRY = "entry"
_K_URL = "url"
_K_RESOURCE_TYPE = "resourceType"


class _JsonObject:
    __slots__ = ("candidates", "expect_key", "file_owner", "files", "key", "link_owner",
                 "manifest", "resource_type")

    def __init__(self, link_owner: _JsonObject | None,
                 file_owner: _JsonObject | None = None) -> None:
        self.key: str | None = None
        self.expect_key = True
        self.resource_type: str | None = None
        # ``url`` strings of this object's ``link`` array elements, kept until we know
        # (at the closing brace) whether this object is a Bundle.
        self.candidates: list[tuple[int, int]] = []
        # The object whose ``link`` array this object is an element of.
        self.link_owner = link_owner
        # Top level only: ``url`` strings of the ``output`` / ``error`` elements, and which
        # manifest members were seen (bits of MANIFEST_COMPLETE), for a Bulk Data manifest.
        self.files: list[tuple[int, int]] | None = None
        self.manifest = 0
        # The top-level object whose ``output`` or ``error`` array this object is an element of.
        self.file_owner = file_owner


class _JsonArray:
    __slots__ = ("file_owner", "link_owner")

    def __init__(self, link_owner: _JsonObject | None,
                 file_owner: _JsonObject | None = None) -> None:
        self.link_owner = link_owner
        self.file_owner = file_owner


def _json_key(token: bytes) -> str | None:
    if b"\\" not in token:
        return token[1:-1].decode("utf-8", "replace")
    try:
        key = json.loads(token)
    except ValueError:
        return None
    return key if isinstance(key, str) else None


def _json_bundle_link_urls(content: bytes, skip_entries: bool = False
                           ) -> list[tuple[int, int]] | None:
    """Spans of the string tokens that are ``link[].url`` of a Bundle (at any depth), or
    ``output[].url`` / ``error[].url`` of a Bulk Data manifest (the top-level object).

    A tokenizer, not a parser: it tracks just enough structure to know where each string sits,
    and gives up (returns nothing) on anything inconsistent.

    With ``skip_entries`` the top-level ``entry`` array is jumped over rather than tokenized
    when :func:`sidecar.fhir.bundle_scan.json_entries_end` finds that safe; that is what keeps a
    large page cheap. ``None``: it was not safe, scan again without ``skip_entries``.
    """
    stack: list[_JsonObject | _JsonArray] = []
    found: list[tuple[int, int]] = []
    done = False
    top_link_seen = False
    resume: int | None = 0
    while resume is not None:
        tokens = _JSON_TOKEN.finditer(content, resume)
        resume = None
        for match in tokens:
            if done:
                return []  # something after the top-level value: not one JSON document
            token = match.group()
            first = token[:1]
            top = stack[-1] if stack else None
            if first == b'"':
                if isinstance(top, _JsonObject):
                    if top.expect_key:
                        top.key = _json_key(token)
                        continue
                    if top.key == _K_URL and top.link_owner is not None:
                        top.link_owner.candidates.append(match.span())
                    elif top.key == _K_URL and top.file_owner is not None:
                        files = top.file_owner.files
                        assert files is not None  # set with file_owner, at the list's [
                        files.append(match.span())
                    elif top.key == _K_RESOURCE_TYPE:
                        top.resource_type = _json_key(token)
                    elif len(stack) == 1 and top.key in MANIFEST_STRING_KEYS:
                        top.manifest |= MANIFEST_STRING_KEYS[top.key]
                elif top is None:
                    done = True
            elif first == b"{":
                owner = file_owner = None
                if isinstance(top, _JsonArray):
                    owner, file_owner = top.link_owner, top.file_owner
                elif isinstance(top, _JsonObject) and top.expect_key:
                    return []
                stack.append(_JsonObject(owner, file_owner))
            elif first == b"[":
                owner = file_owner = None
                if isinstance(top, _JsonObject):
                    if top.expect_key:
                        return []
                    if top.key == _K_LINK:
                        owner = top
                        top_link_seen = top_link_seen or len(stack) == 1
                    elif len(stack) == 1 and top.key in MANIFEST_FILE_LISTS:
                        file_owner = top
                        if top.files is None:
                            top.files = []
                        if top.key == MANIFEST_OUTPUT_KEY:
                            top.manifest |= MANIFEST_OUTPUT_BIT
                    elif skip_entries and top.key == _K_ENTRY and len(stack) == 1:
                        skip_entries = False
                        if not top_link_seen or top.resource_type is None:
                            return None  # link or resourceType may follow: scan it all
                        resume = json_entries_end(content, match.start())
                        if resume is None:
                            return None
                        stack.append(_JsonArray(None))  # closed by the ] we resume at
                        break
                stack.append(_JsonArray(owner, file_owner))
            elif first == b"}":
                if not isinstance(top, _JsonObject):
                    return []
                stack.pop()
                if top.resource_type == "Bundle":  # other resources' links are not paging links
                    found += top.candidates
                elif top.resource_type is None and top.manifest == MANIFEST_COMPLETE \
                        and top.files:
                    found += top.files
                if not stack:
                    done = True
            elif first == b"]":
                if not isinstance(top, _JsonArray):
                    return []
                stack.pop()
                if not stack:
                    done = True
            elif first == b":":
                if not isinstance(top, _JsonObject) or not top.expect_key:
                    return []
                top.expect_key = False
            elif first == b",":
                if isinstance(top, _JsonObject):
                    top.expect_key = True
                elif top is None:
                    return []
            elif top is None:
                done = True  # a bare literal as the whole document
    if stack:
        return []  # truncated
    found.sort()
    return found


# -- XML: where are the Bundle/link/url/@value attributes? -----------------------------------

_XML_MARKUP = re.compile(
    rb"<!--.*?-->"
    rb"|<!\[CDATA\[.*?\]\]>"
    rb"|<\?.*?\?>"
    rb"|<!DOCTYPE[^>\[]*(?:\[.*?\])?\s*>"
    rb"|<(?P<close>/?)(?P<name>[^\s/>!?]+)(?P<attrs>(?:\s+[^\s=/>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*)"
    rb"\s*(?P<empty>/?)>"
    rb"|<",  # anything else that opens markup: not well-formed, give up
    re.DOTALL,
)
_XML_VALUE_ATTR = re.compile(rb"""\s(?:[^\s=/>:]+:)?value\s*=\s*(?:"([^"]*)"|'([^']*)')""")


def _local(name: bytes) -> bytes:
    return name.rsplit(b":", 1)[-1]


def xml_url_value_span(match: re.Match[bytes]) -> tuple[int, int] | None:
    """Where the ``value`` attribute of a ``<url ...>`` tag matched by ``_XML_MARKUP`` sits."""
    attrs_start = match.start("attrs")
    value = _XML_VALUE_ATTR.search(match.group("attrs"))
    if value is None:
        return None
    group = 1 if value.group(1) is not None else 2
    start, end = value.span(group)
    return attrs_start + start, attrs_start + end


def _xml_bundle_link_urls(content: bytes, skip_entries: bool = False
                          ) -> list[tuple[int, int]] | None:
    """Spans of the ``value`` attributes of ``<url>`` in ``<link>`` directly in a ``<Bundle>``.

    ``skip_entries`` and ``None`` as for :func:`_json_bundle_link_urls`
    (:func:`sidecar.fhir.bundle_scan.xml_entries_end`).
    """
    stack: list[bytes] = []
    found: list[tuple[int, int]] = []
    root_link_seen = False
    resume: int | None = 0
    while resume is not None:
        markup = _XML_MARKUP.finditer(content, resume)
        resume = None
        for match in markup:
            name = match.group("name")
            if name is None:
                if match.group() == b"<":
                    return []
                continue
            local = _local(name)
            if match.group("close"):
                if not stack or stack[-1] != local:
                    return []
                stack.pop()
                continue
            if local == b"url" and len(stack) >= 2 and stack[-1] == b"link" \
                    and stack[-2] == b"Bundle":
                span = xml_url_value_span(match)
                if span is not None:
                    found.append(span)
            if match.group("empty"):
                continue
            if len(stack) == 1 and stack[0] == b"Bundle":
                if local == b"link":
                    root_link_seen = True
                elif local == b"entry" and skip_entries:
                    skip_entries = False
                    if not root_link_seen:
                        return None
                    resume = xml_entries_end(content, match.end())
                    if resume is None:
                        return None
                    stack.append(local)  # closed by the </entry> we resume at
                    break
            stack.append(local)
    if stack:
        return []
    return found
