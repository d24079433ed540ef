"""Sending a request upstream once more, outside mitmproxy: the retry after a rejected token.

mitmproxy cannot resend a request from within its response hook, so the retry is made with
httpx under the connection's own TLS policy (same CAs, client certificate and server name).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx

from sidecar.runtime.snapshot import CompiledConnection

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "host", "content-length"}


@dataclass(frozen=True)
class ReplayedResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw_body: bytes  # as sent by the upstream, content-encoding untouched


async def replay(conn: CompiledConnection, method: str, path: str,
                 headers: list[tuple[str, str]], body: bytes) -> ReplayedResponse:
    upstream = conn.upstream
    # The policy's context also applies its server_name, as on the proxy leg.
    verify = conn.tls.stdlib_context() if conn.tls is not None else False
    sent = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP]
    sent.append(("Host", upstream.host_header))
    url = f"{upstream.scheme}://{upstream.host_header}{path}"
    async with httpx.AsyncClient(verify=verify, trust_env=False,
                                 timeout=conn.timeout_seconds) as client:
        request = client.build_request(method, url, headers=sent, content=body)
        try:
            response = await client.send(request, stream=True)
            try:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except ssl.SSLError as exc:
            # A TLS alert after the handshake (a TLS 1.3 server refusing the client
            # certificate) is not wrapped by httpx; callers handle httpx errors.
            raise httpx.ReadError(f"TLS: {exc.reason or exc}", request=request) from exc
    kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _HOP_BY_HOP]
    kept.append(("content-length", str(len(raw))))
    return ReplayedResponse(response.status_code, response.reason_phrase, kept, raw)
