"""The test kit: loopback servers shared by ``fhir-sidecar demo``, the tests and bench/.

Only what the demo needs to run on a fresh install lives in the package: a throw-away PKI, an
HTTPS FHIR server, an OAuth2 token server and a free-port helper. Test-only material (broken
certificates, the FHIR server's test routes, recording upstreams, the real authorization
server) lives under tests/support.
"""
