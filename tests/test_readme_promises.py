"""Every listed promise of README.md and docs/*.md names the tests that protect it.

Each entry quotes a sentence exactly as the docs say it (whitespace, including line wraps, is
normalised). The test fails when a quoted sentence disappears from its file (a promise was
reworded or dropped: update the entry, and the tests if the promise changed) or when a mapped
test no longer exists (it was renamed or removed: the promise would be unprotected).

The tests themselves quote the promise in their docstrings. Test ids are ``file::function``;
they are checked by parsing the test files, so nothing is imported or collected twice.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"

# (doc file, exact sentence or phrase) -> test ids that assert its effect.
PROMISES: dict[tuple[str, str], list[str]] = {
    ("docs/configuration.md",
     "The app's `Authorization` and `Proxy-Authorization` headers are always removed."): [
        "test_promises_app_credentials.py::"
        "test_the_apps_authorization_is_removed_on_a_connection_without_credentials",
        "test_promises_app_credentials.py::"
        "test_the_apps_authorization_is_replaced_on_a_connection_with_credentials",
        "test_proxy.py::test_reverse_read_injects_basic_and_drops_app_credentials",
    ],
    ("README.md", "a bad change keeps the last good configuration"): [
        "test_promises_reload.py::"
        "test_a_bad_reload_by_file_edit_keeps_the_last_good_config_serving",
        "test_live_reload.py::test_invalid_change_keeps_last_good_and_recovers",
    ],
    ("docs/configuration.md",
     "An invalid change (bad YAML, unknown definition, missing secret file, bad PEM, a taken "
     "port) is rejected whole: the last good configuration keeps serving and one log line per "
     "problem (`\"event\": \"config_rejected\"`) names the file and field."): [
        "test_promises_reload.py::"
        "test_a_bad_reload_by_file_edit_keeps_the_last_good_config_serving",
        "test_live_reload.py::test_invalid_change_keeps_last_good_and_recovers",
    ],
    ("docs/configuration.md",
     "the request is sent once more, provided its body was buffered (bodies up to 1 MB are); "
     "otherwise the 401 is passed through."): [
        "test_promises_oauth.py::test_upstream_401_on_a_streamed_body_is_passed_through_and_"
        "not_retried",
        "test_promises_oauth.py::test_upstream_401_on_a_buffered_body_is_retried_once_and_counted",
        "test_proxy_oauth.py::test_upstream_401_drops_token_and_retries_once",
        "test_proxy.py::test_upstream_401_passes_through",
    ],
    ("docs/metrics.md", "Requests retried with a new token after an upstream `401`."): [
        "test_promises_oauth.py::test_upstream_401_on_a_buffered_body_is_retried_once_and_counted",
        "test_promises_oauth.py::test_upstream_401_on_a_streamed_body_is_passed_through_and_"
        "not_retried",
    ],
    ("docs/configuration.md",
     "While the token endpoint fails (error status, timeout, refused connection) a still-valid "
     "token keeps being used"): [
        "test_promises_oauth.py::"
        "test_token_outage_keeps_serving_the_valid_token_then_answers_token_unavailable",
        "test_oauth_token_source.py::test_outage_serves_the_valid_token_then_reports_unavailable",
    ],
    ("docs/configuration.md",
     "Once no valid token is left, requests get `503` `token-unavailable` whose diagnostics "
     "name the connection, the definition, the token URL and the endpoint's answer"): [
        "test_promises_oauth.py::"
        "test_token_outage_keeps_serving_the_valid_token_then_answers_token_unavailable",
        "test_proxy_oauth.py::test_token_unavailable_quotes_the_endpoint",
    ],
    ("docs/command-line.md",
     "The listeners close (new connections are refused) and requests in flight get up to "
     "`shutdown.drain_seconds` (default `30`) to finish."): [
        "test_shutdown.py::test_sigterm_keeps_serving_for_the_delay_then_refuses_and_drains",
    ],
    ("docs/command-line.md",
     "Requests still running then are cut off (log event `drain_timeout` with their number), "
     "and the process exits `0`."): [
        "test_shutdown.py::"
        "test_requests_longer_than_the_drain_are_cut_off_and_the_exit_is_still_clean",
    ],
    ("docs/configuration.md",
     "`timeout_seconds` bounds connecting, the TLS handshake and the wait for response "
     "headers"): [
        "test_promises_timeouts.py::"
        "test_an_upstream_that_never_speaks_tls_is_cut_at_the_handshake_bound",
        "test_promises_timeouts.py::"
        "test_an_upstream_whose_backlog_is_full_is_cut_at_the_connect_bound",
        "test_proxy.py::test_slow_upstream_times_out",
    ],
    ("docs/configuration.md", "body that keeps flowing is not cut off"): [
        "test_limits.py::test_slow_but_flowing_body_is_not_cut_off",
    ],
    ("docs/configuration.md", "TLS 1.2 is the minimum."): [
        # Its tls10-only and tls11-only cases: an upstream offering only TLS 1.0 / 1.1 is
        # refused as protocol_version on every leg.
        "test_tls_conformance.py::test_every_leg_reaches_the_same_verdict",
    ],
    ("docs/admin-api.md", "Rotating the token file ends existing sessions."): [
        "test_promises_admin_sessions.py::test_rotating_the_admin_token_file_ends_existing_"
        "sessions",
    ],
    ("docs/command-line.md",
     "mitmproxy's CA store lives here, never in `~/.mitmproxy`"): [
        "test_promises_app_credentials.py::test_no_ca_store_is_created_in_the_home_directory",
    ],
    ("docs/configuration.md",
     "Secrets, private keys, assertions and tokens never appear in logs, errors, metrics or "
     "exception texts."): [
        "test_promises_secret_logging.py::"
        "test_signed_client_assertions_never_appear_in_output_metrics_or_readyz",
        "test_secret_echo.py::test_echoed_credentials_reach_no_one",
        "test_proxy.py::test_log_lines_carry_no_secret_and_no_query",
    ],
    ("docs/kubernetes.md",
     "So a test never sends your credentials to the FHIR server, whatever the config"): [
        "test_helm_operations.py::test_helm_test_script_gets_only_answers_the_sidecar_makes_"
        "itself",
        "test_helm_operations.py::test_helm_test_script_fails_when_something_else_answers",
    ],
    ("docs/kubernetes.md",
     "So it works whether the Service exposes connection ports, the admin port, or neither"): [
        "test_helm_operations.py::test_helm_test_pod_asks_every_port_of_the_gateway_service",
    ],
    ("docs/release.md",
     "It holds no `tests/` and no `bench/`, and it requires only the runtime dependencies of "
     "`pyproject.toml`"): [
        "test_release.py::test_the_wheel_holds_the_runtime_and_the_demo_and_no_tests",
        "test_release.py::test_the_wheel_check_fails_on_each_kind_of_mistake",
        "test_packaging.py::test_no_test_tool_is_a_runtime_dependency",
    ],
    ("docs/release.md",
     "The version lives in one place: `[project] version` in `pyproject.toml`."): [
        "test_release.py::test_every_copy_of_the_version_follows_pyproject",
        "test_release.py::test_sync_version_finds_and_rewrites_every_copy",
    ],
    ("docs/systemd.md",
     "The config file does not expand variables, so refer to the secrets by that absolute path"): [
        "test_systemd_unit.py::test_the_documented_config_reads_only_credentials_the_unit_loads",
        "test_systemd_unit.py::test_the_unit_command_lines_run_the_documented_config",
    ],
    ("docs/kubernetes.md",
     "no path of the root file system outside `/var/lib/fhir-sidecar` was created, changed or "
     "removed"): [
        "test_image_check.py::test_the_write_detector_sees_created_changed_and_removed_paths",
    ],
}


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@cache
def _doc(name: str) -> str:
    return _normalised((ROOT / name).read_text(encoding="utf-8"))


@cache
def _test_functions(file_name: str) -> frozenset[str]:
    path = TESTS / file_name
    if not path.is_file():
        return frozenset()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return frozenset(node.name for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                     and node.name.startswith("test_"))


def _ids(entry: tuple[str, str]) -> str:
    return f"{entry[0]}: {entry[1][:50]}"


@pytest.mark.parametrize("entry", list(PROMISES), ids=_ids)
def test_the_promise_is_still_in_the_docs(entry: tuple[str, str]) -> None:
    doc, sentence = entry
    assert _normalised(sentence) in _doc(doc), (
        f"{doc} no longer says {sentence!r}: update PROMISES in {Path(__file__).name} "
        "(and the tests, if the promise changed)")


@pytest.mark.parametrize("entry", list(PROMISES), ids=_ids)
def test_the_promise_has_existing_tests(entry: tuple[str, str]) -> None:
    test_ids = PROMISES[entry]
    assert test_ids, f"{entry[1]!r} is mapped to no test"
    missing = []
    for test_id in test_ids:
        file_name, _, function = test_id.partition("::")
        if function not in _test_functions(file_name):
            missing.append(test_id)
    assert not missing, f"{entry[1]!r} names tests that do not exist: {missing}"


def test_the_new_promise_tests_quote_a_promise_in_their_docstring() -> None:
    """A test written for a promise says which one: its docstring quotes it."""
    for path in sorted(TESTS.glob("test_promises_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                doc = ast.get_docstring(node) or ""
                assert "Promise" in doc and '"' in doc, f"{path.name}::{node.name}"
