"""Who may use a connection's credentials: the checks on the caller, before anything is sent.

- ``hosts``: the ``Host`` a request names must be the listener's (DNS rebinding);
- ``origins``: a browser's cross-site request must come from an allowed ``Origin``;
- ``workload_tokens`` and ``key_sets``: a workload token (JWT) proves which app is calling,
  and ``allowed_callers`` says which apps may;
- ``gate``: the three in the order a request meets them, as refusals.

Plain modules, no mitmproxy: the routing addon calls :mod:`sidecar.callers.gate`.
See docs/callers.md.
"""
