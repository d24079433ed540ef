"""Who may change the configuration: the holder of the admin token (``admin.token_file``).

API clients send ``Authorization: Bearer <token>``. A browser logs in once with the token and
gets a random session id in an HttpOnly, SameSite=Strict cookie; each session has its own CSRF
token that every form must carry. Comparisons are constant-time. Failed attempts (logins and
bearer tokens) are slowed down per client address: after each failure that address must wait a
doubling delay before its next attempt is even considered. The delay is short and bounded
(at most ``MAX_DELAY_SECONDS``), because every local client shares the address 127.0.0.1: one
wrong token must not lock the other local admin clients out for long.

The token is re-read on every check, so rotating the token file takes effect at once (and ends
the sessions made with the old token). Nothing here logs or returns a token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.config.secrets import SecretError, read_secret_file

SESSION_COOKIE = "fhir_sidecar_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000
FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 5.0
FORGET_AFTER_SECONDS = 300.0  # a client quiet this long after its last failure starts afresh
MAX_TRACKED_CLIENTS = 10_000


@dataclass(frozen=True)
class Session:
    csrf: str
    token_digest: bytes  # which admin token the session was made with
    expires_at: float


class Throttle:
    """Per-client exponential delay after failed attempts; a success clears it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (count, next allowed at)

    def wait_seconds(self, client: str) -> float:
        """How long ``client`` must still wait before another attempt (0: may try now)."""
        entry = self._failures.get(client)
        return 0.0 if entry is None else max(0.0, entry[1] - self._clock())

    def failed(self, client: str) -> None:
        count, allowed_at = self._failures.get(client, (0, 0.0))
        if self._clock() - allowed_at > FORGET_AFTER_SECONDS:
            count = 0
        count += 1
        delay = min(FIRST_DELAY_SECONDS * 2 ** (count - 1), MAX_DELAY_SECONDS)
        if len(self._failures) >= MAX_TRACKED_CLIENTS:
            self._failures.pop(next(iter(self._failures)))
        self._failures[client] = (count, self._clock() + delay)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


class AdminAuth:
    def __init__(self, token_file: Callable[[], Path | None],
                 clock: Callable[[], float] = time.time):
        self._token_file = token_file
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self.throttle = Throttle()

    def token_configured(self) -> bool:
        return self._token() is not None

    def _token(self) -> str | None:
        path = self._token_file()
        if path is None:
            return None
        try:
            token = read_secret_file(path)
        except SecretError:
            return None  # an unreadable token file allows nobody in
        return token

    def token_matches(self, offered: str) -> bool:
        token = self._token()
        if token is None:
            return False
        return hmac.compare_digest(offered.encode("utf-8"), token.encode("utf-8"))

    def bearer_ok(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    # -- browser sessions ---------------------------------------------------------------

    def login(self, offered: str) -> tuple[str, Session] | None:
        """A new session for the right token; None otherwise."""
        if not self.token_matches(offered):
            return None
        self._expire()
        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        session_id = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), self._digest(),
                          self._clock() + SESSION_SECONDS)
        self._sessions[_key(session_id)] = session
        return session_id, session

    def session(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(_key(session_id))
        if session is None:
            return None
        if session.expires_at < self._clock() or not hmac.compare_digest(
                session.token_digest, self._digest()):
            self._sessions.pop(_key(session_id), None)
            return None
        return session

    def logout(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(_key(session_id), None)

    @staticmethod
    def csrf_ok(session: Session, offered: str | None) -> bool:
        return bool(offered) and hmac.compare_digest(session.csrf.encode(),
                                                     (offered or "").encode())

    def _digest(self) -> bytes:
        token = self._token()
        return hashlib.sha256(token.encode("utf-8")).digest() if token is not None else b""

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires_at < now]:
            del self._sessions[key]


def _key(session_id: str) -> str:
    # Sessions are stored by hash: the dict holds no usable cookie value.
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()
