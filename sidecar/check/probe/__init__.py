"""Testing one connection or OAuth definition on demand, step by step
(docs/admin-api.md#testing-a-connection).

``POST /api/connections/{name}/test`` and ``POST /api/oauth/{name}/test`` (and the dashboard's
*Test* buttons) run the real path once: connect (through the egress proxy, if any), the TLS
handshake under the connection's own policy with the proxy leg's pyOpenSSL code, the
credentials (a token from the live token source), and ``GET [base]/metadata`` over that same
TLS connection. Every text in the report passes the snapshot's redactor.
"""
