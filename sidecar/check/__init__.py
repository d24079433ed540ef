"""What ``check --online``, ``fhir-sidecar test`` and the connection test run: the steps
(``probe``), the handshake table (``online``) and the token table (``online_tokens``).
"""
