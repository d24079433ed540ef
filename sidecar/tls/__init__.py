"""Upstream TLS: one policy per connection (and per token endpoint), used by every leg.

``material``          the PEM files a policy names, read and checked
``policy``            the compiled policy: its decisions, and its pyOpenSSL form (proxy leg)
``stdlib_context``    the same policy as an ``ssl.SSLContext`` (token endpoint, discovery,
                      the 401 replay, ``check --online``)
``protocol``          the minimum TLS version and the TLS 1.2 cipher suites, for every leg
``verdict``           why a handshake failed, in one vocabulary and one set of words
``openssl_bindings``  the private pyOpenSSL bindings, fenced in one file
"""
