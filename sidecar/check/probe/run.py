"""The order of a test's steps, for a connection and for an OAuth definition alone.

The network steps block and run in a worker thread; the credentials step runs on the event
loop, where the live token sources live.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sidecar.check.probe.metadata import get_metadata, judge
from sidecar.check.probe.report import Report, Step, StepFailed
from sidecar.check.probe.transport import Channel, Target, certificate_facts, connect, handshake
from sidecar.runtime.snapshot import CompiledConnection, Snapshot
from sidecar.tls.policy import UpstreamTlsPolicy

if TYPE_CHECKING:
    from sidecar.credentials.oauth import TokenSource

# Each step waits at most this long (or the connection's shorter timeout_seconds): a button
# in the dashboard must answer within a reasonable time.
STEP_TIMEOUT_SECONDS = 20.0


async def probe_connection(snapshot: Snapshot, name: str, fresh: bool) -> dict[str, Any]:
    """Steps 1-4 for connection ``name`` of ``snapshot``; the report, scrubbed."""
    conn = snapshot.connections[name]
    upstream = conn.upstream
    report = Report("connection", name, conn.settings.url,
                    ("connect", "tls", "credentials", "metadata"))
    timeout = min(conn.timeout_seconds, STEP_TIMEOUT_SECONDS)
    channel = await _connect_and_handshake(
        report, Target(upstream.host, upstream.port, conn.via), conn.tls, timeout)
    try:
        authorization = None
        if not report.failed:
            authorization = await _credentials(report, snapshot, conn, fresh)
        if not report.failed and channel is not None:
            with report.run("metadata") as step:
                answer = await asyncio.to_thread(get_metadata, channel, upstream,
                                                 authorization, conn.tls, timeout)
                step.detail, facts = judge(answer)
                step.facts.update(facts)
    finally:
        if channel is not None:
            channel.close()
    return report.as_dict(snapshot.redactor)


async def probe_oauth(snapshot: Snapshot, name: str, fresh: bool) -> dict[str, Any]:
    """Steps 1-3 for OAuth definition ``name``: its token endpoint and a token."""
    source = snapshot.token_sources[name]
    url = source.token_url
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    report = Report("oauth", name, url, ("connect", "tls", "credentials"))
    target = Target((parts.hostname or "").lower(), parts.port or (443 if secure else 80),
                    source.via)
    channel = await _connect_and_handshake(report, target, source.tls if secure else None,
                                           STEP_TIMEOUT_SECONDS)
    if channel is not None:
        channel.close()
    if not report.failed:
        with report.run("credentials") as step:
            await _token(step, source, fresh)
    return report.as_dict(snapshot.redactor)


async def _connect_and_handshake(report: Report, target: Target,
                                 policy: UpstreamTlsPolicy | None, timeout: float
                                 ) -> Channel | None:
    channel: Channel | None = None
    with report.run("connect") as step:
        channel, step.detail = await asyncio.to_thread(connect, target, timeout)
    if channel is None or report.failed:
        return None
    if policy is None:
        report.not_applicable("tls", "plain http://: no TLS, so the credentials travel "
                                     "unencrypted")
        return channel
    with report.run("tls") as step:
        step.detail, version, cert = await asyncio.to_thread(handshake, channel, policy,
                                                             target.host, timeout)
        step.facts.update(tls_version=version, certificate=certificate_facts(cert))
    if report.failed:
        channel.close()
        return None
    return channel


async def _credentials(report: Report, snapshot: Snapshot, conn: CompiledConnection,
                       fresh: bool) -> str | None:
    """Step 3 for a connection; the Authorization value for step 4; and who may use them."""
    authorization = await _credentials_step(report, snapshot, conn, fresh)
    callers = conn.settings.allowed_callers
    step = report.step("credentials")
    if callers is not None and step.status != "skipped":
        step.detail += (f"; only these callers may use them (allowed_callers): "
                        f"{', '.join(callers) or 'none'}")
        step.facts["allowed_callers"] = list(callers)
    return authorization


async def _credentials_step(report: Report, snapshot: Snapshot, conn: CompiledConnection,
                            fresh: bool) -> str | None:
    if conn.basic is not None:
        with report.run("credentials") as step:
            step.detail = (f"Basic credentials of basic_auth.{conn.basic.definition} are "
                           "present; step 4 sends them")
        return conn.basic.header()
    source = snapshot.token_sources.get(conn.oauth) if conn.oauth else None
    if source is None:
        report.not_applicable("credentials", "no credentials configured: requests go "
                                             "upstream without an Authorization header")
        return None
    token: str | None = None
    with report.run("credentials") as step:
        token = await _token(step, source, fresh)
    return f"Bearer {token}" if token is not None else None


async def _token(step: Step, source: TokenSource, fresh: bool) -> str:
    from sidecar.credentials.oauth import BUDGET_SPENT, TokenUnavailable

    try:
        token = await source.token_for_test(fresh, wait_limit=STEP_TIMEOUT_SECONDS)
    except TokenUnavailable as exc:
        hint = "" if fresh or exc.reason.startswith(BUDGET_SPENT) \
            else " (add ?fresh=1 to ask the token endpoint now)"
        raise StepFailed(f"no token from {exc.token_url}: {exc.reason}{hint}") from None
    scopes = " ".join(token.scopes) or "none named"
    lifetime = _duration(token.expires_in)
    if token.reused:
        step.detail = (f"reused the cached token of oauth.{source.name}: valid for {lifetime} "
                       f"more, scopes {scopes} (add ?fresh=1 to fetch a new one)")
    else:
        step.detail = (f"fetched a new token for oauth.{source.name} from {token.token_url}: "
                       f"valid for {lifetime}, scopes {scopes}")
    step.facts.update(token_reused=token.reused,
                      token_expires_in_seconds=round(token.expires_in))
    return token.value


def _duration(seconds: float) -> str:
    whole = round(seconds)
    if whole < 120:
        return f"{whole} s"
    if whole < 7200:
        return f"{whole // 60} min"
    return f"{whole // 3600} h {whole % 3600 // 60} min"
