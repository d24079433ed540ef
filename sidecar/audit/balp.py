"""An audit record as an R4 ``AuditEvent``, shaped after IHE BALP (Basic Audit Log Patterns)
for RESTful interactions as recorded by the client
(docs/audit.md#a-record-as-an-auditevent).

Only the record's own fields are used: configured names, fixed words, numbers, addresses and
ids the sidecar derived. A record never holds a credential, a header value, a body or a query
string, so neither does its AuditEvent. BALP's ``entity.query`` (the raw search, base64) is
deliberately never filled in: a query can carry patient data, and only the patient reference
derived from it is kept.

Deviations from the BALP profiles, all forced by what the sidecar may keep:

- the client agent is the caller itself (``requestor: true``): the sidecar knows the workload
  token's subject or the app's address, not a human user;
- a search's query entity names the searched type in ``description`` instead of carrying the
  query;
- a type-level interaction (create, history-type, a type-level operation) has no resource id
  yet: its data entity names the type in ``what.type``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any

from sidecar.audit.interactions import Interaction
from sidecar.audit.records import Record

Json = dict[str, Any]

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DICOM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
LIFECYCLE = "http://terminology.hl7.org/CodeSystem/dicom-audit-lifecycle"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"

OBSERVER = "fhir-sidecar"

# AuditEvent.outcome (http://hl7.org/fhir/audit-event-outcome).
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = "0", "4", "8", "12"
# The sidecar itself failed: it could not handle the request (a bug) or could not keep its
# audit trail. Everything else a sidecar answered is judged by its status.
MAJOR_ERRORS = frozenset({"internal-error", "audit-unavailable"})

_SEARCHES = frozenset({"search-type", "search-system"})
# Error words safe to repeat in outcomeDesc: fixed kinds such as ``upstream-timeout``.
_WORD = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HOST = socket.gethostname()


def _coding(system: str, code: str, display: str | None = None) -> Json:
    coding = {"system": system, "code": code}
    if display is not None:
        coding["display"] = display
    return coding


REST = _coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation")
SECURITY_ALERT = _coding(DICOM, "110113", "Security Alert")
USER_AUTHENTICATION = _coding(DICOM, "110114", "User Authentication")
LOGIN = _coding(DICOM, "110122", "Login")
SECURITY_CONFIGURATION = _coding(DICOM, "110129", "Security Configuration")
SOURCE_ROLE = _coding(DICOM, "110153", "Source Role ID")
DESTINATION_ROLE = _coding(DICOM, "110152", "Destination Role ID")
APPLICATION = _coding(DICOM, "110150", "Application")
CUSTODIAN = _coding(PARTICIPANT_TYPE, "custodian", "Custodian")
PERSON = _coding(ENTITY_TYPE, "1", "Person")
SYSTEM_OBJECT = _coding(ENTITY_TYPE, "2", "System Object")
PATIENT_ROLE = _coding(OBJECT_ROLE, "1", "Patient")
DOMAIN_RESOURCE = _coding(OBJECT_ROLE, "4", "Domain Resource")
SECURITY_RESOURCE = _coding(OBJECT_ROLE, "13", "Security Resource")
QUERY_ROLE = _coding(OBJECT_ROLE, "24", "Query")
X_REQUEST_ID = _coding(BALP_ENTITY_TYPE, "XrequestId",
                       "transport specific unique identifier where http X-Request-Id is used")
APPLICATION_SERVER = _coding(SOURCE_TYPE, "4", "Application Server")
_LIFECYCLE = {"created": _coding(LIFECYCLE, "1", "Origination / Creation"),
              "replaced": _coding(LIFECYCLE, "3", "Amendment"),
              "deleted": _coding(LIFECYCLE, "14", "Logical deletion")}
_CHANGE_ACTIONS = {"created": "C", "replaced": "U", "deleted": "D"}


def audit_event(record: Record, server: str | None = None) -> Json:
    """``record`` as an AuditEvent; ``server``: the base URL of the record's connection (the
    FHIR server agent), when known."""
    kind = record.get("kind", "request")
    if kind == "request":
        return _request_event(record, server)
    return _admin_event(record, server)


def _base(record: Record, type_: Json, action: str, outcome: str) -> Json:
    event: Json = {"resourceType": "AuditEvent", "id": record["audit_id"], "type": type_,
                   "action": action, "recorded": record["ts"], "outcome": outcome}
    return event


def _source() -> Json:
    return {"site": _HOST, "observer": {"identifier": {"value": OBSERVER}, "display": OBSERVER},
            "type": [APPLICATION_SERVER]}


def outcome_of(record: Record) -> str:
    """``0`` for 2xx/3xx, ``4`` for 4xx, ``8`` for 5xx and for a request the upstream never
    answered, ``12`` when the sidecar itself failed (``internal-error``, ``audit-unavailable``)."""
    error = record.get("error")
    if error in MAJOR_ERRORS:
        return MAJOR_FAILURE
    status = record.get("status")
    if isinstance(status, int) and 100 <= status < 400 and error is None:
        return SUCCESS
    if isinstance(status, int) and 400 <= status < 500:
        return MINOR_FAILURE
    return SERIOUS_FAILURE


def _outcome_desc(record: Record) -> str | None:
    error = record.get("error")
    status = record.get("status")
    parts = []
    if isinstance(error, str) and _WORD.fullmatch(error):
        parts.append(error)
    if isinstance(status, int):
        parts.append(f"HTTP {status}")
    return ", ".join(parts) or None


def _network(address: str | None) -> Json | None:
    """An agent's network entry when ``address`` is an IP address (type 2)."""
    if not address:
        return None
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None
    return {"address": address, "type": "2"}


