"""The config file's shape (docs/configuration.md), as pydantic models that validate themselves.

Relative paths are resolved against the config file's directory: the loader passes it as
validation context ``{"base_dir": Path}``. These models only check shape and cross references;
reading secrets, keys and bundles happens when a snapshot is compiled
(``sidecar.runtime.snapshot``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

# The one rule for every name (connections, definitions, egress proxies, CA bundles), in config
# and API alike. NAME_RULE is how messages state it; the regular expression adds the length
# bound, so that a JSON Schema can check both with one pattern.
_NAME_FIRST, _NAME_REST = "[a-z0-9]", "[a-z0-9_-]"
NAME_RULE = f"{_NAME_FIRST}{_NAME_REST}*"
NAME_MAX_LENGTH = 63
NAME_REGEX = f"^{_NAME_FIRST}{_NAME_REST}{{0,{NAME_MAX_LENGTH - 1}}}$"
_NAME_PATTERN = re.compile(NAME_REGEX)
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9901"


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is not None and not value.is_absolute():
        # Normalise without resolving symlinks: a Kubernetes volume's files are symlinks
        # through ``..data``, which must be followed anew on every read.
        return Path(os.path.normpath(Path(base_dir) / value))
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


@dataclass(frozen=True)
class ListenAddress:
    """A listener's ``HOST:PORT``, parsed once: every user of a listen address reads this.

    ``host`` has no brackets; IP literals are in their canonical form and names are lower
    case, so equal addresses compare equal.
    """

    host: str
    port: int

    @classmethod
    def parse(cls, value: str) -> ListenAddress:
        host, sep, port = value.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if bracketed:
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:8081)")
        if ":" in host and not bracketed:
            raise ValueError(f"{value!r}: an IPv6 address is written in brackets, "
                             "for example [::1]:8081")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if ":" in host:
                raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
            host = host.lower()
        return cls(host, int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def is_loopback(self) -> bool:
        """Reachable from this machine only: a loopback address, or ``localhost``."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def is_wildcard(self) -> bool:
        """0.0.0.0 or ::, which listen on every interface."""
        return self.host in _WILDCARD_HOSTS

    def overlaps(self, other: ListenAddress) -> bool:
        """Whether both cannot be bound at once: the same port on the same or every interface.

        Port 0 picks a free port when bound, so it overlaps nothing.
        """
        if self.port != other.port or self.port == 0:
            return False
        return self.host == other.host or self.is_wildcard or other.is_wildcard


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _parse_listen(value: object) -> ListenAddress:
    if isinstance(value, ListenAddress):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:8081)")
    return ListenAddress.parse(value)


Listen = Annotated[
    ListenAddress,
    PlainValidator(_parse_listen),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": "^.+:[0-9]{1,5}$",
                    "description": "HOST:PORT, for example 127.0.0.1:8081 or [::1]:8081"}),
]


# A field naming a definition of another section. A name that does not follow the rule names
# nothing, which the cross-reference check reports; a schema can say so at once.
NameReference = Annotated[str, WithJsonSchema({"type": "string", "pattern": NAME_REGEX})]


@dataclass(frozen=True)
class Listener:
    """One address the config binds, and what for (the forward proxy, the admin listener or
    a connection's own listener)."""

    path: str  # the field path, for messages: "connections.epic.listen"
    address: ListenAddress
    kind: Literal["proxy", "admin", "connection"]
    connection: str | None = None  # the connection a "connection" listener belongs to


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TlsVerify = Literal["default", "custom", "skip"]


