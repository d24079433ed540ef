"""Helpers for the dashboard's health and trend tests: CA bundles that expire soon, and reading
the counts back out of a sparkline's SVG points."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

from sidecar.admin.glance import SPARK_BASE, SPARK_TOP
from sidecar.testkit.pki import PUBLIC_MODE, Authority
from support.pki import TestPKI


def bundle_with_soon_expiring_ca(pki: TestPKI, name: str, days: float) -> Path:
    """A CA bundle that trusts the test upstreams (``pki.ca``) and also holds an unrelated CA
    that expires in ``days`` days: the bundle's earliest expiry."""
    soon = Authority(f"fhir-sidecar {name} CA",
                     not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=days))
    return pki.write(f"{name}.pem", pki.ca.cert_pem + soon.cert_pem, PUBLIC_MODE)


def spark_counts(points: str, peak: int) -> list[int]:
    """The per-minute counts a sparkline polyline draws (the inverse of its y scale)."""
    counts = []
    for pair in points.split():
        _, y = pair.split(",")
        counts.append(round((SPARK_BASE - float(y)) / (SPARK_BASE - SPARK_TOP) * peak))
    return counts


def svg_of(html: str, connection: str) -> dict[str, str]:
    """The sparkline of ``connection``'s row in a dashboard page: its peak and both series."""
    row = re.search(rf'<tr id="connection-{re.escape(connection)}">(.*?)</tr>', html, re.S)
    assert row, f"no row for {connection}"
    svg = re.search(r'<svg class="sparkline"[^>]*data-peak="(\d+)"[^>]*>(.*?)</svg>',
                    row.group(1), re.S)
    assert svg, f"no sparkline in the row of {connection}"
    lines = dict(re.findall(r'<polyline class="(\w+)" points="([^"]*)"', svg.group(2)))
    return {"peak": svg.group(1), **lines}