def _caller_agent(caller: str | None, type_: Json | None, name: str | None = None) -> Json:
    agent: Json = {"requestor": True}
    if type_ is not None:
        agent["type"] = {"coding": [type_]}
    if caller:
        agent["who"] = {"identifier": {"value": caller}, "display": caller}
    if name is not None:
        agent["name"] = name
    network = _network(caller)
    if network is not None:
        agent["network"] = network
    return agent


def _server_agent(connection: str | None, server: str | None, type_: Json) -> Json | None:
    if connection is None and server is None:
        return None
    who: Json = {}
    if server is not None:
        who["identifier"] = {"value": server}
    who["display"] = connection or server
    agent: Json = {"type": {"coding": [type_]}, "requestor": False, "who": who}
    if connection is not None:
        agent["name"] = connection
    if server is not None:
        agent["network"] = {"address": server, "type": "5"}
    return agent


def _roles(action: str) -> tuple[Json, Json]:
    """BALP's agent types (client, server): data flows from the server on a read, to it
    otherwise; a delete names the client Application and the server Custodian."""
    if action == "R":
        return DESTINATION_ROLE, SOURCE_ROLE
    if action == "D":
        return APPLICATION, CUSTODIAN
    return SOURCE_ROLE, DESTINATION_ROLE


def _action(interaction: str | None) -> str:
    # BALP's Query profile (and AuditEvent's own definition of E) makes a search an Execute.
    if interaction in _SEARCHES:
        return "E"
    return Interaction(interaction).action


def _request_event(record: Record, server: str | None) -> Json:
    interaction = record.get("interaction")
    action = _action(interaction)
    event = _base(record, REST, action, outcome_of(record))
    if interaction:
        event["subtype"] = [_coding(RESTFUL_INTERACTION, interaction, interaction)]
    desc = _outcome_desc(record)
    if desc is not None:
        event["outcomeDesc"] = desc
    client_type, server_type = _roles(action)
    agents = [_caller_agent(record.get("caller"), client_type)]
    server_agent = _server_agent(record.get("connection"), server, server_type)
    if server_agent is not None:
        agents.append(server_agent)
    event["agent"] = agents
    event["source"] = _source()
    entities = [entity for entity in (
        _data_entity(interaction, record.get("resource_type"), record.get("resource_id")),
        _patient_entity(record.get("patient")),
        _credential_entity(record.get("credential")),
        _request_id_entity(record.get("request_id")),
    ) if entity is not None]
    if entities:
        event["entity"] = entities
    return event


