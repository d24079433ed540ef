"""The OpenAPI 3.0 document of ``/api`` (served at ``/api/openapi.json``)."""

from __future__ import annotations

from typing import Any

from sidecar import __version__
from sidecar.config.models import NAME_MAX_LENGTH, NAME_RULE

NAME = {"type": "string", "pattern": f"^{NAME_RULE}$", "maxLength": NAME_MAX_LENGTH}
READ_ONLY = {"type": "string", "nullable": True, "description":
             "Why the API does not change or remove this definition (it comes from the config "
             "file and reads files or environment variables there); null when it may"}
SECRET_STATE = {"type": "string", "enum": ["set", "not set"]}
LISTEN = {"type": "string", "pattern": "^.+:[0-9]{1,5}$", "example": "127.0.0.1:8081",
          "nullable": True}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_json(_ref("Error"))}


ACCESS_ERRORS = {
    "401": _error("Missing or wrong admin token (reads need it when admin.listen is not "
                  "loopback); answered before the body is read"),
    "403": _error("Read-only configuration, a browser session without its CSRF token, or no "
                  "admin token configured"),
    "413": _error("Body too large (1 MiB; a CA bundle 256 KiB), or a body where none is taken"),
    "421": _error("The Host header names neither this listener, localhost, nor an entry of "
                  "admin.allowed_hosts"),
    "429": _error("Too many failed authentication attempts from this address; retry after "
                  "Retry-After seconds"),
}
WRITE_ERRORS = {
    "400": _error("Malformed request: bad name, body not a JSON object"),
    **ACCESS_ERRORS,
    "405": _error("Method not allowed here"),
    "409": _error("Conflict: the resource is in use, the definition comes from the config file "
                  "(read-only here), or the sidecar could not apply the change (nothing was "
                  "changed)"),
    "422": _error("The change is not valid, or names a file path or environment variable "
                  "(*_file, *_env, tls.client_cert, tls.client_key, a path as tls.ca_bundle); "
                  "problems name each field (nothing was changed)"),
}


