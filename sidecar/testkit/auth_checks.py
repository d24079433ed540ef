"""Credential checks a test upstream can enforce.

A check gets the request headers and returns ``None`` when the request is authorized, else a
short reason that ends up in the 401 OperationOutcome. Reasons never repeat what was sent.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Mapping

AuthCheck = Callable[[Mapping[str, str]], str | None]


def basic_auth_check(username: str, password: str) -> AuthCheck:
    """Accept exactly ``Authorization: Basic base64(utf8(username ":" password))``."""
    expected = f"{username}:{password}".encode()

    def check(headers: Mapping[str, str]) -> str | None:
        value = _header(headers, "authorization")
        if value is None:
            return "missing Authorization header"
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return "Authorization scheme is not Basic"
        try:
            presented = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return "Basic credentials are not valid base64"
        # Constant-time comparison: a test server is still no place to teach timing leaks.
        if not hmac.compare_digest(presented, expected):
            return "invalid username or password"
        return None

    return check


def bearer_token_check(accepted: Callable[[str], bool]) -> AuthCheck:
    """Accept ``Authorization: Bearer <token>`` when ``accepted(token)`` is true."""

    def check(headers: Mapping[str, str]) -> str | None:
        value = _header(headers, "authorization")
        if value is None:
            return "missing Authorization header"
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Authorization scheme is not Bearer"
        return None if accepted(token.strip()) else "invalid or expired bearer token"

    return check


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Headers may be a plain dict (any spelling) or the server's case-insensitive mapping.
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None
