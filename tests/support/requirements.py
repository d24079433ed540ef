"""Tools some tests need from the machine (tinyproxy, ...): skipped without them on a
developer's machine, a failure in CI.

A skipped test of a security rule is a rule nobody checked, and a green run would say
otherwise. ``.ci/run`` sets ``FHIR_SIDECAR_CI=1``; most CI services set ``CI`` as well, which
counts too (``CI=false`` or ``CI=0`` does not). There, a missing tool fails every test that
needs it, naming the tool.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

CI_VARIABLES = ("FHIR_SIDECAR_CI", "CI")


def in_ci() -> bool:
    return any(os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")
               for name in CI_VARIABLES)


def missing(what: str) -> NoReturn:
    """Skip the test for want of ``what`` -- or, in CI, fail it."""
    if in_ci():
        pytest.fail(f"{what}; in CI this fails the run: the tests it would skip check "
                    "security rules (tests/support/requirements.py)", pytrace=False)
    pytest.skip(what)
