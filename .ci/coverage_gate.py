#!/usr/bin/env python3
"""Coverage gate: fail CI when branch coverage falls below its floors (docs/testing.md#coverage).

Run after ``python -m pytest`` (coverage on by default, see pyproject.toml), which leaves the
combined data in ``.coverage``. Prints what is uncovered, then one line per floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import coverage

# The request path: every module that decides where a request goes, what credentials and
# headers it carries, how its TLS is set up, and what the app sees back.
REQUEST_PATH = [
    "sidecar/request/routing.py",
    "sidecar/request/path.py",
    "sidecar/request/headers.py",
    "sidecar/credentials/*",
    "sidecar/callers/*",
    "sidecar/tls/*",
    "sidecar/fhir/links*.py",
    "sidecar/fhir/bundle_scan.py",
    "sidecar/request/errors.py",
    "sidecar/report/redaction.py",
    "sidecar/proxy/*",
]
# The request path must stay at 95 % or more (measured 96.8 % on 2026-11-29; the slack is for
# branches taken only in races and for hypothesis-generated inputs, docs/testing.md#coverage).
REQUEST_PATH_FLOOR = 95.0
OVERALL_FLOOR = 85.0


def _report(cov: coverage.Coverage, title: str, include: list[str] | None) -> float:
    print(f"\n== {title}: uncovered lines and branches ==")
    return float(cov.report(include=include, show_missing=True, skip_covered=True,
                            file=sys.stdout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-file", default=".coverage", type=Path,
                        help="combined coverage data (default: .coverage)")
    args = parser.parse_args(argv)
    if not args.data_file.exists():
        print(f"{args.data_file}: no coverage data; run `.venv/bin/python -m pytest` first")
        return 1
    cov = coverage.Coverage(data_file=str(args.data_file))
    cov.load()
    request_path = _report(cov, "request path", REQUEST_PATH)
    overall = _report(cov, "overall", None)
    failed = False
    for name, value, floor in (("request path", request_path, REQUEST_PATH_FLOOR),
                               ("overall", overall, OVERALL_FLOOR)):
        ok = value >= floor
        failed |= not ok
        print(f"{name}: {value:.2f}% branch coverage (floor {floor:g}%) {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
