"""Where a Bundle's ``entry`` list ends, found without reading the entries.

A searchset page is a few hundred bytes of Bundle fields and links followed by megabytes of
entries. :mod:`sidecar.links` tokenizes the Bundle fields and links in Python, which is cheap
when it stops there; these functions let it jump from the start of the top-level ``entry`` list
to its end using only C-speed byte searches. They answer ``None`` whenever the jump could miss
something the full scan would rewrite, and the caller then scans everything:

- a nested Bundle inside the entries (a ``"Bundle"`` string or ``Bundle`` element name, also
  spelled with JSON escapes) -- its own links would be rewritten;
- an ``entry`` list that is not the last member of the Bundle (JSON: the body must end with
  ``]`` and ``}``) or is not closed by the last ``</entry>`` before ``</Bundle>`` (XML).

Every check here is a ``memchr``-class byte search: even a full pass over a 400 KB page at
general substring-search speed (~0.2 ms) would cost more than the rest of the proxying, so
multi-byte needles are found through their rarest first byte.

What a jump does not check is the grammar inside the entries: a body whose entries are broken
(or cut off exactly where a nested list and object end) still gets its Bundle links rewritten,
where the full scan would have left the whole body alone. Everything before and after the
entries is still tokenized, so a body that is not a Bundle with a proper head and end is never
touched.
"""

from __future__ import annotations

import re

_JSON_BLANKS = b" \t\r\n"
# A JSON \u escape of one of the letters of "Bundle": such a string could spell it.
_ESCAPED_BUNDLE_LETTER = re.compile(rb"\\u00(?:42|62|75|55|6[eE]|4[eE]|64|44|6[cC]|4[cC]|65|45)")
_XML_ENTRY_CLOSE = re.compile(rb"</(?:[^\s/>!?:]+:)?entry\s*>")


def _last_non_blank(content: bytes, end: int) -> int:
    """Index of the last byte before ``end`` that is not JSON whitespace (-1 if none)."""
    index = end - 1
    while index >= 0 and content[index] in _JSON_BLANKS:
        index -= 1
    return index


def json_entries_end(content: bytes, start: int) -> int | None:
    """For the ``[`` of a top-level ``entry`` at ``start``: the index of its closing ``]``.

    The list must be the last member: the body ends with ``] }`` (blanks allowed).
    """
    close_object = _last_non_blank(content, len(content))
    if close_object <= start or content[close_object] != ord("}"):
        return None
    close_list = _last_non_blank(content, close_object)
    if close_list <= start or content[close_list] != ord("]"):
        return None
    if contains(content, b'"Bundle"', start, close_list):
        return None
    if content.find(b"\\", start, close_list) >= 0 \
            and _ESCAPED_BUNDLE_LETTER.search(content, start, close_list) is not None:
        return None
    return close_list


def xml_entries_end(content: bytes, start: int) -> int | None:
    """After the start tag of the first ``<entry>`` of the root Bundle (``start`` is just past
    it): where the last ``</entry>`` begins.

    FHIR's XML schema puts every ``link`` before the first ``entry``; a ``link`` between two
    entries is not looked for.
    """
    root_close = content.rfind(b"Bundle", start)  # in </Bundle>, unless something follows it
    if root_close < 0:
        return None
    close = content.rfind(b"entry", start, root_close)
    while close >= 0:
        tag_start = content.rfind(b"</", start, close)
        if tag_start < 0:
            return None
        match = _XML_ENTRY_CLOSE.match(content, tag_start)
        if match is not None and match.end() > close:
            break
        close = content.rfind(b"entry", start, close)
    else:
        return None
    if contains(content, b"Bundle", start, tag_start):
        return None
    return tag_start


def contains(content: bytes, needle: bytes, start: int, end: int, rare: bytes = b"B",
             tries: int = 32) -> bool:
    """``needle in content[start:end]``, found by ``memchr`` on its rare byte ``rare``.

    Falls back to a plain substring search when ``rare`` turns out not to be rare here.
    """
    offset = needle.index(rare)
    index = content.find(rare, start + offset, end)
    for _ in range(tries):
        if index < 0:
            return False
        if content.startswith(needle, index - offset, end):
            return True
        index = content.find(rare, index + 1, end)
    return index >= 0 and content.find(needle, index - offset, end) >= 0
