"""Where a Bundle's ``entry`` list ends, found without reading the entries.

A searchset page is a few hundred bytes of Bundle fields and links followed by megabytes of
entries. :mod:`sidecar.fhir.links` tokenizes the Bundle fields and links in Python, which is cheap
when it stops there; these functions let it jump from the start of the top-level ``entry`` list
to its end using only C-speed byte searches. They answer ``None`` whenever the jump could miss
something the full scan would rewrite, and the caller then scans everything:

- a nested Bundle inside the entries (a ``"Bundle"`` string or ``Bundle`` element name, also
  spelled with JSON escapes) -- its own links would be rewritten;
- an ``entry`` list that is not the last member of the Bundle (JSON: the body must end with
  ``]`` and ``}``) or is not closed by the last ``</entry>`` before ``</Bundle>`` (XML).

The fast JSON path also finds the file URLs of a Bulk Data manifest (see
:data:`MANIFEST_FILE_LISTS`): a small top-level object, parsed member by member in C.

Every check here is a ``memchr``-class byte search: even a full pass over a large page at
general substring-search speed would cost more than the rest of the proxying, so
multi-byte needles are found through their rarest first byte.

What a jump does not check is the grammar inside the entries: a body whose entries are broken
(or cut off exactly where a nested list and object end) still gets its Bundle links rewritten,
where the full scan would have left the whole body alone. Everything before and after the
entries is still tokenized, so a body that is not a Bundle with a proper head and end is never
touched.
"""

from __future__ import annotations

import json
import re

_JSON_BLANKS = b" \t\r\n"

# A Bulk Data export manifest (the answer of a completed export's status URL) is a JSON object,
# not a FHIR resource (no ``resourceType``), with string members ``transactionTime`` and
# ``request`` and an ``output`` array. The ``url`` of each element of its ``output`` and
# ``error`` arrays names an NDJSON file; nothing else in it is a link.
MANIFEST_STRING_KEYS = {"transactionTime": 1, "request": 2}
MANIFEST_OUTPUT_KEY = "output"
MANIFEST_OUTPUT_BIT = 4
MANIFEST_COMPLETE = 7
MANIFEST_FILE_LISTS = frozenset({"output", "error"})
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
    if may_hold_json_bundle(content, start, close_list):
        return None
    return close_list


def may_hold_json_bundle(content: bytes, start: int, end: int) -> bool:
    """Whether ``content[start:end]`` may contain the string ``"Bundle"`` (also escaped)."""
    if contains(content, b'"Bundle"', start, end):
        return True
    return content.find(b"\\", start, end) >= 0 \
        and _ESCAPED_BUNDLE_LETTER.search(content, start, end) is not None


def json_top_level_link_urls(content: bytes) -> list[tuple[int, int]] | None:
    """Spans of the string tokens of the top-level Bundle's ``link[].url`` (or of a
    manifest's ``output[].url`` and ``error[].url``), found with CPython's C JSON scanner:
    other members are skipped by parsing them in C, ``entry`` by :func:`json_entries_end`.

    ``None`` when that is not certain to agree with the full tokenizer of
    :mod:`sidecar.fhir.links`: anything that is not strict JSON, a member that may hold a Bundle
    of its own, duplicate-looking shapes. The caller then tokenizes.
    """
    entry = _JSON_ENTRY_KEY.search(content)
    head_end = entry.end() if entry is not None else len(content)
    # latin-1: one character per byte, so indexes into ``text`` are byte offsets.
    text = content[:head_end].decode("latin-1")
    try:
        return _top_level_link_urls(content, text)
    except (_NotCertain, ValueError, StopIteration, IndexError):
        return None


_JSON_ENTRY_KEY = re.compile(rb'"entry"[ \t\r\n]*:[ \t\r\n]*\[')
# One C call per member: blanks, the key, the colon, blanks. Then one for what follows it.
_MEMBER = re.compile(r'[ \t\r\n]*"((?:[^"\\]|\\.)*)"[ \t\r\n]*:[ \t\r\n]*', re.DOTALL)
_AFTER_VALUE = re.compile(r"[ \t\r\n]*([,}\]])")
_OPEN = re.compile(r"[ \t\r\n]*([{\[])[ \t\r\n]*")
_EMPTY_ARRAY_END = re.compile(r"[ \t\r\n]*\]")
_SCAN_VALUE = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


class _NotCertain(Exception):
    pass


