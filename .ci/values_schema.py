"""Generate the `config` part of helm/fhir-sidecar/values.schema.json from the config models.

    python .ci/values_schema.py           # write it
    python .ci/values_schema.py --check   # exit 1 when the committed schema differs (CI)

The models (sidecar/config/models.py) are the only place the config's shape is written; this
turns their JSON Schema (fhir-sidecar config-schema) into the self-contained form a chart's
values schema takes (no $defs), with each top-level section also allowed to be null (the chart
drops empty and null sections from the config it renders). Every object forbids unknown keys,
so a misspelt key anywhere under `config` fails `helm template` and `helm install`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VALUES_SCHEMA = REPO / "helm" / "fhir-sidecar" / "values.schema.json"
DESCRIPTION = ("the sidecar's config file, as fhir-sidecar config-schema describes it (sections: "
               "{sections}); empty or null sections are left out")


def chart_config_schema() -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from sidecar.config.schema import config_json_schema, inline_refs

    generated = inline_refs(config_json_schema())
    sections: dict[str, Any] = generated["properties"]
    for section in sections.values():
        section["type"] = ["object", "null"]
        section.pop("default", None)
    return {"type": "object",
            "description": DESCRIPTION.format(sections=", ".join(sections)),
            "additionalProperties": False,
            "properties": sections}


def render(current: str) -> str:
    schema = json.loads(current)
    schema["properties"]["config"] = chart_config_schema()
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str]) -> int:
    current = VALUES_SCHEMA.read_text(encoding="utf-8")
    wanted = render(current)
    if "--check" in argv:
        if wanted != current:
            print(f"{VALUES_SCHEMA}: the config part differs from the config "
                  "models; run `python .ci/values_schema.py` and commit the result",
                  file=sys.stderr)
            return 1
        return 0
    VALUES_SCHEMA.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
