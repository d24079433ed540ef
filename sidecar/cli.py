"""The ``fhir-sidecar`` command: run, check, test, jwks, config-schema, demo."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from sidecar import __version__
from sidecar.config.errors import ConfigError
from sidecar.config.settings import (
    LogFormat,
    LogLevel,
    RuntimeSettings,
    SettingsError,
    load_settings,
)
from sidecar.report.logs import setup_logging

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-sidecar",
        description="Call secured FHIR servers with plain local HTTP: the sidecar adds "
                    "credentials and TLS.")
    parser.add_argument("--version", action="version", version=f"fhir-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path,
                       help="config file (default: $FHIR_SIDECAR_CONFIG)")

    run = sub.add_parser("run", help="serve the config")
    config_arg(run)
    run.add_argument("--state-dir", type=Path,
                     help="writable directory for runtime state (default: "
                          "$FHIR_SIDECAR_STATE_DIR or ~/.local/state/fhir-sidecar)")
    run.add_argument("--log-level", choices=get_args(LogLevel))
    run.add_argument("--log-format", choices=get_args(LogFormat))

    check = sub.add_parser("check", help="validate the config, secrets, keys and CA bundles")
    config_arg(check)
    check.add_argument("--online", action="store_true",
                       help="also handshake with every upstream and fetch every OAuth token")
    check.add_argument("--no-files", action="store_true",
                       help="check the config's shape only: read no secret, key or CA bundle "
                            "file and no environment variable (for CI without the secrets)")

    test = sub.add_parser(
        "test", help="test connections as the dashboard's Test button does: connect, TLS, "
                     "credentials, GET [base]/metadata",
        description="Run a connection test for each named connection (all when none is "
                    "named). Exit 0 when every connection passed, 1 when a step failed, 2 for "
                    "a config error or when the tests could not run.")
    config_arg(test)
    test.add_argument("names", nargs="*", metavar="NAME", help="connections to test")
    test.add_argument("--json", action="store_true",
                      help='print {"connections": {NAME: {"ok": ..., "steps": [...]}}}')
    test.add_argument("--admin", metavar="URL",
                      help="run the tests inside the sidecar at this admin URL (its /test API "
                           "and its tokens) instead of fetching tokens here")
    test.add_argument("--token-file", type=Path,
                      help="file holding the admin token (with --admin)")
    test.add_argument("--state-dir", type=Path, help=(
        "the sidecar's state directory: with an audit section, each test is an audit record "
        "in its audit file (default: FHIR_SIDECAR_STATE_DIR)"))

    jwks = sub.add_parser("jwks", help="print the public signing keys (JWK Set) that "
                                       "/.well-known/jwks.json serves")
    config_arg(jwks)

    sub.add_parser("config-schema", help="print the config file's JSON Schema (draft 2020-12), "
                                         "for editors and CI")

    demo = sub.add_parser("demo", help="run a self-contained demo on loopback")
    demo.add_argument("--once", action="store_true", help="exit after the sample calls")
    demo.add_argument("--state-dir", type=Path, help="where the demo writes its files")
    return parser


def _config_path(args: argparse.Namespace, settings: RuntimeSettings) -> Path | None:
    path = args.config or settings.config
    if path is None:
        print("fhir-sidecar: no config file: pass -c FILE or set FHIR_SIDECAR_CONFIG",
              file=sys.stderr)
    return path


def _print_problems(exc: ConfigError) -> None:
    for problem in exc.problems:
        print(problem, file=sys.stderr)


def cmd_check(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    from sidecar.runtime.live import load_snapshot

    path = _config_path(args, settings)
    if path is None:
        return EXIT_INVALID
    if args.no_files:
        return _check_shape(path, online=args.online)
    try:
        snapshot = load_snapshot(path)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_INVALID
    for warning in snapshot.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not args.online:
        print(f"{path}: valid ({len(snapshot.connections)} connections, "
              f"{len(snapshot.config.basic_auth)} Basic and {len(snapshot.config.oauth)} "
              "OAuth definitions)")
        for proxy in snapshot.egress_proxies.values():
            print(f"egress proxy {proxy.name}: {proxy.url}"
                  f"{f' (as {proxy.username})' if proxy.username else ''}")
        return EXIT_OK
    from sidecar.check.online import check_connections, handshake_table

    results = check_connections(snapshot)
    print(handshake_table(results))
    ok = all(r.ok for r in results)
    if snapshot.token_sources:
        from sidecar.check.online_tokens import binding_mismatches, check_tokens, token_table

        token_results = asyncio.run(check_tokens(snapshot))
        print()
        print(token_table(token_results))
        for mismatch in binding_mismatches(snapshot, token_results):
            print(f"warning: {mismatch}", file=sys.stderr)
        ok = ok and all(r.ok for r in token_results)
    return EXIT_OK if ok else EXIT_FAILED


def _check_shape(path: Path, online: bool) -> int:
    """``check --no-files``: keys, types, names and cross references; nothing else is read."""
    from sidecar.config.loader import load_config

    if online:
        print("fhir-sidecar: --online needs the secrets, keys and CA bundles; it cannot be "
              "combined with --no-files", file=sys.stderr)
        return EXIT_INVALID
    try:
        config = load_config(path)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_INVALID
    print(f"{path}: shape valid ({len(config.connections)} connections, "
          f"{len(config.basic_auth)} Basic and {len(config.oauth)} OAuth definitions); "
          "secret, key and CA bundle files and environment variables were not read "
          "(--no-files)")
    return EXIT_OK


def cmd_test(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    from sidecar.check.probe.command import (
        TestsNotRun,
        all_passed,
        as_json,
        as_text,
        run_locally,
        run_remotely,
    )

    try:
        if args.admin is not None:
            if args.token_file is None:
                print("fhir-sidecar: --admin needs --token-file (the admin token)",
                      file=sys.stderr)
                return EXIT_INVALID
            try:
                token = args.token_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                print(f"fhir-sidecar: {args.token_file}: cannot read the admin token: "
                      f"{exc.strerror or exc}", file=sys.stderr)
                return EXIT_INVALID
            reports = run_remotely(args.admin, token, args.names)
        else:
            from sidecar.runtime.live import load_snapshot

            path = _config_path(args, settings)
            if path is None:
                return EXIT_INVALID
            try:
                snapshot = load_snapshot(path)
            except ConfigError as exc:
                _print_problems(exc)
                return EXIT_INVALID
            for warning in snapshot.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            reports = asyncio.run(run_locally(snapshot, args.names))
            _audit_tests(snapshot, reports, args.state_dir or settings.state_dir)
    except TestsNotRun as exc:
        print(f"fhir-sidecar: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(as_json(reports) if args.json else as_text(reports))
    return EXIT_OK if all_passed(reports) else EXIT_FAILED


def _audit_tests(snapshot: Any, reports: dict[str, Any], state_dir: Path | None) -> None:
    """Each test as a ``test`` record in the audit file (docs/audit.md#admin-actions); a
    test through --admin is recorded by the sidecar itself."""
    audit = snapshot.config.audit
    if audit is None or audit.file is None:
        return
    if state_dir is None:
        print("fhir-sidecar: not audited: the config has an audit section; give --state-dir "
              "(or FHIR_SIDECAR_STATE_DIR) to record these tests", file=sys.stderr)
        return
    import getpass

    from sidecar.audit.file_sink import AuditFile, AuditUnavailable
    from sidecar.audit.records import admin_record

    sink = AuditFile(state_dir / audit.file, audit.max_file_bytes, audit.keep)
    try:
        for name, report in reports.items():
            failed = next((s["step"] for s in report["steps"] if s["status"] == "failed"),
                          None)
            sink.write(admin_record("test", result="failure" if failed else "success",
                                    client=f"command line ({getpass.getuser()})",
                                    object_=f"connections/{name}", error=failed))
        sink.sync()
    except AuditUnavailable as exc:
        print(f"fhir-sidecar: not audited: {exc}", file=sys.stderr)


def cmd_jwks(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    import json

    from sidecar.credentials.jwks import key_set
    from sidecar.runtime.live import load_snapshot

    path = _config_path(args, settings)
    if path is None:
        return EXIT_INVALID
    try:
        snapshot = load_snapshot(path)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_INVALID
    print(json.dumps(key_set(snapshot.signing_keys), indent=2))
    return EXIT_OK


def cmd_config_schema(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    import json

    from sidecar.config.schema import config_json_schema

    print(json.dumps(config_json_schema(), indent=2))
    return EXIT_OK


def cmd_run(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    from sidecar.runner import serve

    setup_logging(args.log_level or settings.log_level, args.log_format or settings.log_format)
    path = _config_path(args, settings)
    if path is None:
        return EXIT_INVALID
    state_dir = args.state_dir or settings.state_dir
    if state_dir is None:
        print("fhir-sidecar: no state directory: give --state-dir or set "
              "FHIR_SIDECAR_STATE_DIR (there is no home directory to keep it in)", file=sys.stderr)
        return EXIT_INVALID
    try:
        code = asyncio.run(serve(path, state_dir, settings.drain_seconds))
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_INVALID
    except KeyboardInterrupt:
        code = EXIT_OK
    # Everything is drained and logged. Interpreter teardown was seen to crash (a segfault
    # while garbage-collecting OpenSSL objects in a worker thread) after a clean stop; skip it
    # so that a clean stop always exits with its real code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_demo(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    from sidecar.demo.runner import run_demo

    setup_logging("warning", "text")
    return run_demo(once=args.once, state_dir=args.state_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        for line in exc.lines:
            print(f"fhir-sidecar: {line}", file=sys.stderr)
        return EXIT_INVALID
    commands = {"run": cmd_run, "check": cmd_check, "test": cmd_test, "jwks": cmd_jwks,
                "config-schema": cmd_config_schema, "demo": cmd_demo}
    return commands[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
