"""Real, loopback-only upstreams for the demo command and the tests.

``pki`` issues the certificates (a trusted "internal" CA, an unrelated CA, and deliberately broken
server certificates); ``fhir_server`` is a small HTTPS FHIR server that uses them.
"""
