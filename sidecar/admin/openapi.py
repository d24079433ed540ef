"""The OpenAPI 3.1 document of ``/api`` (served at ``/api/openapi.json``).

The bodies' schemas are generated from the API's models (:mod:`.api_models`), which derive the
request bodies from the config file's models; this module adds what is HTTP: paths, status
codes, security.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from sidecar import __version__
from sidecar.admin import api_models
from sidecar.config.models import Name
from sidecar.config.schema import ModelJsonSchema

# The {name} path parameter: the name rule, as the config file states it.
NAME = TypeAdapter(Name).json_schema()


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


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
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "validation") for m in api_models.REQUESTS]
    responses: tuple[type[BaseModel], ...] = (*api_models.RESOURCES, *api_models.RESULTS,
                                              api_models.Error,
                                              *api_models.LISTS.values())
    models += [(m, "serialization") for m in responses]
    _, generated = models_json_schema(models, ref_template="#/components/schemas/{model}",
                                      schema_generator=ModelJsonSchema)
    schemas: dict[str, Any] = generated["$defs"]
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


def _probe(tag: str, what: str, steps: str) -> dict[str, Any]:
    """``POST .../{name}/test``: docs/admin-api.md#testing-a-connection."""
    return {
        "parameters": [
            {"name": "name", "in": "path", "required": True, "schema": NAME},
            {"name": "fresh", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "1, true or yes: fetch a new token instead of reusing the cached "
                            "one (the cache is left as it is)"}],
        "post": {
            "tags": [tag], "summary": f"Test {what}: {steps}",
            "operationId": f"test_{tag.split()[0].lower()}",
            "description": "Runs the real path once and answers each step with ok, failed "
                           "or skipped, the time it took and a redacted plain-words detail. "
                           "Needs the admin token; works in read-only mode (it changes "
                           "nothing). One test at a time per name, at most one per second.",
            "security": [{"adminToken": []}],
            "responses": {
                "200": {"description": "The steps (ok is false when one failed)",
                        **_json(_ref("ProbeReport"))},
                "400": WRITE_ERRORS["400"],
                "404": _error("No such name"),
                **ACCESS_ERRORS,
                "429": _error("A test of this name is running or started less than a second "
                              "ago, or too many failed authentication attempts; retry after "
                              "Retry-After seconds"),
            },
        },
    }


@functools.cache
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
    # Egress proxies are the config file's: read-only here (docs/admin-api.md#egress-proxies).
    egress = _resource("egress proxies", "EgressProxy", None)
    paths["/api/egress-proxies"] = egress["list"]
    item = egress["item"]
    paths["/api/egress-proxies/{name}"] = {"parameters": item["parameters"], "get": item["get"]}
    paths["/api/connections/{name}/test"] = _probe(
        "connections", "a connection", "connect, TLS, credentials, GET [base]/metadata")
    paths["/api/oauth/{name}/test"] = _probe(
        "OAuth definitions", "an OAuth definition", "connect and TLS to the token endpoint, "
        "a token")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fhir-sidecar admin API",
            "version": __version__,
            "description": "Create, replace and delete connections, Basic Auth and OAuth "
                           "definitions and CA bundles of a running fhir-sidecar, and read its "
                           "egress proxies (defined in the config file only). Changes are "
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
