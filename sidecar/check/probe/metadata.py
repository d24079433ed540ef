"""Step 4 of a connection test: ``GET [base]/metadata`` with the credentials, over the
connection that steps 1 and 2 opened, and what the CapabilityStatement says. Blocking."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import h11
from OpenSSL import SSL

from sidecar import __version__
from sidecar.check.probe.report import StepFailed
from sidecar.check.probe.transport import Channel
from sidecar.request.routing import Upstream
from sidecar.tls.policy import UpstreamTlsPolicy
from sidecar.tls.verdict import HandshakeOutcome, describe

# A CapabilityStatement of a large server is a few hundred KiB; the test reads no more than
# this (the status and headers are known by then anyway).
MAX_BODY_BYTES = 8 * 1024 * 1024
_MAX_HEAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class MetadataAnswer:
    status: int
    reason: str
    content_type: str
    location: str  # a redirect's target ("" without one)
    body: bytes
    complete: bool  # the whole body was read (not cut at MAX_BODY_BYTES)


def get_metadata(channel: Channel, upstream: Upstream, authorization: str | None,
                 policy: UpstreamTlsPolicy | None, timeout: float) -> MetadataAnswer:
    """Send the request on ``channel`` and read the answer; raise StepFailed when there is
    none. The request says ``Connection: close``: the channel is used once."""
    channel.deadline = time.monotonic() + timeout
    headers = [("Host", upstream.host_header), ("Accept", "application/fhir+json"),
               ("Accept-Encoding", "identity"), ("User-Agent", f"fhir-sidecar/{__version__} "
                                                               "(connection test)"),
               ("Connection", "close")]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
    try:
        channel.send(client.send(h11.Request(method="GET", target=f"{upstream.base_path}/metadata",
                                             headers=headers)) or b"")
        channel.send(client.send(h11.EndOfMessage()) or b"")
        return _read_answer(client, channel)
    except SSL.Error as exc:
        outcome = channel.tls.get_app_data() if channel.tls is not None else None
        if isinstance(outcome, HandshakeOutcome) and outcome.failed:
            raise StepFailed("the server ended the TLS connection after the handshake: "
                             + describe(outcome.reason, policy, upstream.host, str(exc))
                             ) from None
        raise StepFailed(f"the TLS connection failed: {exc}") from None
    except TimeoutError:
        raise StepFailed(f"no complete answer within {timeout:g} s") from None
    except h11.RemoteProtocolError as exc:
        raise StepFailed(f"the answer is not valid HTTP/1.1: {exc}") from None
    except OSError as exc:
        raise StepFailed(f"the connection failed: {exc.strerror or exc}") from None


def _read_answer(client: h11.Connection, channel: Channel) -> MetadataAnswer:
    response: h11.Response | None = None
    body = bytearray()
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(channel.recv())
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                assert response is not None
                return _answer(response, bytes(body[:MAX_BODY_BYTES]), complete=False)
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return _answer(response, bytes(body), complete=True)
        elif isinstance(event, h11.ConnectionClosed):
            raise StepFailed("the server closed the connection without an answer")


def _answer(response: h11.Response, body: bytes, complete: bool) -> MetadataAnswer:
    found = {name: value.decode("latin-1") for name, value in response.headers
             if name in (b"content-type", b"location")}
    return MetadataAnswer(response.status_code, response.reason.decode("latin-1"),
                          found.get(b"content-type", ""), found.get(b"location", ""), body,
                          complete)


def judge(answer: MetadataAnswer) -> tuple[str, dict[str, Any]]:
    """What the answer says, in words and facts; raise StepFailed unless it is a
    CapabilityStatement."""
    facts: dict[str, Any] = {"http_status": answer.status}
    status = f"{answer.status} {answer.reason}".strip()
    document = _json(answer.body) if answer.complete else None
    if not 200 <= answer.status < 300:
        words = _refusal_words(answer.status, answer.location)
        issue = _outcome_text(document)
        raise StepFailed(f"the FHIR server answered {status}{words}"
                         + (f": {issue}" if issue else ""), **facts)
    if not answer.complete:
        return (f"{status}; the CapabilityStatement is larger than {MAX_BODY_BYTES} bytes and "
                "was not read to the end", facts)
    if not isinstance(document, dict) or document.get("resourceType") != "CapabilityStatement":
        kind = document.get("resourceType") if isinstance(document, dict) else None
        what = f"a {kind}" if isinstance(kind, str) else \
            f"no FHIR JSON ({answer.content_type or 'no Content-Type'})"
        raise StepFailed(f"the FHIR server answered {status} with {what}, not a "
                         "CapabilityStatement: is the base URL right?", **facts)
    version = document.get("fhirVersion")
    software = document.get("software")
    name = software.get("name") if isinstance(software, dict) else None
    software_version = software.get("version") if isinstance(software, dict) else None
    facts["fhir_version"] = version if isinstance(version, str) else None
    facts["software"] = (f"{name} {software_version}" if isinstance(software_version, str)
                         else name) if isinstance(name, str) else None
    return (f"{status}: CapabilityStatement, FHIR {facts['fhir_version'] or 'version not given'}"
            f", software {facts['software'] or 'not named'}", facts)


def _refusal_words(status: int, location: str) -> str:
    if 300 <= status < 400:
        return f" (a redirect to {location or 'nowhere'}: is the base URL right?)"
    if status == 401:
        return " (the credentials were refused)"
    if status == 403:
        return " (the credentials are not allowed to read the metadata)"
    if status == 404:
        return " (no FHIR server at this base URL?)"
    return ""


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _outcome_text(document: Any) -> str | None:
    """The first issue's text of an OperationOutcome answer."""
    if not isinstance(document, dict) or document.get("resourceType") != "OperationOutcome":
        return None
    for issue in document.get("issue") or []:
        if isinstance(issue, dict):
            details = issue.get("details")
            text = issue.get("diagnostics") or (details.get("text")
                                                if isinstance(details, dict) else None)
            if isinstance(text, str) and text:
                return text
    return None
