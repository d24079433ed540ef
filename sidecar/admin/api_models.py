"""The admin API's request and response bodies as pydantic models: ``/api/openapi.json`` is
generated from them (:mod:`.openapi`), and the views are built with them (:mod:`.views`).

Request bodies are derived from the config file's models, so a config key is offered by the API
as soon as it exists there, with the same type, range and description. What the API takes
differs from the file in one way: secrets are values, never a file path or an environment
variable name (``*_file``, ``*_env``, ``tls.client_cert``, ``tls.client_key`` are refused with
422 by :func:`sidecar.admin.config_store.check_no_references`), and ``tls.ca_bundle`` names a
bundle uploaded with ``PUT /api/ca-bundles/{name}``. These models describe the bodies; the
checks themselves stay with the config models, which validate the config file a change makes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from sidecar.config.models import (
    BasicAuthDefinition,
    ClientAuth,
    ConnectionSettings,
    Name,
    NameReference,
    OAuthDefinition,
    SigningAlg,
    TlsSettings,
    TlsVerify,
)
from sidecar.credentials.jwks import Slot

# Field names the API refuses: it never reads a file or an environment variable it is named.
REFERENCE_SUFFIXES = ("_file", "_env")
TLS_PATH_FIELDS = ("client_cert", "client_key")

SecretState = Literal["set", "not set"]
UsedSecretState = Literal[SecretState, "not used"]
ReadOnly = Annotated[str | None, Field(description=(
    "Why the API does not change or remove this definition (it comes from the config file "
    "and reads files or environment variables there); null when it may"))]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- request bodies -------------------------------------------------------------------------

def _secret(description: str) -> Any:
    return (str | None, Field(default=None, min_length=1, description=description,
                              json_schema_extra={"writeOnly": True}))


def _api_input(model: type[BaseModel], name: str, doc: str, *, drop: tuple[str, ...] = (),
               **replace: Any) -> type[ApiModel]:
    """``model``'s fields, without the ones that name files or environment variables, with
    ``replace`` in place of (or besides) the fields it names."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        if field_name.endswith(REFERENCE_SUFFIXES) or field_name in drop:
            continue
        fields[field_name] = replace.pop(field_name, (info.annotation, info))
    fields.update(replace)
    built: type[ApiModel] = create_model(name, __base__=ApiModel, __doc__=doc,
                                         __module__=__name__, **fields)
    return built


TlsInput = _api_input(
    TlsSettings, "TlsInput", "How the sidecar verifies the upstream (no file paths here: a "
    "client certificate and key are set in the config file)", drop=TLS_PATH_FIELDS,
    ca_bundle=(NameReference | None, Field(default=None, description=(
        "The name of a CA bundle uploaded with PUT /api/ca-bundles/{name} (never a path)"))))

def _via_input() -> Any:
    return (NameReference | None, Field(default=None, description=(
        "The name of an egress proxy (GET /api/egress-proxies) to tunnel through. PUT replaces "
        "the whole definition, so null and omitting it both mean a direct connection")))


ConnectionInput = _api_input(
    ConnectionSettings, "ConnectionInput", "A connection, as PUT /api/connections/{name} takes it",
    tls=(TlsInput, Field(default_factory=TlsInput)), via=_via_input())

BasicAuthInput = _api_input(
    BasicAuthDefinition, "BasicAuthInput", "A Basic Auth definition, as PUT "
    "/api/basic-auth/{name} takes it",
    password=_secret("The new password (write-only; omit to keep the current one). It is "
                     "stored in the sidecar's own secrets directory"))

OAuthInput = _api_input(
    OAuthDefinition, "OAuthInput", "An OAuth definition, as PUT /api/oauth/{name} takes it. "
    "Set token_url or discover_from",
    client_secret=_secret("The new client secret (write-only; omit to keep the current one)"),
    tls=(TlsInput, Field(default_factory=TlsInput)),
    private_key_pem=_secret("PEM private key for private_key_jwt (write-only; omit to keep "
                            "the current one)"),
    via=_via_input())


