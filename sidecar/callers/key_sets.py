"""Where a caller definition's public keys come from: a JWK Set file, or a JWK Set URL.

A file is read when the snapshot is compiled, like every other file the config names, so a
rotated file is a reload like any other (the file watcher sees it). A URL is fetched when a
request first needs it, again in the background once the keys are 10 minutes old, and at once
(at most once a minute) for a token signed with a key it does not know: an issuer that rotates
its keys publishes the new one before it signs with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from sidecar.config.secrets import SecretError, read_secret_file
from sidecar.report.logs import log_event
from sidecar.tls.policy import UpstreamTlsPolicy

REFRESH_SECONDS = 600.0
UNKNOWN_KID_INTERVAL_SECONDS = 60.0
FETCH_TIMEOUT_SECONDS = 10.0
MAX_KEY_SET_BYTES = 1 << 20
# Key types that verify signatures with a public key; "oct" (a shared secret) never does here.
PUBLIC_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})


class KeySetError(ValueError):
    """A key set that cannot be used, in plain words (never a key's material)."""


def parse_key_set(data: bytes, source: str) -> KeySet:
    """A JWK Set of public keys, or :class:`KeySetError`. Private members are dropped, and a
    set with a symmetric key is refused: whoever could read it could sign tokens."""
    if len(data) > MAX_KEY_SET_BYTES:
        raise KeySetError(f"{source} is larger than {MAX_KEY_SET_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise KeySetError(f"{source} is not JSON (a JWK Set: {{\"keys\": [...]}})") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys:
        raise KeySetError(f"{source} has no keys (a JWK Set: {{\"keys\": [...]}})")
    public: list[dict[str, Any]] = []
    for index, key in enumerate(keys):
        if not isinstance(key, dict) or key.get("kty") not in PUBLIC_KEY_TYPES:
            kind = key.get("kty") if isinstance(key, dict) else None
            raise KeySetError(f"{source}: key {index} is not a public RSA, EC or OKP key "
                              f"(kty {kind!r}); only asymmetric keys verify workload tokens")
        public.append({k: v for k, v in key.items() if k not in ("d", "p", "q", "dp", "dq",
                                                                 "qi", "k", "oth")})
    try:
        return KeySet.import_key_set({"keys": public})
    except (JoseError, ValueError, TypeError) as exc:
        raise KeySetError(f"{source}: a key cannot be read ({type(exc).__name__})") from None


def read_key_set_file(path: Path) -> KeySet:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeySetError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_key_set(data, str(path))


class StaticKeys:
    """Keys read from a file when the snapshot was compiled."""

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys

    def cached(self) -> KeySet | None:
        return self._keys

    def wants_refresh(self, unknown_kid: bool) -> bool:
        return False

    async def refresh(self) -> None:
        return None


class FetchedKeys:
    """Keys fetched from a JWK Set URL, kept between reloads while its settings stay."""

    def __init__(self, name: str, url: str, tls: UpstreamTlsPolicy,
                 bearer_token_file: Path | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.url = url
        self._tls = tls
        self._bearer_token_file = bearer_token_file
        self._clock = clock
        self._keys: KeySet | None = None
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._unknown_kid_at: float | None = None  # the last fetch an unknown kid asked for
        self._fetch: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def spec(self) -> tuple[object, ...]:
        """What decides whether a reload may keep this object (and its keys)."""
        return (self.url, self._tls, self._bearer_token_file)

    def cached(self) -> KeySet | None:
        return self._keys

    def wants_refresh(self, unknown_kid: bool) -> bool:
        """Whether a request should trigger a fetch: no keys yet, keys 10 minutes old, or
        (``unknown_kid``) a token signed with a key not in the set, at most once a minute."""
        now = self._clock()
        if self._fetch is not None and not self._fetch.done():
            return True
        if self._keys is None or self._attempted_at is None:
            return True
        if unknown_kid:
            if (self._unknown_kid_at is not None
                    and now - self._unknown_kid_at < UNKNOWN_KID_INTERVAL_SECONDS):
                return False
            self._unknown_kid_at = now
            return True
        return now - self._attempted_at >= REFRESH_SECONDS

    def refresh_in_background(self) -> None:
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.get_running_loop().create_task(self._run_fetch())

    async def refresh(self) -> None:
        """One fetch at a time; waiters share it. Failures keep the keys that were there."""
        self.refresh_in_background()
        assert self._fetch is not None
        await asyncio.shield(self._fetch)

    async def _run_fetch(self) -> None:
        self._attempted_at = self._clock()
        try:
            data = await self._download()
            keys = parse_key_set(data, f"the key set at {self.url}")
        except (KeySetError, OSError, SecretError) as exc:
            self.last_error = str(exc)
            log_event("caller_keys_failed", logging.WARNING,
                      f"callers.{self.name}.jwks_url: {exc}")
            return
        self._keys, self._fetched_at, self.last_error = keys, self._clock(), None
        log_event("caller_keys_fetched", caller=self.name, keys=len(keys.keys))

    async def _download(self) -> bytes:
        import httpx  # only sidecars with a jwks_url load the HTTP client

        headers = {"Accept": "application/jwk-set+json, application/json"}
        if self._bearer_token_file is not None:
            # Re-read at every fetch: projected ServiceAccount tokens rotate by the hour.
            headers["Authorization"] = f"Bearer {read_secret_file(self._bearer_token_file)}"
        try:
            async with httpx.AsyncClient(verify=self._tls.stdlib_context(), trust_env=False,
                                         timeout=FETCH_TIMEOUT_SECONDS) as client:
                response = await client.get(self.url, headers=headers)
        except httpx.HTTPError as exc:
            raise OSError(f"fetching the key set failed ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise OSError(f"the key set URL answered {response.status_code}")
        return response.content
