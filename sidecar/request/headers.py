"""Request headers that must never be forwarded: the bytes that split or smuggle requests.

The sidecar re-sends an app's headers to an upstream next to the credentials it adds. A bare
CR in a value (``X-N: a\\rAuthorization: Bearer APP``) is a line break to some servers: the
app would choose the credentials, or smuggle a whole second request that carries the
sidecar's. So a request is refused (400, nothing sent upstream) when a header has

- a name that is not an RFC 9110 token;
- CR, LF, NUL or any other control character except HTAB in its value;
- an obs-fold (a line continued on the next by leading whitespace, RFC 9112 §5.2), which
  mitmproxy has already joined into the value with ``\\r\\n``.

This module has no mitmproxy import: it reads header fields as ``(name, value)`` bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# RFC 9110 §5.6.2: token = 1*tchar.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: a field value holds visible characters, obs-text, SP and HTAB only.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_OBS_FOLD = re.compile(rb"\r\n[ \t]")
_CHARACTER_NAMES = {0x00: "a NUL byte", 0x0A: "a line feed (LF)", 0x0D: "a carriage return (CR)"}
_NAME_QUOTE_LIMIT = 40


def header_problem(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why these header fields cannot be forwarded, in plain words; ``None`` if they can.

    The words name the header but never quote its value (it may be a credential).
    """
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return f"the header name {_quote_name(name)} is not a valid HTTP token"
        if _CONTROL.search(value) is None:
            continue
        label = name.decode("ascii")
        if _OBS_FOLD.search(value):
            return (f"the header {label} is folded over several lines (obs-fold), "
                    "which HTTP/1.1 no longer allows")
        found = _CONTROL.search(value)
        assert found is not None
        return f"the value of the header {label} contains {_character(found.group()[0])}"
    return None


def _character(code: int) -> str:
    return _CHARACTER_NAMES.get(code, f"the control character 0x{code:02x}")


def _quote_name(name: bytes) -> str:
    shown = name[:_NAME_QUOTE_LIMIT].decode("latin-1")
    text = "".join(c if c.isprintable() and c.isascii() else f"\\x{ord(c):02x}" for c in shown)
    if len(name) > _NAME_QUOTE_LIMIT:
        text += "..."
    return f"'{text}'"


# -- hop-by-hop fields (RFC 9110 §7.6.1) -----------------------------------------------------------

# Fields that belong to one connection, whether or not the app named them in ``Connection``.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "upgrade", "http2-settings"})
# Named in ``Connection``, these still stay: the sidecar forwards the message as mitmproxy
# framed and addressed it, so removing them would change where its body ends (a second,
# smuggled request) or where it goes, not just drop a hint.
_NEVER_REMOVED = frozenset({"content-length", "transfer-encoding", "host"})
_PERSISTENT_VERSIONS = frozenset({"HTTP/1.1", "HTTP/2.0"})


def connection_options(values: Iterable[str]) -> frozenset[str]:
    """The options of ``Connection`` header values, lower case (``close``, ``X-Hop``)."""
    return frozenset(token.strip().lower() for value in values for token in value.split(",")
                     if token.strip())


def hop_by_hop_fields(options: frozenset[str]) -> frozenset[str]:
    """The header names (lower case) not to forward, given the app's ``Connection`` options."""
    return (HOP_BY_HOP | options) - _NEVER_REMOVED


def persistence_option(http_version: str, options: frozenset[str]) -> str | None:
    """The sidecar's own ``Connection`` option for the forwarded request: ``close`` when the
    app's connection ends after this request, ``keep-alive`` when an HTTP/1.0 app keeps it.

    RFC 9110 §7.6.1 lets an intermediary replace ``Connection`` with its own options. These
    two keep both connections' persistence as it was (the app's and the upstream's, which
    mitmproxy decides from the same request); nothing the app named is passed on.
    """
    if "close" in options:
        return "close"
    if "keep-alive" in options and http_version not in _PERSISTENT_VERSIONS:
        return "keep-alive"
    return None