def _schemas() -> dict[str, Any]:
    tls_in = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "verify": {"type": "string", "enum": ["skip", "default", "custom"]},
            "ca_bundle": _nullable({**NAME, "description":
                                    "The name of a CA bundle uploaded with PUT "
                                    "/api/ca-bundles/{name} (never a path)"}),
            "server_name": _nullable({"type": "string"}),
        },
    }
    tls_view = {
        "type": "object",
        "required": ["verify", "ca_bundle", "client_cert", "client_key", "server_name"],
        "properties": {
            "verify": {"type": "string", "enum": ["skip", "default", "custom"]},
            "ca_bundle": _nullable({"type": "string"}),
            "client_cert": _nullable({"type": "string"}),
            "client_key": _nullable({"type": "string", "enum": ["set"]}),
            "server_name": _nullable({"type": "string"}),
        },
    }
    auth = {"type": "object", "additionalProperties": False, "description":
            "At most one of basic and oauth; {} means no credentials",
            "properties": {"basic": _nullable(NAME), "oauth": _nullable(NAME)}}
    connection_in = {
        "type": "object", "additionalProperties": False, "required": ["url"],
        "properties": {
            "url": {"type": "string", "format": "uri", "example": "https://fhir.example/R4"},
            "listen": LISTEN,
            "auth": auth,
            "tls": _ref("TlsInput"),
            "timeout_seconds": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
            "read_timeout_seconds": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
            "rewrite_links": {"type": "boolean"},
        },
    }
    counts = {"type": "object", "additionalProperties": {"type": "integer"}}
    connection = {
        "type": "object",
        "required": ["name", "url", "listen", "auth", "tls", "timeout_seconds",
                     "read_timeout_seconds", "rewrite_links", "read_only", "status"],
        "properties": {
            "name": NAME, "url": {"type": "string"}, "listen": _nullable({"type": "string"}),
            "auth": {"type": "object", "required": ["basic", "oauth"],
                     "properties": {"basic": _nullable(NAME), "oauth": _nullable(NAME)}},
            "tls": _ref("TlsView"), "timeout_seconds": {"type": "number"},
            "read_timeout_seconds": {"type": "number"},
            "rewrite_links": {"type": "boolean"},
            "read_only": READ_ONLY,
            "status": {"type": "object", "required": ["requests_recent", "in_flight",
                                                      "last_status", "last_error", "tls_ok"],
                       "properties": {
                           "requests_recent": counts,
                           "in_flight": {"type": "integer"},
                           "last_status": _nullable({"type": "integer"}),
                           "last_error": _nullable({
                               "type": "object", "required": ["error", "at"],
                               "properties": {"error": {"type": "string"},
                                              "at": _nullable({"type": "string"})}}),
                           "tls_ok": _nullable({"type": "boolean"})}},
        },
    }
    basic_in = {
        "type": "object", "additionalProperties": False, "required": ["username"],
        "properties": {
            "username": {"type": "string", "minLength": 1},
            "password": {"type": "string", "minLength": 1, "writeOnly": True, "description":
                         "The new password (write-only; omit to keep the current one). It is "
                         "stored in the sidecar's own secrets directory"},
        },
    }
    basic = {
        "type": "object", "required": ["name", "username", "password", "password_env",
                                       "read_only", "used_by"],
        "properties": {"name": NAME, "username": {"type": "string"}, "password": SECRET_STATE,
                       "password_env": _nullable({"type": "string"}),
                       "read_only": READ_ONLY,
                       "used_by": {"type": "array", "items": NAME}},
    }
    oauth_in = {
        "type": "object", "additionalProperties": False, "required": ["client_id"],
        "description": "Set token_url or discover_from",
        "properties": {
            "token_url": {"type": "string", "format": "uri"},
            "discover_from": {"type": "string", "format": "uri"},
            "client_id": {"type": "string", "minLength": 1},
            "client_auth": {"type": "string", "enum": ["client_secret_basic",
                                                       "client_secret_post",
                                                       "private_key_jwt"]},
            "client_secret": {"type": "string", "minLength": 1, "writeOnly": True},
            "private_key_pem": {"type": "string", "writeOnly": True, "description":
                                "PEM private key for private_key_jwt (write-only)"},
            "key_id": _nullable({"type": "string"}),
            "signing_alg": {"type": "string", "enum": ["RS384", "ES384"]},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "audience": _nullable({"type": "string"}),
            "resource": _nullable({"type": "string"}),
            "extra_params": {"type": "object", "additionalProperties": {"type": "string"}},
            "default_expires_in": {"type": "integer", "minimum": 1},
            "tls": _ref("TlsInput"),
        },
    }
    used_state = {"type": "string", "enum": ["set", "not set", "not used"]}
    oauth = {
        "type": "object",
        "required": ["name", "token_url", "discover_from", "client_id", "client_auth",
                     "client_secret", "private_key", "scopes", "tls", "read_only", "used_by",
                     "token"],
        "properties": {
            "name": NAME, "token_url": _nullable({"type": "string"}),
            "discover_from": _nullable({"type": "string"}),
            "client_id": {"type": "string"}, "client_auth": {"type": "string"},
            "client_secret": used_state, "client_secret_env": _nullable({"type": "string"}),
            "private_key": used_state, "key_id": _nullable({"type": "string"}),
            "signing_alg": {"type": "string"},
            "signing_keys": {
                "type": "array", "description": "The published public keys of a "
                "private_key_jwt definition (read-only; served in /.well-known/jwks.json)",
                "items": {"type": "object", "required": ["slot", "kid", "alg"], "properties": {
                    "slot": {"type": "string", "enum": ["current", "next", "previous"]},
                    "kid": {"type": "string"}, "alg": {"type": "string"}}}},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "audience": _nullable({"type": "string"}),
            "resource": _nullable({"type": "string"}),
            "extra_params": {"type": "object", "additionalProperties": {"type": "string"}},
            "default_expires_in": {"type": "integer"},
            "tls": _ref("TlsView"),
            "read_only": READ_ONLY,
            "used_by": {"type": "array", "items": NAME},
            "token": {"type": "object", "required": ["valid_until", "last_refresh",
                                                     "last_error", "scopes"],
                      "properties": {"valid_until": _nullable({"type": "string"}),
                                     "last_refresh": _nullable({"type": "string"}),
                                     "last_error": _nullable({"type": "string"}),
                                     "scopes": {"type": "array", "items": {"type": "string"}},
                                     "last_result": _nullable({"type": "string"})}},
        },
    }
    bundle = {
        "type": "object", "required": ["name", "certificates", "used_by", "problem"],
        "properties": {
            "name": NAME,
            "certificates": {"type": "array", "items": {
                "type": "object", "required": ["subject", "not_after", "is_ca"],
                "properties": {"subject": {"type": "string"},
                               "not_after": {"type": "string"},
                               "is_ca": {"type": "boolean"}}}},
            "used_by": {"type": "array", "items": {"type": "string"}},
            "problem": _nullable({"type": "string"}),
        },
    }
    error = {"type": "object", "required": ["error", "problems"],
             "properties": {"error": {"type": "string"},
                            "problems": {"type": "array", "items": {"type": "string"}}}}
    schemas: dict[str, Any] = {
        "TlsInput": tls_in, "TlsView": tls_view, "ConnectionInput": connection_in,
        "Connection": connection, "BasicAuthInput": basic_in, "BasicAuth": basic,
        "OAuthInput": oauth_in, "OAuth": oauth, "CaBundle": bundle, "Error": error,
    }
    for view in ("Connection", "BasicAuth", "OAuth", "CaBundle"):
        schemas[f"{view}List"] = {"type": "object", "required": ["items"],
                                  "properties": {"items": {"type": "array",
                                                           "items": _ref(view)}}}
    return schemas


