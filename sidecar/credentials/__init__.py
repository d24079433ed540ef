"""Credentials the sidecar injects: Basic headers and OAuth token sources (design §4)."""

from sidecar.credentials.client_auth import OAuthSetupError
from sidecar.credentials.oauth import (
    FetchedToken,
    RefreshPolicy,
    TokenObserver,
    TokenSource,
    TokenStatus,
    TokenUnavailable,
)

__all__ = [
    "FetchedToken",
    "OAuthSetupError",
    "RefreshPolicy",
    "TokenObserver",
    "TokenSource",
    "TokenStatus",
    "TokenUnavailable",
]
