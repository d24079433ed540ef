"""The protocol floor every upstream TLS leg shares, whichever library makes the connection."""

from __future__ import annotations

MINIMUM_VERSION = "TLSv1.2"
# ECDHE key exchange (forward secrecy) and AEAD encryption only, in OpenSSL's names; a server
# that offers only CBC or static-RSA suites (AES128-SHA, ...) is refused.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