class TlsSettings(_Model):
    """How the sidecar verifies an upstream server (a FHIR server or a token endpoint)."""

    verify: TlsVerify = Field(default="default", description=(
        "default: the system's trusted CAs (certifi); custom: only ca_bundle; skip: no "
        "verification at all"))
    ca_bundle: ConfigPath | None = Field(
        default=None, description="PEM file of trusted CAs (with verify: custom)")
    client_cert: ConfigPath | None = Field(
        default=None, description="PEM client certificate (chain) for mutual TLS")
    client_key: ConfigPath | None = Field(
        default=None, description="PEM private key of client_cert, if not in that file")
    server_name: str | None = Field(
        default=None, description="the name sent as SNI and verified, instead of the URL's host")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.verify == "custom" and self.ca_bundle is None:
            raise ValueError("verify: custom needs ca_bundle (a PEM file of trusted CAs)")
        if self.verify != "custom" and self.ca_bundle is not None:
            raise ValueError(
                f"ca_bundle is only used with verify: custom (verify is {self.verify})")
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        return self


class ProxySettings(_Model):
    listen: Listen | None = Field(
        default=None, description="the forward proxy (HTTP_PROXY) address; none when unset")
    intercept_https: bool = Field(default=False, description=(
        "terminate apps' HTTPS (CONNECT) to configured connections with the sidecar's own CA "
        "instead of refusing it; other hosts are still refused"))
    ca_cert_export: ConfigPath | None = Field(
        default=None, description="where to write that CA's certificate (PEM) at start")
    # A browser on a rebound DNS name sends that name: it gets 421.
    allowed_hosts: list[AllowedHost] = Field(default_factory=list, description=(
        "Host values an origin-form request on the forward proxy may carry besides the "
        "listener's own address and localhost (others get 421 misdirected); \"*\" turns the "
        "check off"))

    @model_validator(mode="after")
    def _intercept_needs_listener(self) -> Self:
        if self.intercept_https and self.listen is None:
            raise ValueError("intercept_https needs listen: HTTPS is intercepted on the "
                             "forward proxy")
        return self


class ShutdownSettings(_Model):
    """What SIGTERM does: keep serving while the load balancer's endpoint removal
    propagates, then stop accepting and let requests in flight finish."""

    delay_seconds: float = Field(default=0, ge=0, le=3600, description=(
        "/readyz answers 503 at once, but the listeners keep accepting for this long"))
    drain_seconds: float = Field(default=30, ge=0, le=3600, description=(
        "then the listeners close; requests in flight get at most this long to finish"))


_HOST_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def _check_host_name(value: str) -> str:
    name = value.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if len(name) > 253 or _HOST_NAME.fullmatch(name) is None:
        raise ValueError(f"{value!r} is not a host name or IP address (no scheme, no port; "
                         "for example fhir-sidecar.example.internal)")
    return name


def _check_allowed_host(value: str) -> str:
    return "*" if value.strip() == "*" else _check_host_name(value)


# ``connections.*.allowed_hosts`` and ``proxy.allowed_hosts``: host names, or "*" (no check).
AllowedHost = Annotated[str, AfterValidator(_check_allowed_host)]


def _check_origin(value: str) -> str:
    """An Origin as browsers send it: scheme://host[:port], lower case, default port left
    out; or ``null`` (opaque origins: sandboxed frames, file: pages)."""
    text = value.strip()
    if text == "null":
        return text
    parts = urlsplit(text.lower())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in ("http", "https") or not parts.hostname or port == -1
            or parts.path or parts.query or parts.fragment or "@" in parts.netloc):
        raise ValueError(f"{value!r} is not an origin (scheme://host[:port], as a browser's "
                         "Origin header has it; for example https://app.example.org)")
    default = {"http": 80, "https": 443}[parts.scheme]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


AllowedOrigin = Annotated[str, AfterValidator(_check_origin)]
_CALLER_RULE = re.compile(rf"({NAME_REGEX.strip('^$')}):(\S+)")


def _check_allowed_caller(value: str) -> str:
    if _CALLER_RULE.fullmatch(value) is None:
        raise ValueError(f"{value!r} must be <caller definition>:<subject>, for example "
                         "k8s:system:serviceaccount:billing:claims-api")
    return value


AllowedCaller = Annotated[str, AfterValidator(_check_allowed_caller)]


