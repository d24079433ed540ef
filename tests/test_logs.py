"""Log lines: an exception mitmproxy catches in one of our hooks reaches the JSON log with its
traceback in a field, on stdout with every other line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from mitmproxy.addonmanager import safecall

from sidecar.report.logs import setup_logging

NAMES = ("fhir_sidecar", "sidecar", "mitmproxy")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level,
                 logging.getLogger(n).propagate) for n in NAMES}
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def failing_hook() -> None:
    raise RuntimeError("hook failed on purpose")


def test_hook_exception_is_one_json_line_with_its_traceback(
        capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    setup_logging("info", "json")
    with safecall():  # how mitmproxy calls every addon hook
        failing_hook()
    out, err = capsys.readouterr()
    assert err == ""
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert line["level"] == "error" and "hook failed on purpose" in line["event"]
    assert line["logger"] == "mitmproxy.addonmanager"
    assert "in failing_hook" in line["traceback"]
    assert line["traceback"].rstrip().endswith("RuntimeError: hook failed on purpose")


def test_text_format_keeps_the_traceback_too(
        capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    setup_logging("info", "text")
    with safecall():
        failing_hook()
    out, _ = capsys.readouterr()
    assert "Addon error: hook failed on purpose" in out and "in failing_hook" in out
