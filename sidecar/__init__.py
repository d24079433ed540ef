"""fhir-sidecar: inject FHIR server credentials and TLS policy into plain local HTTP calls."""

__version__ = "0.1.0"
