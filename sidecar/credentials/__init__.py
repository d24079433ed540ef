"""Credentials the sidecar injects: Basic headers and OAuth token sources
(docs/architecture.md#credentials).

The OAuth names are loaded on first use: they bring in httpx and authlib (megabytes of RSS),
which a sidecar with only Basic definitions never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.credentials.client_auth import OAuthSetupError
    from sidecar.credentials.oauth import (
        FetchedToken,
        RefreshPolicy,
        TokenObserver,
        TokenSource,
        TokenStatus,
        TokenUnavailable,
    )

_WHERE = {
    "OAuthSetupError": "sidecar.credentials.client_auth",
    "FetchedToken": "sidecar.credentials.oauth",
    "RefreshPolicy": "sidecar.credentials.oauth",
    "TokenObserver": "sidecar.credentials.oauth",
    "TokenSource": "sidecar.credentials.oauth",
    "TokenStatus": "sidecar.credentials.oauth",
    "TokenUnavailable": "sidecar.credentials.oauth",
}

__all__ = [
    "FetchedToken",
    "OAuthSetupError",
    "RefreshPolicy",
    "TokenObserver",
    "TokenSource",
    "TokenStatus",
    "TokenUnavailable",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