# -- response bodies ------------------------------------------------------------------------

Via = Annotated[Name | None, Field(description=(
    "The egress proxy (GET /api/egress-proxies) its upstream traffic tunnels through; null "
    "for a direct connection"))]


class TlsView(ApiModel):
    verify: TlsVerify
    ca_bundle: str | None = Field(description=(
        "The name of an uploaded CA bundle, or the path the config file gives"))
    client_cert: str | None
    client_key: Literal["set"] | None
    server_name: str | None


class AuthView(ApiModel):
    basic: Name | None
    oauth: Name | None


class LastError(ApiModel):
    error: str
    at: str | None


Light = Literal["green", "amber", "red"]


class HealthView(ApiModel):
    """The connection's status light (docs/admin-api.md#the-status-light)"""

    light: Light
    reason: str = Field(description="The worst finding, or why the light is green")
    reasons: list[str] = Field(description="Every finding, worst first; empty when green")


class ExpiryView(ApiModel):
    expires_at: str = Field(description="UTC, ISO 8601")
    days_left: int = Field(description="Whole days left, rounded down; negative once expired")
    light: Light = Field(description="red under 7 days (or expired), amber under 30")


class CertificatesView(ApiModel):
    ca_bundle: ExpiryView | None = Field(description=(
        "The earliest expiry among the CA bundle's certificates (verify: custom)"))
    client_cert: ExpiryView | None = Field(description="The TLS client certificate's expiry")


class ConnectionToken(ApiModel):
    """The OAuth token the connection's requests carry (no value, ever)"""

    definition: Name
    usable: bool = Field(description="A cached token may be sent now")
    valid_until: str | None
    issued_at: str | None = Field(description="When the cached token was asked for")
    seconds_left: int | None
    lifetime_seconds: int | None
    last_error: str | None = Field(description="The last token request's failure (redacted); "
                                               "null once one succeeded")


class TrendView(ApiModel):
    """Requests and errors per minute over the last hour, oldest minute first (60 each)"""

    since: str = Field(description="The start of the oldest minute (UTC, ISO 8601)")
    requests: list[int]
    errors: list[int]


class ConnectionStatus(ApiModel):
    requests_recent: dict[str, int] = Field(description="Requests of the last 5 minutes, by "
                                                        "status class")
    errors_recent: dict[str, int] = Field(description="Requests of the last 5 minutes that "
                                                      "ended in an error, by error word")
    in_flight: int
    last_status: int | None
    last_error: LastError | None
    tls_ok: bool | None


class Connection(ApiModel):
    name: Name
    url: str
    listen: str | None
    auth: AuthView
    tls: TlsView
    timeout_seconds: float
    read_timeout_seconds: float
    rewrite_links: bool
    via: Via
    read_only: ReadOnly
    from_config_file: dict[str, str] = Field(description=(
        "Host paths the config file gives this connection (field path, e.g. tls.ca_bundle, to "
        "the file's own text). A PUT may repeat one (as the file spells it, or as tls shows "
        "it) to keep it; it cannot introduce or change one"))
    status: ConnectionStatus
    health: HealthView
    token: ConnectionToken | None = Field(description="Connections with an OAuth definition")
    certificates: CertificatesView
    trend: TrendView


class BasicAuth(ApiModel):
    name: Name
    username: str
    password: SecretState
    password_env: str | None
    read_only: ReadOnly
    used_by: list[Name]


class SigningKeyView(ApiModel):
    slot: Slot
    kid: str
    alg: SigningAlg


class TokenView(ApiModel):
    valid_until: str | None
    last_refresh: str | None
    last_error: str | None
    scopes: list[str]
    last_result: str | None


