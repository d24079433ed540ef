"""How the sidecar proves who it is to a token endpoint (RFC 6749 §2.3, RFC 7523, RFC 8705).

:func:`client_authentication` gives, for one token request, the header and the form parameters
of the definition's ``client_auth``. Where it differs from authlib's own methods:

* ``client_secret_basic``: RFC 6749 §2.3.1 says the client id and secret are form-urlencoded
  *before* they are joined with ``:`` and Base64-encoded. authlib joins them raw, so an id with a
  ``:`` or a secret with ``+`` or ``%`` is read differently by a conforming server.
* ``private_key_jwt`` for SMART Backend Services: the assertion must carry a ``kid`` header, expire
  within five minutes and have a fresh ``jti`` for every request (signed by authlib's RFC 7523
  helper, which is not part of its deprecated httpx integration).

* ``tls_client_auth`` / ``self_signed_tls_client_auth`` (RFC 8705): the TLS client certificate
  is the credential; the form only names the client (``client_id``), as the RFC requires.
"""

from __future__ import annotations

import base64
import time
import uuid
from urllib.parse import quote_plus

from authlib.oauth2.rfc7523 import private_key_jwt_sign
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc.jwk import ECKey, RSAKey

from sidecar.config.models import ClientAuth, SigningAlg

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART Backend Services caps the assertion's lifetime at five minutes; stay clearly below so a
# server whose clock runs a little ahead does not reject it.
ASSERTION_LIFETIME_SECONDS = 240
_MIN_RSA_BITS = 2048


class OAuthSetupError(ValueError):
    """A definition that cannot work as given (missing secret, wrong key type, ...).

    Raised when a token source is built, so a config check reports it; never names a secret.
    ``field`` is the definition's field at fault, when one is.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def basic_authorization(client_id: str, client_secret: str) -> str:
    """The ``Authorization`` header value for ``client_secret_basic`` (RFC 6749 §2.3.1)."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def client_authentication(method: ClientAuth, client_id: str, client_secret: str | None,
                          signer: PrivateKeyJwt | None
                          ) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The headers and the form parameters that authenticate one token request."""
    if method == "client_secret_basic":
        return {"Authorization": basic_authorization(client_id, client_secret or "")}, []
    if method == "client_secret_post":
        return {}, [("client_id", client_id), ("client_secret", client_secret or "")]
    if method == "private_key_jwt":
        assert signer is not None, "a private_key_jwt definition always has its signer"
        return {}, [("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", signer.assertion(client_id))]
    # tls_client_auth, self_signed_tls_client_auth: the certificate authenticates the client.
    return {}, [("client_id", client_id)]


class PrivateKeyJwt:
    """Signs a fresh client assertion for every token request (``private_key_jwt``)."""

    name = "private_key_jwt"

    def __init__(self, private_key_pem: bytes, *, alg: SigningAlg, key_id: str | None,
                 token_url: str):
        self._key = load_signing_key(private_key_pem, alg)
        self.alg = alg
        # SMART requires a kid. Without a configured one, the RFC 7638 thumbprint is the value
        # most servers derive themselves when a JWK is registered without a kid.
        self.key_id = key_id or self._key.thumbprint()
        self.token_url = token_url

    def assertion(self, client_id: str) -> str:
        now = int(time.time())
        return private_key_jwt_sign(
            self._key,
            client_id=client_id,
            token_endpoint=self.token_url,
            alg=self.alg,
            header={"typ": "JWT", "kid": self.key_id},
            claims={"jti": str(uuid.uuid4())},
            issued_at=now,
            expires_at=now + ASSERTION_LIFETIME_SECONDS,
        )

    def __repr__(self) -> str:
        return f"PrivateKeyJwt(alg={self.alg!r}, key_id={self.key_id!r})"


def load_signing_key(private_key_pem: bytes, alg: SigningAlg) -> RSAKey | ECKey:
    """Check that the key fits the algorithm; errors describe the key, never show it."""
    try:
        key = load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError):
        raise OAuthSetupError(
            "private key is not an unencrypted PEM private key (PKCS#8 or traditional)"
        ) from None
    if alg == "RS384":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise OAuthSetupError(f"signing_alg RS384 needs an RSA key, not {_kind(key)}")
        if key.key_size < _MIN_RSA_BITS:
            raise OAuthSetupError(
                f"RSA key has {key.key_size} bits; RS384 needs at least {_MIN_RSA_BITS}"
            )
        return RSAKey.import_key(key)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise OAuthSetupError(f"signing_alg ES384 needs an EC P-384 key, not {_kind(key)}")
    return ECKey.import_key(key)


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC {key.curve.name} key"
    return f"a {type(key).__name__.removeprefix('_')}"