class AdminSettings(_Model):
    listen: Listen | None = Field(
        default=ListenAddress.parse(DEFAULT_ADMIN_LISTEN),
        description="the admin listener (/healthz, /readyz, /metrics, dashboard, API)")
    token_file: ConfigPath | None = Field(
        default=None, description="file holding the admin token that API writes need")
    # A browser on a rebound DNS name sends that name: it gets 421.
    allowed_hosts: list[Annotated[str, AfterValidator(_check_host_name)]] = Field(
        default_factory=list, description=(
            "Host header values the admin listener answers besides its own address and "
            "localhost (others get 421)"))


class LimitsSettings(_Model):
    """Bounds on what one app connection may cost the sidecar (memory, sockets, time)."""

    max_request_header_bytes: int = Field(
        default=65536, ge=1024, le=16 * 1024 * 1024,
        description="request line and headers, up to the blank line; larger heads get 431")
    client_header_timeout_seconds: float = Field(default=30, gt=0, description=(
        "a request head must be complete this long after its first byte"))
    client_idle_timeout_seconds: float = Field(default=300, gt=0, description=(
        "an app connection without a request for this long is closed"))


def _exactly_one(model: BaseModel, fields: tuple[str, ...], what: str) -> None:
    given = [f for f in fields if getattr(model, f) is not None]
    if len(given) != 1:
        names = ", ".join(fields)
        if not given:
            raise ValueError(f"{what}: set one of {names}")
        raise ValueError(f"{what}: set only one of {names} (found {', '.join(given)})")


class BasicAuthDefinition(_Model):
    username: str = Field(min_length=1)
    password_file: ConfigPath | None = Field(
        default=None, description="file holding the password (re-read when it changes)")
    password_env: str | None = Field(
        default=None, description="environment variable holding the password")
    password: str | None = Field(default=None, repr=False, description=(
        "the password inline (for development: it logs a warning; prefer password_file)"))

    @model_validator(mode="after")
    def _one_password(self) -> Self:
        _exactly_one(self, ("password_file", "password_env", "password"), "password")
        if ":" in self.username:
            raise ValueError("username must not contain ':' (HTTP Basic cannot carry it)")
        return self


ClientAuth = Literal["client_secret_basic", "client_secret_post", "private_key_jwt",
                     "tls_client_auth", "self_signed_tls_client_auth"]
# RFC 8705: the client authenticates with the TLS client certificate of its ``tls`` settings.
CERTIFICATE_CLIENT_AUTH = ("tls_client_auth", "self_signed_tls_client_auth")
SigningAlg = Literal["RS384", "ES384"]


