"""``check --online``: one fresh token request per OAuth definition, summarised as a table."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sidecar.credentials.oauth import TokenSource, TokenUnavailable
from sidecar.online_check import format_table
from sidecar.redaction import Redactor
from sidecar.snapshot import Snapshot


@dataclass(frozen=True)
class TokenCheck:
    definition: str
    token_url: str
    auth_method: str
    ok: bool
    scopes: str = ""
    expires_in: str = ""
    error: str = ""


async def _check(name: str, source: TokenSource, redactor: Redactor) -> TokenCheck:
    method = source.definition.client_auth
    try:
        fetched = await source.fetch_once()
    except TokenUnavailable as exc:
        return TokenCheck(name, redactor.scrub(exc.token_url), method, False,
                          error=redactor.scrub(exc.reason))
    finally:
        await source.aclose()
    expires = f"{fetched.expires_in:.0f} s" + (" (default)" if fetched.expires_in_defaulted
                                               else "")
    return TokenCheck(name, fetched.token_url, method, True,
                      scopes=" ".join(fetched.scopes) or "-", expires_in=expires)


async def check_tokens(snapshot: Snapshot) -> list[TokenCheck]:
    return list(await asyncio.gather(
        *(_check(name, source, snapshot.redactor)
          for name, source in snapshot.token_sources.items())))


def token_table(results: list[TokenCheck]) -> str:
    return format_table(
        ["OAUTH DEFINITION", "TOKEN URL", "AUTH METHOD", "RESULT", "SCOPES", "EXPIRES IN"],
        [[r.definition, r.token_url, r.auth_method, "ok" if r.ok else f"failed: {r.error}",
          r.scopes, r.expires_in] for r in results])
