"""What reports on the running sidecar: the Prometheus metrics and the status board
(``metrics``), the last hour per minute (``trends``) and the status light (``health``).
"""
