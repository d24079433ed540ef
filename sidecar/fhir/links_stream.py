"""Bundle links rewritten while a body streams: memory stays flat whatever the body's size.

A body too large to buffer (over ``stream_large_bodies``) is fed through
:class:`StreamingLinks` chunk by chunk. It tokenizes the start of the body, rewrites the
top-level Bundle's ``link[].url`` values there (through the same :class:`LinkRewriter` value
rules as buffered bodies), and once the links are behind it and the entries begin, passes every
further chunk on as it is. A URL split across two chunks is kept back until it is complete.

What differs from a buffered body, because the start of the body has left before its end is
seen:
- only the top-level Bundle's links are rewritten (not those of Bundles nested in entries);
- a body that turns out to be malformed after its links keeps the rewritten links;
- when the links come after the entries (JSON), everything up to them is tokenized, which is
  slow (Python speed) but still flat in memory; in XML, links always come first.
- When ``resourceType`` comes after ``link`` (JSON), the body from the first link URL on is
  held back until it is known; over ``HOLD_LIMIT`` bytes the body passes unchanged.
- A Bulk Data manifest (:mod:`sidecar.fhir.bundle_scan`) is tokenized to its end (it is file URLs
  throughout). File URLs that come before the manifest is recognised (``transactionTime``,
  ``request`` and ``output`` seen) are held back like links before ``resourceType``; a
  ``resourceType`` that comes after rewritten file URLs no longer undoes them.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

from sidecar.fhir.bundle_scan import (
    MANIFEST_COMPLETE,
    MANIFEST_FILE_LISTS,
    MANIFEST_OUTPUT_BIT,
    MANIFEST_OUTPUT_KEY,
    MANIFEST_STRING_KEYS,
)
from sidecar.fhir.links import (
    _XML_MARKUP,
    BodyKind,
    LinkRewriter,
    _json_key,
    _local,
    xml_url_value_span,
)

HOLD_LIMIT = 1 << 20  # bytes held back at most while waiting for a token or for resourceType

_BLANKS = re.compile(rb"[ \t\r\n]*")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_LITERAL = re.compile(rb'[^\s{}\[\]:,"]+')


class StreamingLinks:
    """Feed the body's chunks in order, then call :meth:`finish`; send what each returns."""

    def __init__(self, links: LinkRewriter, kind: BodyKind) -> None:
        self._links = links
        self._kind = kind
        self._buf = bytearray()  # received, not yet sent
        self._scan = 0  # where tokenizing resumes in _buf
        self._edits: list[tuple[int, int, bytes]] = []  # (start, end, replacement) in _buf
        self._held: int | None = None  # nothing from here on leaves until Bundle-ness is known
        # (start, end, is_file): link URLs waiting for resourceType, file URLs waiting for
        # the manifest's members.
        self._undecided: list[tuple[int, int, bool]] = []
        self.passing = False  # done with tokenizing: everything else goes out as it is
        # JSON: one [kind, expecting_key, key] per open object ("o") or array ("a").
        self._stack: list[list[object]] = []
        self._resource_type: str | None = None
        self._link_seen = False
        self._manifest = 0  # bits of MANIFEST_COMPLETE seen at the top level
        # XML: local names of the open elements.
        self._elements: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        if self.passing:
            return data
        self._buf += data
        if self._kind == "json":
            self._json(final=False)
        else:
            self._xml(final=False)
        if not self.passing and len(self._buf) - self._release_limit() > HOLD_LIMIT:
            self._give_up()
        return self._release()

    def finish(self) -> bytes:
        if not self.passing:
            if self._kind == "json":
                self._json(final=True)
            else:
                self._xml(final=True)
            self._give_up()  # whatever is still undecided goes out unchanged
        return self._release()

    # -- output ---------------------------------------------------------------------------

    def _release_limit(self) -> int:
        if self.passing:
            return len(self._buf)
        return self._scan if self._held is None else self._held

    def _release(self) -> bytes:
        limit = self._release_limit()
        if limit == 0:
            return b""
        out: list[bytes] = []
        last = 0
        kept: list[tuple[int, int, bytes]] = []
        for start, end, new in self._edits:
            if end <= limit:
                out += (bytes(self._buf[last:start]), new)
                last = end
            else:
                kept.append((start - limit, end - limit, new))
        out.append(bytes(self._buf[last:limit]))
        del self._buf[:limit]
        self._edits = kept
        self._scan -= limit
        if self._held is not None:
            self._held -= limit
        self._undecided = [(s - limit, e - limit, f) for s, e, f in self._undecided]
        return b"".join(out)

    def _give_up(self) -> None:
        self.passing = True
        self._undecided.clear()
        self._held = None

    def _edit(self, start: int, end: int, rewrite: Callable[[bytes], bytes | None]) -> None:
        new = rewrite(bytes(self._buf[start:end]))
        if new is not None:
            self._edits.append((start, end, new))

    # -- JSON -----------------------------------------------------------------------------

    def _json(self, final: bool) -> None:
        buf = self._buf
        pos = self._scan
        while not self.passing:
            pos = _BLANKS.match(buf, pos).end()  # type: ignore[union-attr]
            if pos >= len(buf):
                break
            first = buf[pos]
            if first == 0x22:  # "
                match = _JSON_STRING.match(buf, pos)
                if match is None:
                    if final:
                        self._give_up()
                    break
                end = match.end()
                self._json_string(pos, end)
            elif first in b"{}[]:,":
                end = pos + 1
                self._json_punctuation(first)
            else:
                match = _JSON_LITERAL.match(buf, pos)
                assert match is not None
                end = match.end()
                if end == len(buf) and not final:
                    break  # a number may go on in the next chunk
                if len(self._stack) == 0:
                    self._give_up()  # not an object
            pos = end
        self._scan = pos

    def _json_string(self, start: int, end: int) -> None:
        stack = self._stack
        if not stack or stack[-1][0] != "o":
            if not stack:
                self._give_up()
            return
        top = stack[-1]
        token = bytes(self._buf[start:end])
        if top[1]:
            top[2] = _json_key(token)
            return
        if len(stack) == 1 and top[2] == "resourceType":
            self._resource_type = _json_key(token)
            self._decide()
        elif len(stack) == 1 and top[2] in MANIFEST_STRING_KEYS:
            self._manifest |= MANIFEST_STRING_KEYS[str(top[2])]
            self._decide_manifest()
        elif len(stack) == 3 and top[2] == "url" and stack[0][2] == "link":
            if self._resource_type == "Bundle":
                self._edit(start, end, self._links._json_string)
            else:  # not known yet: any other resourceType has ended tokenizing (_decide)
                self._hold(start, end, is_file=False)
        elif len(stack) == 3 and top[2] == "url" and stack[0][2] in MANIFEST_FILE_LISTS \
                and stack[1][0] == "a" and self._resource_type is None:
            if self._manifest == MANIFEST_COMPLETE:
                self._edit(start, end, self._links._json_string)
            else:
                self._hold(start, end, is_file=True)

    def _hold(self, start: int, end: int, *, is_file: bool) -> None:
        self._undecided.append((start, end, is_file))
        if self._held is None:
            self._held = start

    def _settle(self, is_file: bool, rewrite: bool) -> None:
        """Rewrite (or let go unchanged) the undecided URLs of one kind."""
        kept = []
        for start, end, kind in self._undecided:
            if kind != is_file:
                kept.append((start, end, kind))
            elif rewrite:
                self._edit(start, end, self._links._json_string)
        self._edits.sort()
        self._undecided = kept
        self._held = kept[0][0] if kept else None

    def _decide(self) -> None:
        if self._resource_type == "Bundle":
            self._settle(is_file=False, rewrite=True)
            self._settle(is_file=True, rewrite=False)  # a resource is no manifest
        else:
            self._give_up()  # not a Bundle: nothing in it is rewritten

    def _decide_manifest(self) -> None:
        if self._manifest == MANIFEST_COMPLETE and self._resource_type is None:
            self._settle(is_file=True, rewrite=True)

    def _json_punctuation(self, char: int) -> None:
        stack = self._stack
        top = stack[-1] if stack else None
        if char == 0x7B:  # {
            if top is not None and top[0] == "o" and top[1]:
                self._give_up()
            else:
                stack.append(["o", True, None])
        elif char == 0x5B:  # [
            if top is None or (top[0] == "o" and top[1]):
                self._give_up()
                return
            if len(stack) == 1:
                if top[2] == MANIFEST_OUTPUT_KEY:
                    self._manifest |= MANIFEST_OUTPUT_BIT
                    self._decide_manifest()
                if top[2] == "link":
                    self._link_seen = True
                elif top[2] == "entry" and self._link_seen and self._resource_type:
                    self._give_up()  # links done, entries begin: pass the rest through
                    return
            stack.append(["a", False, None])
        elif char in (0x7D, 0x5D):  # } ]
            if top is None or top[0] != ("o" if char == 0x7D else "a"):
                self._give_up()
                return
            stack.pop()
            if not stack:
                self._give_up()  # the end of the document: hand out what is undecided
        elif char == 0x3A:  # :
            if top is None or top[0] != "o" or not top[1]:
                self._give_up()
            else:
                top[1] = False
        elif top is None:  # ,
            self._give_up()
        elif top[0] == "o":
            top[1] = True

    # -- XML ------------------------------------------------------------------------------

    def _xml(self, final: bool) -> None:
        buf = self._buf
        pos = self._scan
        while not self.passing:
            start = buf.find(b"<", pos)
            if start < 0:
                pos = len(buf)
                break
            match = _XML_MARKUP.match(buf, start)
            if match is None or match.group() == b"<":
                if final:
                    self._give_up()
                pos = start  # markup cut by the chunk boundary: wait for the rest
                break
            pos = match.end()
            self._xml_markup(match)
        self._scan = pos

    def _xml_markup(self, match: re.Match[bytes]) -> None:
        name = match.group("name")
        if name is None:
            return  # comment, CDATA, processing instruction, doctype
        local = _local(name)
        elements = self._elements
        if match.group("close"):
            if not elements or elements[-1] != local:
                self._give_up()
                return
            elements.pop()
            if not elements:
                self._give_up()
            return
        if not elements and local != b"Bundle":
            self._give_up()  # not a Bundle
            return
        if local == b"url" and len(elements) == 2 and elements[1] == b"link":
            span = xml_url_value_span(match)
            if span is not None:
                self._edit(span[0], span[1], self._links._xml_attribute)
        if match.group("empty"):
            return
        if len(elements) == 1:
            if local == b"link":
                self._link_seen = True
            elif local == b"entry" and self._link_seen:
                self._give_up()  # links done, entries begin
                return
        elements.append(local)


