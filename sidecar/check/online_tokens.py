"""``check --online``: one fresh token request per OAuth definition, summarised as a table."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sidecar.check.online import format_table
from sidecar.credentials.cert_binding import certificate_thumbprint
from sidecar.credentials.oauth import TokenSource, TokenUnavailable
from sidecar.report.redaction import Redactor
from sidecar.runtime.snapshot import Snapshot


@dataclass(frozen=True)
class TokenCheck:
    definition: str
    token_url: str
    auth_method: str
    ok: bool
    scopes: str = ""
    expires_in: str = ""
    error: str = ""
    bound_to: str | None = None  # cnf.x5t#S256 of the token (RFC 8705), if it has one


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
                      scopes=" ".join(fetched.scopes) or "-", expires_in=expires,
                      bound_to=fetched.bound_to)


async def check_tokens(snapshot: Snapshot) -> list[TokenCheck]:
    return list(await asyncio.gather(
        *(_check(name, source, snapshot.redactor)
          for name, source in snapshot.token_sources.items())))


def binding_mismatches(snapshot: Snapshot, results: list[TokenCheck]) -> list[str]:
    """Connections whose token is bound to a client certificate (RFC 8705 ``cnf.x5t#S256``)
    that the connection does not present: the FHIR server will refuse the token there."""
    bound = {r.definition: r.bound_to for r in results if r.bound_to is not None}
    found = []
    for name, conn in sorted(snapshot.connections.items()):
        expected = bound.get(conn.oauth or "")
        if expected is None:
            continue
        presented = conn.tls.client_cert_pem if conn.tls is not None else None
        if presented is not None and certificate_thumbprint(presented) == expected:
            continue
        what = "no client certificate" if presented is None else "a different client certificate"
        found.append(f"connections.{name}: the token of oauth.{conn.oauth} is bound to its "
                     f"client certificate (cnf x5t#S256 {expected}), and this connection "
                     f"presents {what}: the FHIR server will refuse the token; give it the "
                     f"client_cert and client_key of oauth.{conn.oauth}.tls")
    return found


def token_table(results: list[TokenCheck]) -> str:
    return format_table(
        ["OAUTH DEFINITION", "TOKEN URL", "AUTH METHOD", "RESULT", "SCOPES", "EXPIRES IN"],
        [[r.definition, r.token_url, r.auth_method, "ok" if r.ok else f"failed: {r.error}",
          r.scopes, r.expires_in] for r in results])
