"""FHIR-shaped benchmark bodies: Observation ``searchset`` pages as a FHIR server sends them.

Each page has ``self`` and ``next`` links before its entries and every ``fullUrl`` under the
upstream's base, like the pages of HAPI or Firely: the links must be rewritten, the fullUrls
must not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sidecar.testkit.fhir_resources import to_xml


@dataclass(frozen=True)
class Page:
    key: str  # also the file name stem
    entries: int
    xml: bool = False

    @property
    def file_name(self) -> str:
        return f"{self.key}.{'xml' if self.xml else 'json'}"

    @property
    def label(self) -> str:
        return f"{'XML' if self.xml else 'JSON'} {self.key.split('-')[-1].upper()}"


# Entry counts chosen so the pages come out at about 8 KB, 80 KB, 400 KB and 6 MB.
PAGES = (
    Page("json-8k", 12),
    Page("json-80k", 120),
    Page("json-400k", 600),
    Page("xml-400k", 470, xml=True),
    Page("json-6m", 9000),
)


def observation(base: str, index: int) -> dict[str, Any]:
    return {
        "fullUrl": f"{base}/Observation/obs-{index}",
        "resource": {
            "resourceType": "Observation", "id": f"obs-{index}",
            "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00.000+00:00"},
            "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs", "display": "Vital Signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4",
                                 "display": "Heart rate"}], "text": "Heart rate"},
            "subject": {"reference": f"Patient/pat-{index % 97}"},
            "effectiveDateTime": f"2024-04-{1 + index % 28:02d}T10:{index % 60:02d}:00Z",
            "valueQuantity": {"value": 50 + index % 70, "unit": "beats/minute",
                              "system": "http://unitsofmeasure.org", "code": "/min"},
        },
        "search": {"mode": "match"},
    }


def searchset(base: str, page: Page) -> dict[str, Any]:
    query = f"{base}/Observation?code=8867-4&_count={page.entries}"
    return {
        "resourceType": "Bundle", "id": f"bench-{page.key}",
        "meta": {"lastUpdated": "2024-05-01T10:00:00.000+00:00"},
        "type": "searchset", "total": 10 * page.entries,
        "link": [{"relation": "self", "url": query},
                 {"relation": "next", "url": f"{query}&_getpagesoffset={page.entries}"}],
        "entry": [observation(base, i) for i in range(page.entries)],
    }


def body(base: str, page: Page) -> bytes:
    bundle = searchset(base, page)
    if page.xml:
        return to_xml(bundle)
    return json.dumps(bundle, separators=(",", ":")).encode()


def next_link(base: str, page: Page) -> str:
    return f"{base}/Observation?code=8867-4&_count={page.entries}&_getpagesoffset={page.entries}"
