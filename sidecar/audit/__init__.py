"""The audit trail: who used which credential for what (docs/audit.md).

- ``interactions``: the FHIR interaction, resource and patient a request names, from its
  method, path and query (never kept: only what is derived from them);
- ``records``: the one record shape, for proxied requests and admin actions;
- ``file_sink``: JSON lines in the state directory, rotated by size;
- ``fhir_queue`` and ``balp``: an on-disk queue of records sent as FHIR ``AuditEvent``s
  (IHE BALP) to an Audit Record Repository;
- ``trail``: where records go, and whether a request may proceed without its record.

Plain modules, no mitmproxy.
"""
