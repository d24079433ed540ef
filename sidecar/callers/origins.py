"""Browser origins: a page on another site may make the browser send requests to the sidecar
(a form post needs no permission), and those would leave with the connection's credentials.
Browsers mark such requests with ``Origin``; apps that are not browsers send none."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit


def normal_origin(value: str) -> str:
    """``value`` spelt the way ``connections.*.allowed_origins`` holds origins: lower case,
    the scheme's default port left out. Anything that is not an origin is returned as it is
    (it then matches nothing)."""
    text = value.strip()
    parts = urlsplit(text.lower())
    try:
        port = parts.port
    except ValueError:
        return text
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
        return text
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def origin_allowed(origin: str | None, allowed_origins: Iterable[str]) -> bool:
    """A request without ``Origin`` is not a browser's cross-site request: allowed."""
    return origin is None or normal_origin(origin) in set(allowed_origins)