class _Codec:
    """Incremental decoding and re-encoding of one content coding."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._decoder: zlib._Decompress | None = None
        self._encoder: zlib._Compress | None = None
        self._brotli_in: object | None = None
        self._brotli_out: object | None = None
        self._head = b""  # deflate: the first byte, until the second tells the format
        if coding == "gzip":
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
            self._encoder = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._encoder = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS)
        elif coding == "br":
            import brotli

            self._brotli_in = brotli.Decompressor()
            self._brotli_out = brotli.Compressor(quality=1)
        else:  # the caller checks STREAMABLE_CODINGS first (proxy/response_links.py)
            raise ValueError(f"not a streamable content coding: {coding!r}")

    def decode(self, data: bytes) -> bytes:
        if self._brotli_in is not None:
            return bytes(self._brotli_in.process(data))  # type: ignore[attr-defined]
        if self._decoder is None:  # deflate: with or without the zlib wrapper, as sent
            data = self._head + data
            if len(data) < 2:
                self._head = data
                return b""
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return self._decoder.decompress(data)

    def encode(self, data: bytes) -> bytes:
        if self._brotli_out is not None:
            return bytes(self._brotli_out.process(data))  # type: ignore[attr-defined]
        assert self._encoder is not None
        return self._encoder.compress(data)

    def flush(self) -> bytes:
        if self._brotli_out is not None:
            return bytes(self._brotli_out.finish())  # type: ignore[attr-defined]
        assert self._encoder is not None
        return self._encoder.flush()


STREAMABLE_CODINGS = ("", "identity", "gzip", "deflate", "br")


class StreamingBody:
    """:class:`StreamingLinks` behind the body's content coding (decoded, rewritten,
    re-encoded). A coding error mid-stream sends the rest as received: the client's decoder
    then fails as it would have on the upstream's own bytes."""

    def __init__(self, links: LinkRewriter, kind: BodyKind, coding: str) -> None:
        self._links = StreamingLinks(links, kind)
        coding = coding.strip().lower()
        self._codec = _Codec(coding) if coding not in ("", "identity") else None
        self._broken = False

    def feed(self, data: bytes) -> bytes:
        if self._codec is None:
            return self._links.feed(data)
        if self._broken:
            return data
        try:
            return self._codec.encode(self._links.feed(self._codec.decode(data)))
        except Exception:  # zlib.error, brotli.error: the upstream's bytes are not that coding
            self._broken = True
            return self._codec.flush() + data

    def finish(self) -> bytes:
        if self._codec is None:
            return self._links.finish()
        if self._broken:
            return b""
        return self._codec.encode(self._links.finish()) + self._codec.flush()
