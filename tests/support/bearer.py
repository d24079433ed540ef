"""What a FHIR server checks about a bearer token, as an ``auth=`` callable for FhirTestServer.

``BearerValidator(jwks, audience=...)(headers)`` returns ``None`` for a token the provider signed
that has not expired and is meant for this audience, and otherwise a short text saying why it is
refused (the test server puts it into its 401 OperationOutcome).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError
from joserfc.jwk import KeySet

_ALGORITHMS = ["RS256", "RS384", "PS256", "ES256", "ES384"]


class BearerValidator:
    def __init__(self, jwks: Mapping[str, Any], *, audience: str, issuer: str | None = None,
                 leeway_seconds: int = 0):
        self._keys = KeySet.import_key_set(dict(jwks))  # type: ignore[arg-type]
        self.audience = audience
        self.issuer = issuer
        options: dict[str, Any] = {
            "exp": {"essential": True},
            "aud": {"essential": True, "value": audience},
        }
        if issuer is not None:
            options["iss"] = {"essential": True, "value": issuer}
        self._claims = jwt.JWTClaimsRegistry(leeway=leeway_seconds, **options)

    def __call__(self, headers: Any) -> str | None:
        value = _header(headers, "authorization")
        if value is None:
            return "no Authorization header"
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Authorization is not a Bearer token"
        return self.validate(token.strip())

    def validate(self, token: str) -> str | None:
        try:
            decoded = jwt.decode(token, self._keys, algorithms=_ALGORITHMS)
        except JoseError as exc:
            return f"invalid token: {exc.error}"
        except ValueError:
            return "invalid token: not a JWT"
        try:
            self._claims.validate(decoded.claims)
        except ExpiredTokenError:
            return "invalid token: expired"
        except JoseError as exc:
            return f"invalid token: {exc.description or exc.error}"
        return None


def _header(headers: Any, name: str) -> str | None:
    """Case-insensitive lookup in any mapping (or list of pairs) of headers."""
    items = headers.items() if hasattr(headers, "items") else headers
    for key, value in items:
        key_text = key.decode("latin-1") if isinstance(key, bytes) else str(key)
        if key_text.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None