def _resource(tag: str, view: str, body: dict[str, Any] | None) -> dict[str, Any]:
    name_param = {"name": "name", "in": "path", "required": True, "schema": NAME}
    secured: list[dict[str, list[str]]] = [{"adminToken": []}]
    # Open on a loopback admin listener; on any other the token is needed for reads too.
    read_security: list[dict[str, list[str]]] = [{}, {"adminToken": []}]
    put_body = body or {"required": True, "content": {
        "application/x-pem-file": {"schema": {"type": "string"}},
        "text/plain": {"schema": {"type": "string"}}}}
    return {
        "list": {"get": {"tags": [tag], "summary": f"List {tag}",
                         "operationId": f"list_{view}", "security": read_security,
                         "responses": {"200": {"description": "All of them",
                                               **_json(_ref(f"{view}List"))},
                                       **ACCESS_ERRORS}}},
        "item": {
            "parameters": [name_param],
            "get": {"tags": [tag], "summary": "Read one", "operationId": f"get_{view}",
                    "security": read_security,
                    "responses": {"200": {"description": "Found", **_json(_ref(view))},
                                  "400": WRITE_ERRORS["400"],
                                  "404": _error("No such name"), **ACCESS_ERRORS}},
            "put": {"tags": [tag], "summary": "Create or replace",
                    "operationId": f"put_{view}", "security": secured,
                    "requestBody": put_body,
                    "responses": {"200": {"description": "Replaced", **_json(_ref(view))},
                                  "201": {"description": "Created", **_json(_ref(view))},
                                  **WRITE_ERRORS}},
            "delete": {"tags": [tag], "summary": "Remove", "operationId": f"delete_{view}",
                       "security": secured,
                       "responses": {"204": {"description": "Removed"},
                                     "404": _error("No such name"), **WRITE_ERRORS}},
        },
    }


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for prefix, tag, view, body in (
            ("connections", "connections", "Connection", "ConnectionInput"),
            ("basic-auth", "Basic Auth definitions", "BasicAuth", "BasicAuthInput"),
            ("oauth", "OAuth definitions", "OAuth", "OAuthInput"),
            ("ca-bundles", "CA bundles", "CaBundle", None)):
        request = {"required": True, **_json(_ref(body))} if body else None
        resource = _resource(tag, view, request)
        paths[f"/api/{prefix}"] = resource["list"]
        paths[f"/api/{prefix}/{{name}}"] = resource["item"]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "fhir-sidecar admin API",
            "version": __version__,
            "description": "Create, replace and delete connections, Basic Auth and OAuth "
                           "definitions and CA bundles of a running fhir-sidecar. Changes are "
                           "validated, written to the config file and reloaded live. Secret "
                           "fields are write-only: reads say only \"set\" or \"not set\". "
                           "Secrets are given as values and stored in the sidecar's own "
                           "secrets directory; file paths and environment variable names are "
                           "never accepted. Definitions from the config file that read files "
                           "or environment variables are read-only here. Reads need the admin "
                           "token when admin.listen is not loopback.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"adminToken": {
                "type": "http", "scheme": "bearer",
                "description": "The content of admin.token_file"}},
        },
    }