class OAuthDefinition(_Model):
    token_url: str | None = Field(default=None, description="the token endpoint")
    discover_from: str | None = Field(default=None, description=(
        "a FHIR base URL whose .well-known/smart-configuration names the token endpoint"))
    client_id: str = Field(min_length=1)
    client_auth: ClientAuth = "client_secret_basic"
    client_secret_file: ConfigPath | None = None
    client_secret_env: str | None = None
    client_secret: str | None = Field(default=None, repr=False, description=(
        "the secret inline (for development: it logs a warning; prefer client_secret_file)"))
    private_key_file: ConfigPath | None = Field(
        default=None, description="private_key_jwt: the key that signs client assertions")
    # Published in the JWK Set, never used to sign
    # (docs/configuration.md#publishing-your-public-keys-and-rotating-them).
    next_private_key_file: ConfigPath | None = Field(default=None, description=(
        "private_key_jwt: published in /.well-known/jwks.json ahead of a rotation; signs nothing"))
    previous_private_key_file: ConfigPath | None = Field(default=None, description=(
        "private_key_jwt: still published after a rotation; signs nothing"))
    key_id: str | None = Field(default=None, description=(
        "kid of the current key (default: its RFC 7638 thumbprint)"))
    signing_alg: SigningAlg = "RS384"
    scopes: list[str] = Field(default_factory=list)
    audience: str | None = None
    resource: str | None = None
    extra_params: dict[str, str] = Field(default_factory=dict, description=(
        "more form parameters of the token request"))
    default_expires_in: int = Field(default=300, gt=0, description=(
        "seconds a token is taken to live when the endpoint does not say (expires_in)"))
    tls: TlsSettings = Field(default_factory=TlsSettings)
    via: NameReference | None = Field(default=None, description=(
        "an egress_proxies name: token requests and SMART discovery tunnel through it"))

    @field_validator("token_url", "discover_from")
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        if value is not None:
            _require_http_url(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _exactly_one(self, ("token_url", "discover_from"), "token endpoint")
        secret_fields = ("client_secret_file", "client_secret_env", "client_secret")
        if self.client_auth in CERTIFICATE_CLIENT_AUTH:
            if self.tls.client_cert is None:
                raise ValueError(f"client_auth: {self.client_auth} needs tls.client_cert (the "
                                 "certificate the token endpoint authenticates the client by)")
            given = [f for f in secret_fields if getattr(self, f) is not None]
            if given:
                raise ValueError(f"client_auth: {self.client_auth} does not use {given[0]}")
        if self.client_auth == "private_key_jwt":
            if self.private_key_file is None:
                raise ValueError("client_auth: private_key_jwt needs private_key_file")
            given = [f for f in secret_fields if getattr(self, f) is not None]
            if given:
                raise ValueError(f"client_auth: private_key_jwt does not use {given[0]}")
        else:
            if self.client_auth not in CERTIFICATE_CLIENT_AUTH:
                _exactly_one(self, secret_fields, "client secret")
            for key_field in ("private_key_file", "next_private_key_file",
                              "previous_private_key_file"):
                if getattr(self, key_field) is not None:
                    raise ValueError(f"{key_field} is only used with private_key_jwt, "
                                     f"not {self.client_auth}")
        return self


class EgressProxyDefinition(_Model):
    """A corporate HTTP proxy that upstream traffic tunnels through (CONNECT)."""

    url: str = Field(description=(
        "http://HOST:PORT (CONNECT) or https://HOST:PORT (TLS to the proxy); never "
        "user:password@"))
    username: str | None = Field(default=None, description=(
        "sent as Proxy-Authorization Basic on the CONNECT only"))
    password_file: ConfigPath | None = None
    password_env: str | None = None
    tls: TlsSettings | None = Field(default=None, description=(
        "how the sidecar verifies an https:// proxy's own certificate"))

    @field_validator("url")
    @classmethod
    def _proxy_url(cls, value: str) -> str:
        _require_http_url(value, credentials_in="username and password_file or password_env")
        if urlsplit(value).path not in ("", "/"):
            raise ValueError(f"{value!r}: a proxy URL is scheme://host:port, without a path")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        password_given = self.password_file is not None or self.password_env is not None
        if self.username is not None:
            _exactly_one(self, ("password_file", "password_env"), "proxy password")
            if ":" in self.username:
                raise ValueError("username must not contain ':' (HTTP Basic cannot carry it)")
        elif password_given:
            raise ValueError("a proxy password needs username")
        if self.tls is not None and not self.url.startswith("https://"):
            raise ValueError("tls is only used with an https:// proxy URL (the TLS to the "
                             "FHIR server inside the tunnel follows the connection's own tls)")
        return self


class CallerDefinition(_Model):
    """Who issues the workload tokens (JWTs) apps prove themselves with: a Kubernetes API
    server (projected ServiceAccount tokens), SPIFFE (JWT-SVIDs) or any OIDC issuer."""

    issuer: str = Field(min_length=1, description="the tokens' iss claim, exactly")
    audience: str = Field(min_length=1, description=(
        "the aud the tokens must carry (for example fhir-sidecar)"))
    jwks_file: ConfigPath | None = Field(default=None, description=(
        "the issuer's public keys (JWK Set), kept current by the platform; re-read live"))
    jwks_url: str | None = Field(default=None, description=(
        "the issuer's JWK Set URL (https); fetched at start, every 10 minutes and on an "
        "unknown kid (at most once a minute)"))
    tls: TlsSettings = Field(default_factory=TlsSettings, description=(
        "how the sidecar verifies the jwks_url server"))
    bearer_token_file: ConfigPath | None = Field(default=None, description=(
        "a token sent as Authorization: Bearer when fetching jwks_url (for example a "
        "projected ServiceAccount token; re-read at every fetch)"))

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is not None:
            _require_http_url(value, credentials_in="bearer_token_file")
            if not value.startswith("https://"):
                raise ValueError(f"{value!r}: the key set must come over https://")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        _exactly_one(self, ("jwks_file", "jwks_url"), "key source")
        if self.bearer_token_file is not None and self.jwks_url is None:
            raise ValueError("bearer_token_file is only used with jwks_url")
        return self


class ConnectionAuth(_Model):
    basic: NameReference | None = Field(default=None, description="a basic_auth name")
    oauth: NameReference | None = Field(default=None, description="an oauth name")

    @model_validator(mode="after")
    def _exclusive(self) -> Self:
        if self.basic is not None and self.oauth is not None:
            raise ValueError(
                "set basic or oauth, not both: HTTP has a single Authorization header"
            )
        return self


def _require_http_url(value: str,
                      credentials_in: str = "basic_auth or oauth definitions") -> None:
    parts = urlsplit(value)
    if "@" in parts.netloc:
        # Checked first, and the URL is not quoted: its userinfo may hold a password.
        raise ValueError("must not contain a user name or password (user:password@host): "
                         f"credentials belong in {credentials_in}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} must not have a query string or fragment")


def _state_relative(value: str) -> str:
    path = Path(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{value!r}: give a path inside the state directory (relative, no "
                         "'..'); the sidecar writes it there")
    return value


# A file or directory the sidecar writes, relative to its state directory (--state-dir).
StatePath = Annotated[str, AfterValidator(_state_relative)]


class AuditFhirSink(_Model):
    """An Audit Record Repository: a FHIR server that stores AuditEvent resources. It is the
    sidecar's own destination, never an app's connection, and its writes are never audited."""

    url: str = Field(description="the repository's FHIR base URL")
    auth: ConnectionAuth = Field(default_factory=ConnectionAuth, description=(
        "at most one of basic and oauth, as on a connection"))
    tls: TlsSettings = Field(default_factory=TlsSettings)
    via: NameReference | None = Field(default=None, description="an egress_proxies name")
    queue_dir: StatePath = Field(default="audit-queue", description=(
        "where records wait to be sent, relative to the state directory"))
    batch_size: int = Field(default=50, ge=1, le=1000, description=(
        "AuditEvents per batch Bundle"))
    flush_seconds: float = Field(default=5, gt=0, le=3600, description=(
        "the longest a record waits before its batch is sent"))
    max_queue_bytes: int = Field(default=104857600, ge=65536, description=(
        "the most the queue may hold on disk; past it records are refused (and counted)"))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        _require_http_url(value)
        return value.rstrip("/")


class AuditSettings(_Model):
    """The audit trail: one record per proxied request and per admin action (docs/audit.md)."""

    file: StatePath | None = Field(default="audit/audit.jsonl", description=(
        "JSON lines (mode 0600), relative to the state directory; null for none"))
    max_file_bytes: int = Field(default=104857600, ge=4096, description=(
        "the file is rotated past this size (audit.jsonl.1, .2, ...)"))
    keep: int = Field(default=0, ge=0, description=(
        "rotated files to keep; 0 (the default) never deletes one"))
    fhir: AuditFhirSink | None = Field(default=None, description=(
        "also send every record as a FHIR AuditEvent to this repository"))
    required: bool = Field(default=False, description=(
        "refuse a request with 503 audit-unavailable when its record cannot be queued, and "
        "answer only once it is on disk"))


class TracingSettings(_Model):
    """OpenTelemetry traces over OTLP/HTTP (docs/tracing.md); OTEL_* variables fill in what
    is not set here."""

    endpoint: str | None = Field(default=None, description=(
        "the collector's OTLP/HTTP base URL (spans go to <endpoint>/v1/traces); also "
        "OTEL_EXPORTER_OTLP_ENDPOINT"))
    sample_ratio: float | None = Field(default=None, ge=0, le=1, description=(
        "the share of requests without a traceparent that are traced (default 1.0; also "
        "OTEL_TRACES_SAMPLER_ARG)"))
    service_name: str | None = Field(default=None, min_length=1, description=(
        "the resource's service.name (default fhir-sidecar; also OTEL_SERVICE_NAME)"))

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None:
            _require_http_url(value, credentials_in="OTEL_EXPORTER_OTLP_HEADERS")
        return value.rstrip("/") if value else value


class LoggingSettings(_Model):
    request_paths: Literal["full", "redacted"] = Field(default="full", description=(
        "redacted: resource ids are replaced in the request log's path (the audit trail keeps "
        "them)"))


class ConnectionSettings(_Model):
    url: str
    listen: Listen | None = Field(default=None, description=(
        "this connection's own listener: apps use http://HOST:PORT as the FHIR base URL"))
    auth: ConnectionAuth = Field(default_factory=ConnectionAuth, description=(
        "at most one of basic and oauth; none means no credentials"))
    tls: TlsSettings = Field(default_factory=TlsSettings)
    timeout_seconds: float = Field(default=60, gt=0, description=(
        "how long the upstream may take to answer with the response headers"))
    read_timeout_seconds: float = Field(default=60, gt=0, description=(
        "the longest silence from the upstream while a response body streams"))
    # Apps following the upstream's own absolute URLs would otherwise leave the sidecar and
    # lose their credentials.
    rewrite_links: bool = Field(default=True, description=(
        "point the upstream's absolute URLs (Location, Content-Location, Bundle.link[].url) "
        "back at the sidecar"))
    via: NameReference | None = Field(default=None, description=(
        "an egress_proxies name: tunnel through that proxy (CONNECT)"))
    # Who may use the connection (docs/callers.md).
    allowed_hosts: list[AllowedHost] = Field(default_factory=list, description=(
        "Host values its listener answers besides the address a request arrived on and "
        "localhost, with or without the listener's port (others get 421 misdirected); \"*\" "
        "turns the check off"))
    allowed_origins: list[AllowedOrigin] = Field(default_factory=list, description=(
        "browser origins (scheme://host[:port]) whose requests are served; a request with "
        "any other Origin header gets 403 origin-not-allowed"))
    allowed_callers: list[AllowedCaller] | None = Field(default=None, description=(
        "<caller definition>:<subject> of the workload tokens allowed to use it (Authorization: "
        "Bearer <jwt>); without it, anyone who reaches the listener"))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        _require_http_url(value)
        return value.rstrip("/")


def is_valid_name(name: str) -> bool:
    # fullmatch: with match() and "$", "x\n" would pass and end up in a file name.
    return _NAME_PATTERN.fullmatch(name) is not None


def require_valid_name(name: str) -> str:
    """``name`` if it follows the name rule; else a ValueError that states the rule."""
    if not is_valid_name(name):
        raise ValueError(f"name {name!r} must match {NAME_RULE} "
                         f"(at most {NAME_MAX_LENGTH} characters)")
    return name


# The key of a named section (basic_auth, oauth, connections, egress_proxies).
Name = Annotated[str, AfterValidator(require_valid_name),
                 WithJsonSchema({"type": "string", "pattern": NAME_REGEX})]


class SidecarConfig(_Model):
    proxy: ProxySettings = Field(default_factory=ProxySettings,
                                 description="the forward proxy (HTTP_PROXY)")
    admin: AdminSettings = Field(default_factory=AdminSettings, description="the admin listener")
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    basic_auth: dict[Name, BasicAuthDefinition] = Field(
        default_factory=dict, description="HTTP Basic credentials by name")
    oauth: dict[Name, OAuthDefinition] = Field(
        default_factory=dict, description="OAuth2 client-credentials definitions by name")
    connections: dict[Name, ConnectionSettings] = Field(
        default_factory=dict,
        description="the FHIR servers apps reach through the sidecar, by name")
    egress_proxies: dict[Name, EgressProxyDefinition] = Field(
        default_factory=dict, description=(
            "corporate HTTP proxies that connections.*.via and oauth.*.via tunnel through"))
    audit: AuditSettings | None = Field(default=None, description=(
        "the audit trail; none unless this section is set"))
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    callers: dict[Name, CallerDefinition] = Field(
        default_factory=dict, description=(
            "issuers of the workload tokens that connections.*.allowed_callers name"))

    def listeners(self) -> list[Listener]:
        """Every address this config binds: validation, binding, routing and reload read
        this one list."""
        found = []
        if self.proxy.listen is not None:
            found.append(Listener("proxy.listen", self.proxy.listen, "proxy"))
        if self.admin.listen is not None:
            found.append(Listener("admin.listen", self.admin.listen, "admin"))
        for name, conn in self.connections.items():
            if conn.listen is not None:
                found.append(Listener(f"connections.{name}.listen", conn.listen, "connection",
                                      name))
        return found

    def reference_problems(self) -> list[tuple[str, str]]:
        """Cross-reference problems as (field path, message); empty when consistent."""
        problems: list[tuple[str, str]] = []
        for name, conn in self.connections.items():
            if conn.auth.basic is not None and conn.auth.basic not in self.basic_auth:
                problems.append((f"connections.{name}.auth.basic",
                                 f"no Basic Auth definition named {conn.auth.basic!r}"
                                 f"{_known(self.basic_auth)}"))
            if conn.auth.oauth is not None and conn.auth.oauth not in self.oauth:
                problems.append((f"connections.{name}.auth.oauth",
                                 f"no OAuth definition named {conn.auth.oauth!r}"
                                 f"{_known(self.oauth)}"))
            for index, caller in enumerate(conn.allowed_callers or ()):
                definition = caller.partition(":")[0]
                if definition not in self.callers:
                    problems.append((f"connections.{name}.allowed_callers[{index}]",
                                     f"no caller definition named {definition!r}"
                                     f"{_known(self.callers)}"))
        users = [(f"connections.{n}.via", c.via) for n, c in self.connections.items()]
        if self.audit is not None and self.audit.fhir is not None:
            sink = self.audit.fhir
            users.append(("audit.fhir.via", sink.via))
            if sink.auth.basic is not None and sink.auth.basic not in self.basic_auth:
                problems.append(("audit.fhir.auth.basic",
                                 f"no Basic Auth definition named {sink.auth.basic!r}"
                                 f"{_known(self.basic_auth)}"))
            if sink.auth.oauth is not None and sink.auth.oauth not in self.oauth:
                problems.append(("audit.fhir.auth.oauth",
                                 f"no OAuth definition named {sink.auth.oauth!r}"
                                 f"{_known(self.oauth)}"))
        users += [(f"oauth.{n}.via", d.via) for n, d in self.oauth.items()]
        for path, via in users:
            if via is not None and via not in self.egress_proxies:
                problems.append((path, f"no egress proxy named {via!r}"
                                       f"{_known(self.egress_proxies)}"))
        problems += _listener_overlaps(self.listeners())
        return problems


def _listener_overlaps(listeners: list[Listener]) -> list[tuple[str, str]]:
    problems = []
    for index, listener in enumerate(listeners):
        earlier = next((e for e in listeners[:index] if e.address.overlaps(listener.address)),
                       None)
        if earlier is None:
            continue
        if earlier.address == listener.address:
            message = f"{listener.address} is already used by {earlier.path}"
        else:
            message = (f"{listener.address} overlaps {earlier.address} of {earlier.path}: "
                       f"{_wildcard_of(listener, earlier)} listens on every interface, that "
                       "port included")
        problems.append((listener.path, message))
    return problems


def _wildcard_of(a: Listener, b: Listener) -> str:
    return str(a.address if a.address.is_wildcard else b.address)


def _known(names: Mapping[str, object]) -> str:
    return f" (defined: {', '.join(sorted(names))})" if names else " (none are defined)"
