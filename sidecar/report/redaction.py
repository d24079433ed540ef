"""The one redactor for every text from outside the sidecar that it shows anywhere.

Token endpoints, discovery documents and gateways in front of them sometimes echo the request
they refused -- its ``Authorization`` header, its form body -- in their error answer. Those answers
are quoted in log lines, the 503 ``OperationOutcome``, ``/readyz?verbose=1``, the admin API, the
dashboard and ``check --online``. Every such text passes :meth:`Redactor.scrub`, which removes

* every known secret in each form it can take on the wire: raw, URL-encoded (``quote`` and
  ``quote_plus``), JSON- and HTML-escaped, and inside the Base64 of ``id:secret`` (HTTP Basic,
  ``client_secret_basic``; standard and URL-safe alphabet, with and without padding);
* anything JWT-shaped (a signed client assertion is a credential of its own; so is a token);
* ``Basic``/``Bearer`` credentials and PEM private keys, whoever's they are;

and caps the length, after redacting, so a cut never leaves part of a secret behind.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
MAX_SHOWN_CHARS = 300
ELLIPSIS = "..."

# A private-use character stands in for removed text until the end, so a later pass cannot
# match inside the marker (a one-letter secret would otherwise eat "[redacted]" itself).
_MARK = "\ue000"
_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL)
_AUTH_SCHEME_VALUE = re.compile(r"\b(Basic|Bearer|DPoP)(\s+)([A-Za-z0-9+/=._~%-]{8,})",
                                re.IGNORECASE)
_PLAIN_WORD = re.compile(r"[A-Za-z][a-z]*")  # "Basic authentication" names a scheme, no value


def _credential_value(match: re.Match[str]) -> str:
    value = match.group(3)
    if _PLAIN_WORD.fullmatch(value):
        return match.group(0)
    return f"{match.group(1)}{match.group(2)}{_MARK}"


def printable(text: str) -> str:
    """One line: control characters become spaces, runs of white space one space."""
    return " ".join("".join(c if c.isprintable() or c == _MARK else " " for c in text).split())


def secret_forms(secret: str) -> set[str]:
    """How one secret can appear in an echoed request or in text derived from it."""
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret, safe=""),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        html.escape(secret),
        html.escape(secret, quote=False),
        printable(secret),
    }
    forms |= _base64_forms(secret.encode("utf-8"))
    return {form for form in forms if form}


def pair_forms(identity: str, secret: str) -> set[str]:
    """The Base64 forms of ``identity:secret``: HTTP Basic and ``client_secret_basic``.

    RFC 6749 §2.3.1 URL-encodes both parts before joining them; plain HTTP Basic does not.
    Either may be echoed, so both are known.
    """
    joined = {
        f"{identity}:{secret}",
        f"{quote_plus(identity, safe='')}:{quote_plus(secret, safe='')}",
        f"{quote(identity, safe='')}:{quote(secret, safe='')}",
    }
    forms: set[str] = set()
    for pair in joined:
        forms |= _base64_forms(pair.encode("utf-8"))
    return forms


def _base64_forms(data: bytes) -> frozenset[str]:
    standard = base64.b64encode(data).decode("ascii")
    urlsafe = base64.urlsafe_b64encode(data).decode("ascii")
    return frozenset({standard, standard.rstrip("="), urlsafe, urlsafe.rstrip("=")})


class Redactor:
    """Knows a set of secrets; :meth:`scrub` makes any text safe to show. Immutable."""

    def __init__(self, secrets: Iterable[str | None] = (),
                 pairs: Iterable[tuple[str, str | None]] = ()):
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms |= secret_forms(secret)
        for identity, secret in pairs:
            if secret:
                forms |= secret_forms(secret) | pair_forms(identity, secret)
        self._forms = frozenset(forms)

    @functools.cached_property
    def _known(self) -> re.Pattern[str] | None:
        # Compiled on first use: most snapshots never have anything to scrub.
        ordered = sorted(self._forms, key=len, reverse=True)  # a longer form goes whole
        return re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def scrub(self, text: str, limit: int = MAX_SHOWN_CHARS) -> str:
        """``text`` without any known secret or credential-shaped part, on one line, capped."""
        text = self._remove_known(text)
        text = printable(text)  # a secret with odd white space is also known collapsed
        text = self._remove_known(text)
        text = _PEM_PRIVATE_KEY.sub(_MARK, text)
        text = _JWT_LIKE.sub(_MARK, text)
        text = _AUTH_SCHEME_VALUE.sub(_credential_value, text)
        text = re.sub(f"{_MARK}+", _MARK, text).replace(_MARK, REDACTED)
        if len(text) > limit:
            text = text[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS
        return text

    def _remove_known(self, text: str) -> str:
        return self._known.sub(_MARK, text) if self._known is not None else text

    def __repr__(self) -> str:
        return f"Redactor({len(self._forms)} forms)"


GENERIC = Redactor()
"""Knows no secret; still removes JWT-shaped text, credentials and private keys, and caps."""
