"""The large bodies the tests' upstream serves, generated one chunk at a time.

``large_body_chunks`` (``GET Binary/large``) is position dependent (each block starts with its
own index), so a proxy that drops, repeats or reorders blocks changes the digest, while
producing it needs only one pre-built block in memory whatever the size.
``large_bundle_chunks`` (``GET Bundle/large``) is a searchset of any size with an absolute
``next`` link for link rewriting.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Iterable, Iterator
from xml.sax.saxutils import escape as xml_escape

CHUNK_SIZE = 64 * 1024
_INDEX_BYTES = 8
_BLOCK_TAIL = (bytes(range(256)) * (CHUNK_SIZE // 256))[_INDEX_BYTES:]


def _pattern_blocks() -> Iterator[bytes]:
    index = 0
    while True:
        yield index.to_bytes(_INDEX_BYTES, "big") + _BLOCK_TAIL
        index += 1


def large_body_chunks(size: int, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield ``size`` bytes of the pattern; every chunk but the last is ``chunk_size`` long.

    ``chunk_size`` changes only how the bytes are cut, never the bytes themselves.
    """
    if size < 0:
        raise ValueError("size must not be negative")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    blocks = _pattern_blocks()
    buffer = bytearray()
    remaining = size
    while remaining > 0:
        wanted = min(chunk_size, remaining)
        while len(buffer) < wanted:
            buffer += next(blocks)
        yield bytes(buffer[:wanted])
        del buffer[:wanted]
        remaining -= wanted


@functools.lru_cache(maxsize=32)
def expected_sha256(size: int) -> str:
    """Hex SHA-256 of the first ``size`` bytes of the pattern (cached: tests ask repeatedly)."""
    digest = hashlib.sha256()
    for chunk in large_body_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


def large_bundle_chunks(base_url: str, size: int, chunk_size: int = 64 * 1024,
                        xml: bool = False) -> Iterator[bytes]:
    """Exactly ``size`` bytes (at least 1 KiB) of a searchset Bundle, JSON or XML, with an
    absolute ``next`` link before its entries: deterministic, built one chunk at a time
    whatever the size."""
    next_url = f"{base_url}/Bundle/large?size={size}&page=2"
    if xml:
        head = ('<Bundle xmlns="http://hl7.org/fhir"><type value="searchset"/><link>'
                '<relation value="next"/>'
                f'<url value="{xml_escape(next_url)}"/></link>').encode()
        tail = b"</Bundle>"
    else:
        head = ('{"resourceType":"Bundle","type":"searchset","link":[{"relation":"next",'
                f'"url":"{next_url}"}}],"entry":[').encode()
        tail = b"]}"
    if size < len(head) + len(tail) + 512:
        raise ValueError("size is too small for a bundle")
    remaining = size - len(head) - len(tail)
    buffer = bytearray(head)
    index = 0
    while True:
        if xml:
            entry = (f'<entry><fullUrl value="{base_url}/Patient/big-{index}"/><resource>'
                     f'<Patient><id value="big-{index}"/></Patient></resource></entry>').encode()
        else:
            entry = (("," if index else "") + f'{{"fullUrl":"{base_url}/Patient/big-{index}",'
                     f'"resource":{{"resourceType":"Patient","id":"big-{index}"}}}}').encode()
        if len(entry) > remaining:
            break
        buffer += entry
        remaining -= len(entry)
        index += 1
        while len(buffer) >= chunk_size:
            yield bytes(buffer[:chunk_size])
            del buffer[:chunk_size]
    buffer += b" " * remaining + tail  # whitespace fills the rest exactly
    while buffer:
        yield bytes(buffer[:chunk_size])
        del buffer[:chunk_size]


def gzip_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` gzip-coded on the fly."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for chunk in chunks:
        packed = packer.compress(chunk)
        if packed:
            yield packed
    yield packer.flush()
