"""The routes only tests need, on top of the kit's FHIR server (sidecar/testkit/fhir_app.py).

Large and chunked bodies both ways, gzip-coded Bundles of any size, answers that come late and
any status on demand. ``fhir_upstream`` is the kit's server answering with them.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from sidecar.testkit.fhir_app import (
    FHIR_JSON,
    FHIR_XML,
    BadParameter,
    FhirApp,
    IncomingRequest,
    Reply,
    error_reply,
    fhir_reply,
    flag_param,
    int_param,
    single_param,
    wants_xml,
)
from sidecar.testkit.fhir_resources import issue_code_for_status, operation_outcome
from sidecar.testkit.fhir_server import FhirTestServer
from sidecar.testkit.http_io import is_decimal
from sidecar.testkit.pki import ServerIdentity
from support.fhir_bodies import gzip_chunks, large_body_chunks, large_bundle_chunks

MAX_LARGE_SIZE = 1 << 36  # 64 GiB: far beyond any test, small enough to stop typos.
MAX_SLOW_SECONDS = 30.0
DEFAULT_LARGE_SIZE = 1024 * 1024


class FhirAppForTests(FhirApp):
    def route(
        self, request: IncomingRequest, segments: list[str], query: dict[str, list[str]]
    ) -> Reply:
        method = request.method
        match segments:
            case ["Bundle", "large"] if method == "GET":
                return self._large_bundle(query, wants_xml(request, query))
            case ["Binary", "large"] if method == "GET":
                return self._large(query)
            case ["Binary", "digest"] if method == "POST":
                return self._digest(request)
            case ["slow"] if method == "GET":
                return self._slow(query)
            case ["status", code]:
                return self._status(code)
            case ["Binary", "large" | "digest"] | ["slow"]:
                return error_reply(405, f"{method} is not supported here", Allow="GET, POST")
            case _:
                return super().route(request, segments, query)

    def _large_bundle(self, query: dict[str, list[str]], xml: bool) -> Reply:
        """``size`` bytes of searchset; ``chunked=1`` without a Content-Length, ``gzip=1``
        gzip-coded (and chunked)."""
        size = int_param(query, "size", DEFAULT_LARGE_SIZE, 1024, MAX_LARGE_SIZE)
        chunks = large_bundle_chunks(self.base_url, size, xml=xml)
        headers = {"Content-Type": FHIR_XML if xml else FHIR_JSON}
        if flag_param(query, "gzip"):
            headers["Content-Encoding"] = "gzip"
            return Reply(200, headers, stream=gzip_chunks(chunks))
        chunked = flag_param(query, "chunked")
        return Reply(200, headers, stream=chunks, length=None if chunked else size)

    def _large(self, query: dict[str, list[str]]) -> Reply:
        size = int_param(query, "size", DEFAULT_LARGE_SIZE, 0, MAX_LARGE_SIZE)
        chunked = flag_param(query, "chunked")
        return Reply(
            200,
            {"Content-Type": "application/octet-stream"},
            stream=large_body_chunks(size),
            length=None if chunked else size,
        )

    def _digest(self, request: IncomingRequest) -> Reply:
        digest = hashlib.sha256()
        length = 0
        for piece in request.body.chunks():
            digest.update(piece)
            length += len(piece)
        body = json.dumps({"length": length, "sha256": digest.hexdigest()}).encode()
        return Reply(200, {"Content-Type": "application/json"}, body)

    def _slow(self, query: dict[str, list[str]]) -> Reply:
        text = single_param(query, "seconds") or "1"
        try:
            seconds = float(text)
        except ValueError:
            raise BadParameter("seconds must be a number") from None
        if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SLOW_SECONDS:
            raise BadParameter(f"seconds must be between 0 and {MAX_SLOW_SECONDS:g}")
        outcome = operation_outcome(
            f"answered after {seconds:g} s", code="informational", severity="information"
        )
        reply = fhir_reply(200, outcome)
        reply.delay_seconds = seconds
        return reply

    def _status(self, code_text: str) -> Reply:
        # Final statuses only; 1xx cannot be a final answer.
        if not is_decimal(code_text) or not 200 <= int(code_text) <= 599:
            raise BadParameter("status must be a number from 200 to 599")
        status = int(code_text)
        if status in (204, 304):
            return Reply(status)  # these statuses must not carry a body
        severity = "information" if status < 400 else "error"
        outcome = operation_outcome(
            f"status {status} as requested",
            code=issue_code_for_status(status) if status >= 400 else "informational",
            severity=severity,
        )
        return fhir_reply(status, outcome)


def fhir_upstream(identity: ServerIdentity, **options: Any) -> FhirTestServer:
    """The kit's HTTPS FHIR server with the test routes; options as for ``FhirTestServer``."""
    return FhirTestServer(identity, app_class=FhirAppForTests, **options)