def _key(match: re.Match[str]) -> str:
    key = match.group(1)
    return key if "\\" not in key else str(json.loads(f'"{key}"'))


def _after_value(text: str, index: int) -> tuple[str, int]:
    match = _AFTER_VALUE.match(text, index)
    if match is None:
        raise _NotCertain
    return match.group(1), match.end()


def _top_level_link_urls(content: bytes, text: str) -> list[tuple[int, int]] | None:
    opened = _OPEN.match(text, 0)
    if opened is None or opened.group(1) != "{":
        return None
    index = opened.end()
    resource_type = None
    link_seen = False
    found: list[tuple[int, int]] = []
    files: list[tuple[int, int]] = []
    manifest = 0
    closer, after = _after_value(text, index) if text[index:index + 1] == "}" else ("", 0)
    while closer != "}":
        member = _MEMBER.match(text, index)
        if member is None:
            return None
        key, index = _key(member), member.end()
        first = text[index]
        if key == "link" and first == "[":
            index = _link_array(content, text, index + 1, found)
            link_seen = True
        elif key in MANIFEST_FILE_LISTS and first == "[":
            index = _link_array(content, text, index + 1, files)
            if key == MANIFEST_OUTPUT_KEY:
                manifest |= MANIFEST_OUTPUT_BIT
        elif key == "entry" and first == "[" and index == len(text) - 1:
            if not link_seen or resource_type is None:
                return None  # they may follow the entries
            if json_entries_end(content, index) is None:
                return None
            return _checked(content, index, resource_type, found, [])  # only "] }" follows
        else:
            value, end = _SCAN_VALUE(text, index)
            if key == "resourceType":
                resource_type = value
            elif key in MANIFEST_STRING_KEYS and isinstance(value, str):
                manifest |= MANIFEST_STRING_KEYS[key]
            index = end
        closer, after = _after_value(text, index)
        if closer == "]":
            return None
        index = after
    if _last_non_blank(content, len(content)) != after - 1:
        return None  # more after the top-level object: not one JSON document
    is_manifest = resource_type is None and manifest == MANIFEST_COMPLETE
    return _checked(content, after, resource_type, found, files if is_manifest else [])


def _checked(content: bytes, end: int, resource_type: object, found: list[tuple[int, int]],
             files: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """``found`` (if the top level is a Bundle) and ``files`` (a manifest's file URLs), if
    nothing in ``content[:end]`` but the top-level ``resourceType`` may be a Bundle (the full
    tokenizer would rewrite a nested Bundle's links too); else ``None``."""
    own = 1 if resource_type == "Bundle" else 0
    if content.count(b'"Bundle"', 0, end) > own:
        return None
    if content.find(b"\\", 0, end) >= 0 \
            and _ESCAPED_BUNDLE_LETTER.search(content, 0, end) is not None:
        return None
    return (found if own else []) + files


def _link_array(content: bytes, text: str, index: int, found: list[tuple[int, int]]) -> int:
    """Parse the ``link`` array from just past its ``[``; add its elements' ``url`` spans."""
    empty = _EMPTY_ARRAY_END.match(text, index)
    if empty is not None:
        return empty.end()
    while True:
        opened = _OPEN.match(text, index)
        if opened is not None and opened.group(1) == "{":
            index = _link_object(content, text, opened.end(), found)
        else:
            _, index = _SCAN_VALUE(text, index)
        closer, index = _after_value(text, index)
        if closer == "]":
            return index
        if closer != ",":
            raise _NotCertain


def _link_object(content: bytes, text: str, index: int, found: list[tuple[int, int]]) -> int:
    if text[index] == "}":
        return index + 1
    while True:
        member = _MEMBER.match(text, index)
        if member is None:
            raise _NotCertain
        key, start = _key(member), member.end()
        _, index = _SCAN_VALUE(text, start)
        if key == "url" and text[start] == '"':
            found.append((start, index))
        closer, index = _after_value(text, index)
        if closer == "}":
            return index
        if closer != ",":
            raise _NotCertain


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
    if end - start < 4096:  # small: one plain search costs less than the detour
        return content.find(needle, start, end) >= 0
    offset = needle.index(rare)
    index = content.find(rare, start + offset, end)
    for _ in range(tries):
        if index < 0:
            return False
        if content.startswith(needle, index - offset, end):
            return True
        index = content.find(rare, index + 1, end)
    return index >= 0 and content.find(needle, index - offset, end) >= 0
