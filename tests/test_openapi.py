"""/api/openapi.json is generated from models: the request bodies follow the config models, minus
what the API refuses (file paths and environment variable names)."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from pydantic import BaseModel

from sidecar.admin.openapi import openapi_document
from sidecar.config.models import (
    BasicAuthDefinition,
    ConnectionSettings,
    OAuthDefinition,
    TlsSettings,
)


def schemas() -> dict[str, Any]:
    found: dict[str, Any] = openapi_document()["components"]["schemas"]
    return found


def test_request_bodies_are_the_config_models_without_files_or_environment_names() -> None:
    cases: list[tuple[str, type[BaseModel], set[str]]] = [
        ("ConnectionInput", ConnectionSettings, set()),
        ("BasicAuthInput", BasicAuthDefinition, set()),
        ("OAuthInput", OAuthDefinition, {"private_key_pem"}),
        ("TlsInput", TlsSettings, set())]
    for component, model, api_only in cases:
        offered = set(schemas()[component]["properties"])
        in_file = {f for f in model.model_fields
                   if not f.endswith(("_file", "_env")) and f not in ("client_cert", "client_key")}
        assert offered == in_file | api_only, component
        assert schemas()[component]["additionalProperties"] is False
    assert "timeout_seconds" in schemas()["ConnectionInput"]["properties"]
    assert "via" in schemas()["OAuthInput"]["properties"]


def test_secrets_are_write_only_and_names_follow_the_rule() -> None:
    for component, field in (("BasicAuthInput", "password"), ("OAuthInput", "client_secret"),
                             ("OAuthInput", "private_key_pem")):
        assert schemas()[component]["properties"][field]["writeOnly"] is True
    bundle = schemas()["TlsInput"]["properties"]["ca_bundle"]
    validator = Draft202012Validator(bundle)
    assert validator.is_valid("internal") and validator.is_valid(None)
    assert not validator.is_valid("/etc/ssl/ca.pem") and not validator.is_valid("a" * 64)


def test_the_document_is_openapi_31_and_every_reference_resolves() -> None:
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    names = set(document["components"]["schemas"])

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for item in node for r in refs(item)]
        return []

    used = refs(document)
    assert used and all(r.removeprefix("#/components/schemas/") in names for r in used)
    for view in ("Connection", "BasicAuth", "OAuth", "CaBundle"):
        assert f"#/components/schemas/{view}List" in used
        Draft202012Validator.check_schema(document["components"]["schemas"][view])
