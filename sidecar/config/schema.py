"""JSON Schemas generated from the config models, which are the only place the shape is written.

The config file's schema (draft 2020-12) is printed by ``fhir-sidecar config-schema`` and
published as ``docs/config.schema.json``; the Helm chart's ``config`` value and the admin API's
OpenAPI document are generated from the same models (``.ci/values_schema.py``,
:mod:`sidecar.admin.openapi`). What a schema cannot say (one of two fields, references between
sections, files that must exist) is checked when the config is loaded and compiled.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from sidecar.config.models import ListenAddress, SidecarConfig

DIALECT = "https://json-schema.org/draft/2020-12/schema"
JsonSchema = dict[str, Any]


class ModelJsonSchema(GenerateJsonSchema):
    """pydantic's generator, with what the models mean but pydantic cannot tell.

    A named section (``dict[Name, ...]``) has no other keys than names that follow the rule,
    and field titles (pydantic derives them from the field names) are left out: they repeat
    the key.
    """

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def dict_schema(self, schema: Any) -> JsonSchema:  # pydantic-core's DictSchema
        generated = super().dict_schema(schema)
        if "patternProperties" in generated:
            generated["additionalProperties"] = False
        return generated

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, ListenAddress):
            return str(dft)
        return super().encode_default(dft)


def model_schema(model: type[BaseModel], ref_template: str = "#/$defs/{model}") -> JsonSchema:
    return model.model_json_schema(ref_template=ref_template, schema_generator=ModelJsonSchema)


def config_json_schema() -> JsonSchema:
    """The config file's JSON Schema, as ``fhir-sidecar config-schema`` prints it."""
    generated = model_schema(SidecarConfig)
    return {"$schema": DIALECT, "title": "fhir-sidecar config file",
            **{k: v for k, v in generated.items() if k != "title"}}


def inline_refs(schema: JsonSchema) -> JsonSchema:
    """``schema`` with every ``$ref`` into its own ``$defs`` replaced by the definition, for
    a place that takes one self-contained schema (the chart's values schema). The config
    models are not recursive, so this ends."""
    definitions = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/$defs/")
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            return resolve({**copy.deepcopy(definitions[name]), **siblings})
        return {k: resolve(v) for k, v in node.items() if k != "$defs"}

    resolved: JsonSchema = resolve(schema)
    return resolved
