"""Workload tokens: JWTs a platform issues to apps (Kubernetes projected ServiceAccount
tokens, SPIFFE JWT-SVIDs, OIDC workload identities), verified against their issuer's keys.

The signature (asymmetric algorithms only), ``iss``, ``aud``, ``exp`` and ``nbf`` are checked
with a small clock skew; the subject is what ``allowed_callers`` names. A verified token is
remembered until it expires, so a keep-alive app pays for one verification per token, not
per request (bench/README.md, "Caller tokens").
"""

from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

# Public-key signatures only: an HMAC key would be a secret the issuer shares with us, and
# "none" is no signature at all.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
              "ES256", "ES384", "ES512", "EdDSA")
CLOCK_SKEW_SECONDS = 60
CACHE_ENTRIES = 4096
MAX_TOKEN_CHARS = 16384


class KeySource(Protocol):
    def cached(self) -> KeySet | None: ...

    def wants_refresh(self, unknown_kid: bool) -> bool: ...

    async def refresh(self) -> None: ...


class TokenRefused(Exception):
    """Why a token is not accepted, in plain words; never the token or a claim's value
    beyond the names the config holds."""


class KeysNeeded(Exception):
    """The key set must be fetched (or fetched again) before this token can be judged."""


@dataclass(frozen=True)
class Caller:
    definition: str
    subject: str

    @property
    def name(self) -> str:
        """As ``allowed_callers`` and the request log write it."""
        return f"{self.definition}:{self.subject}"


def unverified_issuer(token: str) -> str | None:
    """The ``iss`` a JWT claims, unverified: only to choose which definition verifies it."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    issuer = payload.get("iss") if isinstance(payload, dict) else None
    return issuer if isinstance(issuer, str) else None


class CallerVerifier:
    """Verifies the tokens of one caller definition."""

    def __init__(self, name: str, issuer: str, audience: str, keys: KeySource,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.issuer = issuer
        self.audience = audience
        self.keys = keys
        self._clock = clock
        self._claims = jwt.JWTClaimsRegistry(
            leeway=CLOCK_SKEW_SECONDS,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
            sub={"essential": True})
        # token -> (caller, expiry): verified tokens, until they expire.
        self._verified: OrderedDict[str, tuple[Caller, float]] = OrderedDict()

    def cached(self, token: str) -> Caller | None:
        """The caller of a token this verifier verified and that has not expired."""
        known = self._verified.get(token)
        if known is None:
            return None
        caller, expires = known
        if self._clock() <= expires + CLOCK_SKEW_SECONDS:
            return caller
        del self._verified[token]
        return None

    def verify(self, token: str) -> Caller:
        """The caller the token proves, or :class:`TokenRefused` / :class:`KeysNeeded`."""
        known = self.cached(token)
        if known is not None:
            return known
        keys = self.keys.cached()
        if keys is None:
            raise KeysNeeded()
        try:
            decoded = jwt.decode(token, keys, algorithms=list(ALGORITHMS))
        except InvalidKeyIdError:
            if self.keys.wants_refresh(unknown_kid=True):
                raise KeysNeeded() from None
            raise TokenRefused("it is signed with a key the issuer does not publish") from None
        except JoseError as exc:
            raise TokenRefused(f"it is not a valid signed token ({exc.error})") from None
        except (ValueError, TypeError):
            raise TokenRefused("it is not a valid signed token") from None
        try:
            self._claims.validate(decoded.claims)
        except JoseError as exc:
            raise TokenRefused(_claim_problem(exc)) from None
        subject = decoded.claims["sub"]
        expires = decoded.claims["exp"]
        if not isinstance(subject, str) or not subject or not isinstance(expires, int | float):
            raise TokenRefused("its sub or exp claim is malformed")
        caller = Caller(self.name, subject)
        self._verified[token] = (caller, float(expires))
        if len(self._verified) > CACHE_ENTRIES:
            self._verified.popitem(last=False)
        return caller


def _claim_problem(exc: JoseError) -> str:
    # joserfc's fixed words name the claim, never its value.
    if exc.error == "expired_token":
        return "it has expired"
    return f"its claims are not accepted: {exc.description or exc.error}"