class OAuth(ApiModel):
    name: Name
    token_url: str | None
    discover_from: str | None
    client_id: str
    client_auth: ClientAuth
    client_secret: UsedSecretState
    client_secret_env: str | None
    private_key: UsedSecretState
    key_id: str | None
    signing_alg: SigningAlg
    signing_keys: list[SigningKeyView] = Field(description=(
        "The published public keys of a private_key_jwt definition (read-only; served in "
        "/.well-known/jwks.json)"))
    scopes: list[str]
    audience: str | None
    resource: str | None
    extra_params: dict[str, str]
    default_expires_in: int
    tls: TlsView
    via: Via
    read_only: ReadOnly
    used_by: list[Name]
    token: TokenView


class CertificateView(ApiModel):
    subject: str
    not_after: str | None
    is_ca: bool
    expiry: ExpiryView | None


class CaBundle(ApiModel):
    name: Name
    certificates: list[CertificateView]
    expiry: ExpiryView | None = Field(description="The earliest expiry of its certificates")
    used_by: list[str] = Field(description="Connections, and OAuth definitions as oauth:NAME")
    problem: str | None


class EgressProxy(ApiModel):
    """An egress proxy (read-only: egress proxies are defined in the config file)"""

    name: Name
    url: str = Field(description="scheme://host:port of the proxy (never credentials)")
    username_set: bool = Field(description="Whether CONNECT sends Proxy-Authorization (the "
                                           "username itself is not shown)")
    password: UsedSecretState = Field(description=(
        "Whether the proxy password can be read now; \"not used\" without a username. "
        "The value is never shown"))
    password_source: Literal["file", "env"] | None = Field(description=(
        "Where the config file takes the password from; null without a username"))
    tls_verify: TlsVerify | None = Field(description=(
        "How the sidecar verifies an https:// proxy's certificate; null for http://"))
    read_only: str = Field(description="Why the API does not change it: always set")
    used_by: list[str] = Field(description="Connections whose via names it, and OAuth "
                                           "definitions as oauth:NAME")


class ProbeCertificate(ApiModel):
    subject: str
    issuer: str
    not_after: str = Field(description="When the certificate expires (UTC, ISO 8601)")


class ProbeStep(ApiModel):
    step: Literal["connect", "tls", "credentials", "metadata"]
    title: str
    status: Literal["ok", "failed", "skipped"] = Field(description=(
        "skipped: an earlier step failed, or the step does not apply (plain http://, no "
        "credentials configured); detail says which"))
    ms: float | None = Field(description="How long the step took, in milliseconds")
    detail: str = Field(description="What happened, in plain words (redacted)")
    certificate: ProbeCertificate | None = Field(description="tls: the server's certificate")
    tls_version: str | None
    http_status: int | None = Field(description="metadata: the status of GET [base]/metadata")
    fhir_version: str | None = Field(description="metadata: the CapabilityStatement's "
                                                 "fhirVersion")
    software: str | None = Field(description="metadata: the CapabilityStatement's software "
                                             "name (and version)")
    token_reused: bool | None = Field(description=(
        "credentials: the cached token was used (no token request); false after a fetch"))
    token_expires_in_seconds: int | None


class ProbeReport(ApiModel):
    """The answer of POST /api/connections/{name}/test and POST /api/oauth/{name}/test"""

    kind: Literal["connection", "oauth"]
    name: Name
    url: str = Field(description="The connection's URL, or the definition's token endpoint")
    ok: bool = Field(description="No step failed")
    started_at: str
    steps: list[ProbeStep]


class Error(ApiModel):
    error: str
    problems: list[str] = Field(description="One line per problem: FILE: field.path: what is "
                                            "wrong")


def _list_of(model: type[ApiModel]) -> type[ApiModel]:
    built: type[ApiModel] = create_model(f"{model.__name__}List", __base__=ApiModel,
                                         __module__=__name__, items=(list[model], ...))  # type: ignore[valid-type]
    return built


REQUESTS: tuple[type[ApiModel], ...] = (ConnectionInput, BasicAuthInput, OAuthInput)
RESOURCES: tuple[type[ApiModel], ...] = (Connection, BasicAuth, OAuth, CaBundle, EgressProxy)
RESULTS: tuple[type[ApiModel], ...] = (ProbeReport,)
LISTS = {model.__name__: _list_of(model) for model in RESOURCES}