def _data_entity(interaction: str | None, resource_type: str | None,
                 resource_id: str | None) -> Json | None:
    if interaction in _SEARCHES:
        entity: Json = {"type": SYSTEM_OBJECT, "role": QUERY_ROLE}
        if resource_type:
            entity["description"] = resource_type
        return entity
    if interaction == "capabilities":
        resource_type = "CapabilityStatement"
    elif interaction in ("transaction", "batch"):
        resource_type = "Bundle"
    if not resource_type:
        return None
    what: Json = ({"reference": f"{resource_type}/{resource_id}"} if resource_id
                  else {"type": resource_type})
    return {"what": what, "type": SYSTEM_OBJECT, "role": DOMAIN_RESOURCE}


def _patient_entity(patient: str | None) -> Json | None:
    if not patient:
        return None
    return {"what": {"reference": patient}, "type": PERSON, "role": PATIENT_ROLE}


def _credential_entity(credential: str | None) -> Json | None:
    """The credential definition used, by name (never its value)."""
    if not credential:
        return None
    return {"what": {"identifier": {"value": credential}, "display": credential},
            "type": SYSTEM_OBJECT, "role": SECURITY_RESOURCE,
            "description": "credential definition"}


def _request_id_entity(request_id: str | None) -> Json | None:
    if not request_id:
        return None
    return {"what": {"identifier": {"value": request_id}}, "type": X_REQUEST_ID}


def _admin_outcome(record: Record) -> str:
    if record.get("result") == "success":
        return SUCCESS
    if record.get("error") in MAJOR_ERRORS:
        return MAJOR_FAILURE
    # A failed connection test is the connection failing; a refused login, change or
    # reload is the admin's request refused.
    return SERIOUS_FAILURE if record.get("kind") == "test" else MINOR_FAILURE


def _admin_event(record: Record, server: str | None) -> Json:
    """A login (DICOM User Authentication / Login), a change or a reload (DICOM Security Alert
    / Security Configuration), or a connection test (``rest``, action E)."""
    kind = record.get("kind")
    entities: list[Json | None] = []
    if kind == "login":
        event = _base(record, USER_AUTHENTICATION, "E", _admin_outcome(record))
        event["subtype"] = [LOGIN]
    elif kind == "change":
        action = record.get("action")
        event = _base(record, SECURITY_ALERT, _CHANGE_ACTIONS.get(action or "", "E"),
                      _admin_outcome(record))
        event["subtype"] = [SECURITY_CONFIGURATION]
        entities.append(_object_entity(record.get("object"), _LIFECYCLE.get(action or "")))
    elif kind == "reload":
        event = _base(record, SECURITY_ALERT, "E", _admin_outcome(record))
        event["subtype"] = [SECURITY_CONFIGURATION]
        digest = record.get("config_sha256")
        if digest:
            entities.append({"what": {"identifier": {"type": {"text": "sha256"},
                                                     "value": digest},
                                      "display": "configuration file"},
                             "type": SYSTEM_OBJECT, "role": SECURITY_RESOURCE,
                             "description": "configuration file"})
    else:  # test
        event = _base(record, REST, "E", _admin_outcome(record))
        entities.append(_object_entity(record.get("object") or record.get("connection"), None))
    desc = _outcome_desc(record)
    if desc is not None:
        event["outcomeDesc"] = desc
    via = record.get("via")
    client = record.get("client")
    if client is not None or via is not None:
        admin = _caller_agent(client, None, name=f"admin ({via})" if via else "admin")
    else:  # a reload from the file or a signal: the sidecar acted on its own
        admin = {"requestor": True, "who": {"display": OBSERVER}}
    agents = [admin]
    server_agent = _server_agent(record.get("connection"), server, DESTINATION_ROLE)
    if server_agent is not None:
        agents.append(server_agent)
    event["agent"] = agents
    event["source"] = _source()
    entities.append(_request_id_entity(record.get("request_id")))
    kept = [entity for entity in entities if entity is not None]
    if kept:
        event["entity"] = kept
    return event


def _object_entity(name: str | None, lifecycle: Json | None) -> Json | None:
    """What an admin changed or tested: ``basic-auth/NAME``, ``connections/NAME``, ..."""
    if not name:
        return None
    entity: Json = {"what": {"identifier": {"value": name}, "display": name},
                    "type": SYSTEM_OBJECT, "role": SECURITY_RESOURCE}
    if lifecycle is not None:
        entity["lifecycle"] = lifecycle
    return entity
