"""What happens to one request, without mitmproxy: which connection it is for (``routing``),
which path it may take (``path``), which headers it may carry (``headers``), whether its HTTPS
may be intercepted (``intercept``), and the answers the sidecar makes itself (``errors``).
"""
