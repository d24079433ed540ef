"""The public half of every ``private_key_jwt`` signing key, published as a JWK Set (RFC 7517).

Each OAuth definition has up to three keys: ``current`` signs the client assertions, ``next`` is
published ahead of time so that servers caching the set already know it when it starts signing,
``previous`` stays published after a rotation. Only the public members of a key are ever copied
into a JWK: the members are picked from an allow-list, never filtered out of a private JWK.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from sidecar.config.models import OAuthDefinition, SidecarConfig
from sidecar.config.secrets import SecretError, read_secret_file

if TYPE_CHECKING:
    from sidecar.config.models import SigningAlg

Slot = Literal["current", "next", "previous"]
SLOT_FIELDS: tuple[tuple[Slot, str], ...] = (
    ("current", "private_key_file"),
    ("next", "next_private_key_file"),
    ("previous", "previous_private_key_file"),
)
JWKS_CACHE_SECONDS = 300
_PUBLIC_MEMBERS = {"RSA": ("kty", "n", "e"), "EC": ("kty", "crv", "x", "y")}


@dataclass(frozen=True)
class PublishedKey:
    """One public key of the set, with where it came from."""

    definition: str
    slot: Slot
    kid: str
    alg: SigningAlg
    public_members: tuple[tuple[str, str], ...]
    created: float  # epoch seconds: the key file's modification time

    def as_jwk(self) -> dict[str, str]:
        return {**dict(self.public_members), "kid": self.kid, "alg": self.alg, "use": "sig"}


def public_key(definition: str, slot: Slot, private_key_pem: bytes, alg: SigningAlg,
               key_id: str | None, created: float) -> PublishedKey:
    """The public part of one private key; ``kid`` is ``key_id`` or the RFC 7638 thumbprint."""
    from sidecar.credentials.client_auth import load_signing_key

    key = load_signing_key(private_key_pem, alg)
    full = key.as_dict(private=False)
    members = tuple((name, str(full[name])) for name in _PUBLIC_MEMBERS[str(full["kty"])])
    return PublishedKey(definition, slot, key_id or key.thumbprint(), alg, members, created)


def alg_for_key(private_key_pem: bytes) -> SigningAlg:
    """The signing algorithm a key of this type is published for (RS384 or ES384)."""
    from sidecar.credentials.client_auth import OAuthSetupError

    try:
        key = load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError):
        raise OAuthSetupError(
            "private key is not an unencrypted PEM private key (PKCS#8 or traditional)"
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES384"
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS384"
    raise OAuthSetupError("only RSA (RS384) and EC P-384 (ES384) keys can be published")


def definition_keys(name: str, definition: OAuthDefinition
                    ) -> tuple[list[PublishedKey], list[tuple[str, str]]]:
    """The published keys of one definition, and problems as (field, message)."""
    keys: list[PublishedKey] = []
    problems: list[tuple[str, str]] = []
    if definition.client_auth != "private_key_jwt":
        return keys, problems
    # Imported here: a sidecar without private_key_jwt never loads the OAuth client stack.
    from sidecar.credentials.client_auth import OAuthSetupError

    for slot, field_name in SLOT_FIELDS:
        path: Path | None = getattr(definition, field_name)
        if path is None:
            continue
        try:
            pem = read_secret_file(path).encode()
            # The current key signs with the configured algorithm; the others are published
            # for the algorithm their type fits, so a rotation may also change the algorithm.
            alg = definition.signing_alg if slot == "current" else alg_for_key(pem)
            key_id = definition.key_id if slot == "current" else None
            keys.append(public_key(name, slot, pem, alg, key_id, os.stat(path).st_mtime))
        except (SecretError, OAuthSetupError, OSError) as exc:
            problems.append((field_name, str(exc)))
    return keys, problems


def published_keys(config: SidecarConfig
                   ) -> tuple[tuple[PublishedKey, ...], list[tuple[str, str]]]:
    """Every definition's published keys, and problems as (field path, message).

    The same key may appear in several slots or definitions; a ``kid`` that names two different
    keys is a problem, because a server could not tell which one verifies an assertion.
    """
    keys: list[PublishedKey] = []
    problems: list[tuple[str, str]] = []
    by_kid: dict[str, PublishedKey] = {}
    for name, definition in config.oauth.items():
        found, bad = definition_keys(name, definition)
        problems += [(f"oauth.{name}.{field}", message) for field, message in bad]
        for key in found:
            seen = by_kid.setdefault(key.kid, key)
            if seen.public_members != key.public_members:
                field = dict(SLOT_FIELDS)[key.slot]
                problems.append((f"oauth.{name}.{field}",
                                 f"kid {key.kid!r} already names another key (oauth."
                                 f"{seen.definition}, slot {seen.slot}); set a different key_id"))
                continue
            keys.append(key)
    return tuple(keys), problems


def key_set(keys: Iterable[PublishedKey]) -> dict[str, Any]:
    """The JWK Set document: each distinct key once, in config order."""
    unique: dict[str, dict[str, str]] = {}
    for key in keys:
        unique.setdefault(key.kid, key.as_jwk())
    return {"keys": list(unique.values())}

