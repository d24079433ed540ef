"""Credentials the test upstreams demand (non-ASCII on purpose: Basic must be UTF-8), and the
``Authorization`` value HTTP Basic makes of them, computed here independently of the sidecar."""

import base64

UPSTREAM_USER = "svc-fhir"
UPSTREAM_PASSWORD = "s3cret-Pässword"


def basic_header(user: str, password: str) -> str:
    """``Basic base64(user:password)``, UTF-8 encoded (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


EXPECTED_BASIC = basic_header(UPSTREAM_USER, UPSTREAM_PASSWORD)
