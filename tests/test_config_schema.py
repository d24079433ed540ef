"""The config file's JSON Schema is generated from the models, published in docs/, and agrees
with what the sidecar itself accepts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from sidecar.config import ConfigError, parse_config
from sidecar.config.schema import DIALECT, config_json_schema

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO / "docs" / "config.schema.json"
EXAMPLE = REPO / "config" / "example.yaml"


def validator() -> Draft202012Validator:
    return Draft202012Validator(config_json_schema())


def schema_errors(config: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator().iter_errors(config)]


def model_errors(config: dict[str, Any], tmp_path: Path) -> list[str]:
    try:
        parse_config(yaml.safe_dump(config), file="c.yaml", base_dir=tmp_path)
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


def test_config_schema_command_prints_the_published_schema() -> None:
    result = subprocess.run([sys.executable, "-m", "sidecar", "config-schema"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["$schema"] == DIALECT == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(printed)
    assert printed == json.loads(PUBLISHED.read_text(encoding="utf-8")), (
        "docs/config.schema.json differs from the models: run "
        "`fhir-sidecar config-schema > docs/config.schema.json` and commit the result")


def test_the_example_config_names_the_schema_and_follows_it(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first == "# yaml-language-server: $schema=../docs/config.schema.json"
    assert (EXAMPLE.parent / first.split("=", 1)[1]).resolve() == PUBLISHED
    assert schema_errors(yaml.safe_load(text)) == []


GOOD = {
    "proxy": {"listen": "127.0.0.1:8080"},
    "admin": {"listen": "[::1]:9901", "allowed_hosts": ["sidecar.example"]},
    "shutdown": {"delay_seconds": 5, "drain_seconds": 30},
    "basic_auth": {"b": {"username": "svc", "password_file": "pw"}},
    "oauth": {"o": {"token_url": "https://auth.example/token", "client_id": "c",
                    "client_secret_env": "SECRET", "scopes": ["system/*.rs"], "via": "corp"}},
    "egress_proxies": {"corp": {"url": "http://proxy.example:3128"}},
    "connections": {"c-1": {"url": "https://fhir.example/r4", "listen": "127.0.0.1:8081",
                            "auth": {"oauth": "o"}, "timeout_seconds": 10, "via": "corp",
                            "tls": {"verify": "custom", "ca_bundle": "ca.pem"}}},
}

# Each: (what, change at a path of GOOD). Both the schema and the models refuse it.
BAD = [
    ("misspelt connection key", ("connections", "c-1", "timeout_second"), 10),
    ("misspelt section", ("conections",), {}),
    ("bad connection name", ("connections", "Epic FHIR"), {"url": "https://x.example"}),
    ("name too long", ("basic_auth", "b" * 64), {"username": "u", "password_env": "P"}),
    ("unknown verify", ("connections", "c-1", "tls", "verify"), "maybe"),
    ("zero timeout", ("connections", "c-1", "timeout_seconds"), 0),
    ("shutdown too long", ("shutdown", "drain_seconds"), 3601),
    ("listen without a port", ("proxy", "listen"), "localhost"),
    ("unknown client_auth", ("oauth", "o", "client_auth"), "client_secret_jwt"),
    ("header limit too small", ("limits", "max_request_header_bytes"), 100),
    ("missing client_id", ("oauth", "o", "client_id"), None),
]


def _changed(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    config = json.loads(json.dumps(GOOD))
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return config


def test_a_good_config_passes_both(tmp_path: Path) -> None:
    assert schema_errors(GOOD) == []
    assert model_errors(GOOD, tmp_path) == []


@pytest.mark.parametrize(("what", "path", "value"), BAD, ids=[b[0] for b in BAD])
def test_what_the_schema_refuses_the_sidecar_refuses(
        what: str, path: tuple[str, ...], value: Any, tmp_path: Path) -> None:
    config = _changed(path, value)
    assert schema_errors(config), what
    assert model_errors(config, tmp_path), what


VALUES_SCHEMA_SCRIPT = REPO / ".ci" / "values_schema.py"


def test_chart_values_schema_config_part_is_generated_from_the_models() -> None:
    result = subprocess.run([sys.executable, str(VALUES_SCHEMA_SCRIPT), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_a_hand_edit_of_the_chart_config_schema_is_drift(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("values_schema", VALUES_SCHEMA_SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    committed = json.loads(script.VALUES_SCHEMA.read_text(encoding="utf-8"))
    connection = (committed["properties"]["config"]["properties"]["connections"]
                  ["patternProperties"])
    [entry] = connection.values()
    assert entry["additionalProperties"] is False
    assert "timeout_seconds" in entry["properties"]
    # Loosened by hand (the way timeout_second once got through): --check notices.
    del entry["additionalProperties"]
    monkeypatch.setattr(script, "VALUES_SCHEMA", tmp_path / "values.schema.json")
    script.VALUES_SCHEMA.write_text(json.dumps(committed, indent=2) + "\n", encoding="utf-8")
    assert script.main(["--check"]) == 1
    assert script.main([]) == 0 and script.main(["--check"]) == 0
    assert json.loads(script.VALUES_SCHEMA.read_text(encoding="utf-8")) == json.loads(
        (REPO / "helm" / "fhir-sidecar" / "values.schema.json").read_text(encoding="utf-8"))
