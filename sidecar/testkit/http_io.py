"""HTTP/1.1 request plumbing the standard library leaves to us: headers and body framing.

``http.server`` parses the request line and header fields but never reads a body, so a
keep-alive server has to consume every body itself (``Content-Length`` or ``chunked``) or the
next request on the connection would be parsed from the leftovers.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

READ_SIZE = 64 * 1024
_MAX_LINE = 8 * 1024
_HEX_DIGITS = frozenset(string.hexdigits.encode())


class Readable(Protocol):
    """The buffered reading side of a connection (``rfile``)."""

    def read(self, size: int = ..., /) -> bytes: ...

    def readline(self, size: int = ..., /) -> bytes: ...


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive header fields.

    Iteration yields lower-case names. A field that occurs more than once is joined with ", "
    for lookups; ``get_all`` and ``fields`` keep the occurrences apart (a duplicated
    ``Authorization`` is exactly the kind of thing a test wants to see).
    """

    def __init__(self, fields: Iterable[tuple[str, str]]) -> None:
        self._fields = tuple(fields)
        joined: dict[str, str] = {}
        for name, value in self._fields:
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        self._joined = joined

    def __getitem__(self, name: str) -> str:
        return self._joined[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._joined

    def __iter__(self) -> Iterator[str]:
        return iter(self._joined)

    def __len__(self) -> int:
        return len(self._joined)

    def __repr__(self) -> str:
        return f"Headers({list(self._fields)!r})"

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """Every field as received: original spelling, order and repetitions."""
        return self._fields

    def get_all(self, name: str) -> list[str]:
        key = name.lower()
        return [value for field, value in self._fields if field.lower() == key]


class FramingError(Exception):
    """The request body's framing is invalid; the connection cannot be reused."""


class RequestBody:
    """Streams one request body off the connection, counting the bytes it consumed."""

    def __init__(self, rfile: Readable, *, content_length: int | None, chunked: bool) -> None:
        self._rfile = rfile
        self._content_length = content_length
        self._chunked = chunked
        # One underlying generator for the whole body: a handler may stop reading early and
        # drain() then continues exactly where it stopped.
        self._source = self._chunked_pieces() if chunked else self._sized_pieces()
        self.bytes_read = 0

    @classmethod
    def from_headers(cls, rfile: Readable, headers: Headers) -> RequestBody:
        """Decide the framing the way RFC 9112 §6 does, but reject the ambiguous cases.

        A request with both ``Transfer-Encoding`` and ``Content-Length`` is refused instead of
        letting one win: a test upstream should expose a proxy that sends such a request.
        """
        codings = headers.get_all("transfer-encoding")
        lengths = headers.get_all("content-length")
        if codings:
            if lengths:
                raise FramingError("both Transfer-Encoding and Content-Length are present")
            if [c.strip().lower() for c in ",".join(codings).split(",")] != ["chunked"]:
                raise FramingError("only Transfer-Encoding: chunked is supported")
            return cls(rfile, content_length=None, chunked=True)
        if lengths:
            values = {v.strip() for v in ",".join(lengths).split(",")}
            if len(values) != 1 or not is_decimal(next(iter(values))):
                raise FramingError("invalid Content-Length")
            return cls(rfile, content_length=int(values.pop()), chunked=False)
        return cls(rfile, content_length=0, chunked=False)

    @property
    def chunked(self) -> bool:
        return self._chunked

    def chunks(self) -> Iterator[bytes]:
        """The body's bytes in pieces of at most ``READ_SIZE``, continuing after earlier reads."""
        for piece in self._source:
            self.bytes_read += len(piece)
            yield piece

    def read_all(self, limit: int) -> bytes:
        """The whole body; ``ValueError`` when it exceeds ``limit`` (the rest stays unread)."""
        collected = bytearray()
        for piece in self.chunks():
            collected += piece
            if len(collected) > limit:
                raise ValueError(f"request body exceeds {limit} bytes")
        return bytes(collected)

    def drain(self) -> None:
        """Consume whatever a handler left unread, so the connection can carry a next request."""
        for _ in self.chunks():
            pass

    def _sized_pieces(self) -> Iterator[bytes]:
        remaining = self._content_length or 0
        while remaining > 0:
            piece = self._rfile.read(min(READ_SIZE, remaining))
            if not piece:
                raise FramingError("connection closed before the body was complete")
            remaining -= len(piece)
            yield piece

    def _chunked_pieces(self) -> Iterator[bytes]:
        while True:
            size = self._chunk_size_line()
            if size == 0:
                self._skip_trailers()
                return
            remaining = size
            while remaining > 0:
                piece = self._rfile.read(min(READ_SIZE, remaining))
                if not piece:
                    raise FramingError("connection closed inside a chunk")
                remaining -= len(piece)
                yield piece
            if self._read_line() != b"":
                raise FramingError("chunk data not followed by CRLF")

    def _chunk_size_line(self) -> int:
        size_text = self._read_line().split(b";", 1)[0].strip()
        if not size_text or not set(size_text) <= _HEX_DIGITS or len(size_text) > 16:
            raise FramingError("invalid chunk size line")
        return int(size_text, 16)

    def _skip_trailers(self) -> None:
        while self._read_line() != b"":
            pass

    def _read_line(self) -> bytes:
        line = self._rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE or not line.endswith(b"\n"):
            raise FramingError("missing or overlong line in chunked body")
        return line.rstrip(b"\r\n")


def is_decimal(text: str) -> bool:
    # str.isdigit() alone also accepts characters such as "²" that int() rejects.
    return text.isascii() and text.isdigit()
