"""Egress through corporate proxies: their definitions (``proxies``), the blocking CONNECT the
connection test and ``check --online`` use (``connect``), and TLS to an https:// proxy
(``relay``).
"""
