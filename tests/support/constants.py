"""Credentials the test upstreams demand (non-ASCII on purpose: Basic must be UTF-8)."""

UPSTREAM_USER = "svc-fhir"
UPSTREAM_PASSWORD = "s3cret-Pässword"
