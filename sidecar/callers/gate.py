"""The checks on who is calling, in the order a request meets them, as refusals.

1. ``Host`` names the listener (else ``421 misdirected``): a page whose DNS name was
   rebound to 127.0.0.1 still sends its own name.
2. No ``Origin``, or an allowed one (else ``403 origin-not-allowed``): browsers mark every
   cross-site request with it; apps that are not browsers send none.
3. With ``allowed_callers``: a valid workload token whose subject is allowed (else
   ``401 caller-unauthenticated`` / ``403 caller-forbidden``).

Nothing refused here goes upstream. Each refusal names what the operator can change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sidecar.callers.hosts import listener_host_allowed
from sidecar.callers.origins import origin_allowed
from sidecar.callers.workload_tokens import (
    Caller,
    CallerVerifier,
    KeysNeeded,
    KeySource,
    TokenRefused,
    unverified_issuer,
)
from sidecar.config.models import ListenAddress
from sidecar.request.errors import ErrorKind, SidecarError

_SHOWN_CHARS = 100


def _shown(value: str) -> str:
    """Client input quoted in an answer: printable ASCII, cut short."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in value[:_SHOWN_CHARS])
    return repr(cleaned + ("..." if len(value) > _SHOWN_CHARS else ""))


def host_refusal(host: str | None, *, listen: ListenAddress, local_address: str | None,
                 allowed_hosts: Sequence[str], setting: str, what: str) -> SidecarError | None:
    """``setting``: the config key that lists more names (``connections.ehr.allowed_hosts``);
    ``what``: the listener in words."""
    if listener_host_allowed(host, listen_host=listen.host, listen_port=listen.port,
                             local_address=local_address, allowed_hosts=allowed_hosts):
        return None
    return SidecarError(ErrorKind.MISDIRECTED, (
        f"{what} does not answer for the host {_shown(host or '')}: it answers its own "
        f"address, the address the request arrived on and localhost. If apps reach it under "
        f"that name (a Service or compose name), add the name to {setting}; nothing was sent "
        "upstream."))


def origin_refusal(origin: str | None, *, allowed_origins: Sequence[str],
                   connection: str) -> SidecarError | None:
    if origin_allowed(origin, allowed_origins):
        return None
    return SidecarError(ErrorKind.ORIGIN_NOT_ALLOWED, (
        f"connection '{connection}' does not serve requests from the web origin "
        f"{_shown(origin or '')}: a browser page may not use its credentials. If that page "
        f"is yours, add its origin to connections.{connection}.allowed_origins; nothing was "
        "sent upstream."))


@dataclass(frozen=True)
class NeedsKeys:
    """The caller can be judged once ``source`` has (re)fetched its keys."""

    source: KeySource


def caller_verdict(authorization: str | None, *, connection: str,
                   allowed_callers: Sequence[str],
                   verifiers: Mapping[str, CallerVerifier]) -> Caller | SidecarError | NeedsKeys:
    """Who the app is, by its workload token, if ``allowed_callers`` lets it in."""
    token = _bearer(authorization)
    if token is None:
        return _unauthenticated(connection, "the request carries no workload token "
                                            "(Authorization: Bearer <jwt>)")
    definitions = sorted({entry.partition(":")[0] for entry in allowed_callers})
    # A token verified before is known by its verifier: no parsing on the hot path.
    caller = next((c for d in definitions if d in verifiers
                   for c in (verifiers[d].cached(token),) if c is not None), None)
    if caller is not None:
        return _allowed(caller, connection, allowed_callers)
    issuer = unverified_issuer(token)
    verifier = next((verifiers[d] for d in definitions
                     if d in verifiers and verifiers[d].issuer == issuer), None)
    if verifier is None:
        return _unauthenticated(connection, "its issuer is not one the connection's "
                                            "allowed_callers trust")
    try:
        caller = verifier.verify(token)
    except KeysNeeded:
        return NeedsKeys(verifier.keys)
    except TokenRefused as refused:
        return _unauthenticated(connection, str(refused))
    return _allowed(caller, connection, allowed_callers)


def _allowed(caller: Caller, connection: str, allowed_callers: Sequence[str]
             ) -> Caller | SidecarError:
    if caller.name not in allowed_callers:
        return SidecarError(ErrorKind.CALLER_FORBIDDEN, (
            f"connection '{connection}' does not serve the caller {_shown(caller.name)}: it "
            f"is not in connections.{connection}.allowed_callers; nothing was sent upstream."))
    return caller


def after_keys(authorization: str | None, *, connection: str, allowed_callers: Sequence[str],
               verifiers: Mapping[str, CallerVerifier]) -> Caller | SidecarError:
    """The verdict once the keys were fetched: a token still unknown is refused."""
    verdict = caller_verdict(authorization, connection=connection,
                             allowed_callers=allowed_callers, verifiers=verifiers)
    if isinstance(verdict, NeedsKeys):
        return _unauthenticated(connection, "the issuer's keys cannot be had now, or it is "
                                            "signed with a key the issuer does not publish")
    return verdict


def _bearer(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _unauthenticated(connection: str, why: str) -> SidecarError:
    return SidecarError(ErrorKind.CALLER_UNAUTHENTICATED, (
        f"connection '{connection}' serves only the callers its allowed_callers name, by "
        f"their workload token; {why}. Nothing was sent upstream."))
