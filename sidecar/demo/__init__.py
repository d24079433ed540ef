"""``fhir-sidecar demo``: the sidecar in front of the test kit's servers (sidecar/testkit)."""
