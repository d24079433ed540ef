"""Upstream TLS: one policy per connection (and per token endpoint), used by every leg.

``material``          the PEM files a policy names, read and checked
``policy``            the compiled policy and the contexts built from it
``openssl_bindings``  the private pyOpenSSL bindings, fenced in one file
"""
