"""The deterministic large body served by ``GET Binary/large`` and how to check it.

The pattern is position dependent (each block starts with its own index), so a proxy that
drops, repeats or reorders blocks changes the digest, while producing it needs only one
pre-built block in memory whatever the size.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator

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
