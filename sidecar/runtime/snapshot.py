"""The compiled, immutable configuration every request reads
(docs/architecture.md#the-snapshot).

Compiling reads every secret, key and CA bundle the config names, builds credential providers
and TLS contexts, and reports *all* problems at once. A reload compiles a new snapshot beside the
old one and swaps it in one step; requests in flight keep the snapshot they started with.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config.errors import ConfigError, ConfigProblem
from sidecar.config.models import (
    CERTIFICATE_CLIENT_AUTH,
    ConnectionSettings,
    ListenAddress,
    SidecarConfig,
    TlsSettings,
)
from sidecar.config.secrets import SecretError, read_secret, read_secret_file
from sidecar.credentials.basic import BasicCredentials
from sidecar.egress.proxies import EgressProxy
from sidecar.report.redaction import GENERIC, Redactor
from sidecar.request.routing import Router, Upstream
from sidecar.tls.material import TlsMaterialError
from sidecar.tls.policy import UpstreamTlsPolicy, compile_tls_policy

if TYPE_CHECKING:
    from sidecar.callers.workload_tokens import CallerVerifier
    from sidecar.credentials.jwks import PublishedKey
    from sidecar.credentials.oauth import TokenObserver, TokenSource

_generations = itertools.count(1)
# The compiled name of audit.fhir: not a valid connection name, so it can never collide.
AUDIT_DESTINATION = "audit.fhir"


@dataclass(frozen=True)
class CompiledConnection:
    name: str
    settings: ConnectionSettings
    upstream: Upstream
    tls: UpstreamTlsPolicy | None  # None for a plain http:// upstream
    basic: BasicCredentials | None
    oauth: str | None  # name of the OAuth definition (its token source lives in the snapshot)
    listen: ListenAddress | None
    via: EgressProxy | None = None  # the egress proxy its upstream traffic tunnels through

    @property
    def timeout_seconds(self) -> float:
        return self.settings.timeout_seconds

    @property
    def read_timeout_seconds(self) -> float:
        return self.settings.read_timeout_seconds

    @property
    def auth_kind(self) -> str:
        return "basic" if self.basic else "oauth" if self.oauth else "none"


@dataclass(frozen=True)
class Snapshot:
    source: str
    config: SidecarConfig
    connections: Mapping[str, CompiledConnection]
    token_sources: Mapping[str, TokenSource]
    router: Router
    warnings: tuple[str, ...] = ()
    # The public keys of every private_key_jwt definition, served as the JWK Set.
    signing_keys: tuple[PublishedKey, ...] = ()
    egress_proxies: Mapping[str, EgressProxy] = field(default_factory=dict)
    # The workload-token verifiers of the callers section, by definition name.
    callers: Mapping[str, CallerVerifier] = field(default_factory=dict)
    # audit.fhir, compiled like a connection (its name is AUDIT_DESTINATION); never routed to.
    audit_destination: CompiledConnection | None = None
    # Knows every secret this snapshot read: scrubs any outside text before it is shown.
    redactor: Redactor = field(default=GENERIC, repr=False, compare=False)
    generation: int = field(default_factory=lambda: next(_generations))
    # Looked up on every request to a per-connection listener.
    _by_listener: dict[ListenAddress, CompiledConnection] = field(init=False, repr=False,
                                                                  compare=False)

    def __post_init__(self) -> None:
        # Validation refused overlapping listen addresses, so each address has one connection.
        by_listener = {listener.address: self.connections[listener.connection]
                       for listener in self.config.listeners()
                       if listener.connection is not None
                       and listener.connection in self.connections}
        object.__setattr__(self, "_by_listener", by_listener)

    def by_listener(self, address: ListenAddress) -> CompiledConnection | None:
        """The connection whose own listener is at ``address`` (as configured)."""
        return self._by_listener.get(address)


class _Problems:
    def __init__(self, file: str):
        self.file = file
        self.items: list[ConfigProblem] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(ConfigProblem(self.file, path, message))


def compile_snapshot(config: SidecarConfig, source: str | Path,
                     previous: Snapshot | None = None,
                     token_observer: TokenObserver | None = None) -> Snapshot:
    """Build a snapshot or raise :class:`ConfigError` listing every problem found.

    Token sources whose settings did not change are carried over from ``previous`` so their
    cached tokens survive the reload.
    """
    file = str(source)
    problems = _Problems(file)
    warnings: list[str] = []

    basic: dict[str, BasicCredentials] = {}
    basic_pairs: list[tuple[str, str]] = []
    for name, definition in config.basic_auth.items():
        path = f"basic_auth.{name}"
        if definition.password is not None:
            warnings.append(f"{file}: {path}.password: inline secret; use password_file or "
                            "password_env outside development")
        try:
            password = read_secret(definition.password_file, definition.password_env,
                                   definition.password)
        except SecretError as exc:
            problems.add(f"{path}.{_secret_field(definition.password_file, 'password')}",
                         str(exc))
            continue
        basic[name] = BasicCredentials(name, definition.username, password)
        basic_pairs.append((definition.username, password))

    proxies = _compile_egress_proxies(config, problems, warnings)
    oauth_secrets = _read_oauth_secrets(config, problems, warnings)
    redactor = Redactor(
        secrets=[_admin_token(config)],
        pairs=basic_pairs
        + [(config.oauth[name].client_id, secret) for name, (secret, _) in oauth_secrets.items()]
        + [(proxy.username or "", proxy.password) for proxy in proxies.values()])
    token_sources = _compile_token_sources(config, oauth_secrets, redactor, previous, problems,
                                           warnings, token_observer, proxies)
    signing_keys = _compile_signing_keys(config, problems, warnings)

    connections: dict[str, CompiledConnection] = {}
    audit_destination: CompiledConnection | None = None
    targets = list(config.connections.items())
    if config.audit is not None and config.audit.fhir is not None:
        sink = config.audit.fhir
        # The audit repository is compiled like a connection (credentials, TLS, egress) but
        # is no connection: nothing routes to it, so no app can reach it.
        targets.append((AUDIT_DESTINATION, ConnectionSettings(
            url=sink.url, auth=sink.auth, tls=sink.tls, via=sink.via)))
    for name, settings in targets:
        path = f"connections.{name}" if name != AUDIT_DESTINATION else "audit.fhir"
        upstream = Upstream.from_url(settings.url)
        tls = None
        if upstream.scheme == "https":
            tls = _compile_tls(settings.tls, f"{path}.tls", problems, warnings)
            if tls is None:
                continue
        else:
            warnings.append(f"{file}: {path}.url: plain http:// upstream; credentials travel "
                            "unencrypted")
        via = proxies.get(settings.via) if settings.via is not None else None
        if settings.via is not None and via is None:
            continue  # the proxy definition's own problem is reported
        compiled = CompiledConnection(
            name=name, settings=settings, upstream=upstream, tls=tls,
            basic=basic.get(settings.auth.basic) if settings.auth.basic else None,
            oauth=settings.auth.oauth,
            listen=settings.listen,
            via=via,
        )
        if name == AUDIT_DESTINATION:
            audit_destination = compiled
        else:
            connections[name] = compiled
    warnings += _binding_warnings(file, connections, token_sources)
    warnings += _caller_warnings(file, config)
    callers = _compile_callers(config, problems, warnings, previous)
    if problems.items:
        raise ConfigError(problems.items)
    router = Router((name, conn.upstream) for name, conn in connections.items())
    return Snapshot(source=file, config=config, connections=connections,
                    token_sources=token_sources, router=router, warnings=tuple(warnings),
                    signing_keys=signing_keys, egress_proxies=proxies, callers=callers,
                    audit_destination=audit_destination, redactor=redactor)


def _compile_callers(config: SidecarConfig, problems: _Problems, warnings: list[str],
                     previous: Snapshot | None) -> dict[str, CallerVerifier]:
    """One verifier per caller definition. A JWK Set file is read now (so a rotated file is a
    reload like any other); a URL's fetched keys are kept from ``previous`` while its
    settings stay the same."""
    if not config.callers:
        return {}
    from sidecar.callers.key_sets import FetchedKeys, KeySetError, StaticKeys, read_key_set_file
    from sidecar.callers.workload_tokens import CallerVerifier, KeySource

    verifiers: dict[str, CallerVerifier] = {}
    for name, definition in config.callers.items():
        path = f"callers.{name}"
        keys: KeySource
        if definition.jwks_file is not None:
            try:
                keys = StaticKeys(read_key_set_file(definition.jwks_file))
            except KeySetError as exc:
                problems.add(f"{path}.jwks_file", str(exc))
                continue
        else:
            assert definition.jwks_url is not None
            tls = _compile_tls(definition.tls, f"{path}.tls", problems, warnings)
            if tls is None:
                continue
            fetched = FetchedKeys(name, definition.jwks_url, tls, definition.bearer_token_file)
            kept = previous.callers.get(name) if previous is not None else None
            if (kept is not None and isinstance(kept.keys, FetchedKeys)
                    and kept.keys.spec() == fetched.spec()):
                fetched = kept.keys
            keys = fetched
        verifiers[name] = CallerVerifier(name, definition.issuer, definition.audience, keys)
    return verifiers


def _caller_warnings(file: str, config: SidecarConfig) -> list[str]:
    """Settings that let anyone in who reaches a listener, said out loud."""
    found = []
    for name, conn in config.connections.items():
        if "*" in conn.allowed_hosts:
            found.append(f"{file}: connections.{name}.allowed_hosts: \"*\" answers any Host, "
                         "so a web page whose DNS name points at this listener (DNS rebinding) "
                         "can use the connection's credentials; list the names instead")
        if (conn.listen is not None and not conn.listen.is_loopback
                and conn.allowed_callers is None):
            found.append(f"{file}: connections.{name}.listen: {conn.listen} is reachable from "
                         "other machines and the connection has no allowed_callers: anyone who "
                         "reaches it leaves with its credentials (docs/callers.md)")
    if "*" in config.proxy.allowed_hosts:
        found.append(f"{file}: proxy.allowed_hosts: \"*\" answers any Host on the forward "
                     "proxy (DNS rebinding); list the names instead")
    return found


def _binding_warnings(file: str, connections: Mapping[str, CompiledConnection],
                      token_sources: Mapping[str, TokenSource]) -> list[str]:
    """Connections whose OAuth definition authenticates with a client certificate but that
    present another one (or none) to the FHIR server: a token bound to the certificate would
    be refused there."""
    from sidecar.credentials.cert_binding import presents_other_certificate

    found = []
    for name, conn in connections.items():
        source = token_sources.get(conn.oauth) if conn.oauth else None
        if source is None or source.definition.client_auth not in CERTIFICATE_CLIENT_AUTH:
            continue
        other = presents_other_certificate(conn.tls.client_cert_pem if conn.tls else None,
                                           source.client_cert_pem)
        if other is not None:
            found.append(
                f"{file}: connections.{name}.tls.client_cert: oauth.{conn.oauth} authenticates "
                f"with its client certificate ({source.definition.client_auth}); a server that "
                "binds tokens to it (RFC 8705, cnf x5t#S256) refuses the token from this "
                f"connection, which presents {other}: give it the same tls.client_cert and "
                "tls.client_key")
    return found


def _compile_signing_keys(config: SidecarConfig, problems: _Problems, warnings: list[str]
                          ) -> tuple[PublishedKey, ...]:
    from sidecar.credentials.jwks import published_keys

    keys, found = published_keys(config)
    reported = {p.path for p in problems.items}
    for path, message in found:
        definition_path = path.rpartition(".")[0]
        # The current key's problems were already reported when its token source was built.
        if path.endswith(".private_key_file") and (path in reported
                                                   or definition_path in reported):
            continue
        problems.add(path, message)
    for name, definition in config.oauth.items():
        if definition.key_id is not None and definition.next_private_key_file is not None:
            warnings.append(f"{problems.file}: oauth.{name}.key_id: names the current key only; "
                            "the next key is published under its RFC 7638 thumbprint, so remove "
                            "key_id when it is promoted, or servers will not find its kid")
    return keys


def _secret_field(file: Path | None, stem: str) -> str:
    return f"{stem}_file" if file is not None else f"{stem}_env"


def _compile_tls(settings: TlsSettings, path: str, problems: _Problems, warnings: list[str]
                 ) -> UpstreamTlsPolicy | None:
    if settings.verify == "skip":
        warnings.append(f"{problems.file}: {path}.verify: skip: the server's certificate and "
                        "name are not checked, so anyone on the network path can read the "
                        "credentials sent there; use default or custom outside development")
    try:
        return compile_tls_policy(settings)
    except TlsMaterialError as exc:
        problems.add(f"{path}.{exc.field}", str(exc))
        return None


def _compile_egress_proxies(config: SidecarConfig, problems: _Problems, warnings: list[str]
                            ) -> dict[str, EgressProxy]:
    proxies: dict[str, EgressProxy] = {}
    for name, definition in config.egress_proxies.items():
        path = f"egress_proxies.{name}"
        password = None
        if definition.username is not None:
            try:
                password = read_secret(definition.password_file, definition.password_env, None)
            except SecretError as exc:
                problems.add(f"{path}.{_secret_field(definition.password_file, 'password')}",
                             str(exc))
                continue
        tls = None
        if definition.url.startswith("https://"):
            tls = _compile_tls(definition.tls or TlsSettings(), f"{path}.tls", problems,
                               warnings)
            if tls is None:
                continue
        proxies[name] = EgressProxy.from_url(name, definition.url, username=definition.username,
                                             password=password, tls=tls)
    return proxies


def _read_oauth_secrets(config: SidecarConfig, problems: _Problems, warnings: list[str]
                        ) -> dict[str, tuple[str | None, bytes | None]]:
    """Per OAuth definition its client secret or its private key, as read now."""
    found: dict[str, tuple[str | None, bytes | None]] = {}
    for name, definition in config.oauth.items():
        path = f"oauth.{name}"
        secret = None
        key_pem = None
        try:
            if definition.client_auth == "private_key_jwt":
                assert definition.private_key_file is not None
                key_pem = _read_private_key(definition.private_key_file)
            elif definition.client_auth in CERTIFICATE_CLIENT_AUTH:
                pass  # the client certificate is read with the definition's tls settings
            else:
                if definition.client_secret is not None:
                    warnings.append(f"{problems.file}: {path}.client_secret: inline secret; use "
                                    "client_secret_file or client_secret_env outside development")
                secret = read_secret(definition.client_secret_file,
                                     definition.client_secret_env, definition.client_secret)
        except SecretError as exc:
            field_name = ("private_key_file" if key_pem is None and
                          definition.client_auth == "private_key_jwt" else
                          _secret_field(definition.client_secret_file, "client_secret"))
            problems.add(f"{path}.{field_name}", str(exc))
            continue
        found[name] = (secret, key_pem)
    return found


def _admin_token(config: SidecarConfig) -> str | None:
    # Read for the redactor only: the admin listener re-reads the file on every check.
    if config.admin.token_file is None:
        return None
    try:
        return read_secret_file(config.admin.token_file)
    except SecretError:
        return None


def _compile_token_sources(config: SidecarConfig,
                           oauth_secrets: Mapping[str, tuple[str | None, bytes | None]],
                           redactor: Redactor, previous: Snapshot | None,
                           problems: _Problems, warnings: list[str],
                           token_observer: TokenObserver | None = None,
                           proxies: Mapping[str, EgressProxy] | None = None
                           ) -> dict[str, TokenSource]:
    if not config.oauth:
        return {}
    from sidecar.credentials.oauth import OAuthSetupError, TokenSource, TokenSourceSpec

    sources: dict[str, TokenSource] = {}
    for name, (secret, key_pem) in oauth_secrets.items():
        definition = config.oauth[name]
        path = f"oauth.{name}"
        tls = _compile_tls(definition.tls, f"{path}.tls", problems, warnings)
        if tls is None:
            continue
        via = (proxies or {}).get(definition.via) if definition.via is not None else None
        if definition.via is not None and via is None:
            continue  # the proxy definition's own problem is reported
        spec = TokenSourceSpec.of(name, definition, client_secret=secret,
                                  private_key_pem=key_pem, tls=tls, via=via)
        old = previous.token_sources.get(name) if previous else None
        if old is not None and old.settings_key == spec:
            # Kept for its cached token; the new snapshot's secrets are scrubbed from its
            # failures too.
            old.use_redactor(redactor)
            sources[name] = old
            continue
        try:
            sources[name] = TokenSource(name, definition, client_secret=secret,
                                        private_key_pem=key_pem, tls=tls,
                                        observer=token_observer, redactor=redactor, via=via)
        except OAuthSetupError as exc:
            problems.add(f"{path}.{exc.field}" if exc.field else path, str(exc))
    return sources


def _read_private_key(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    text = read_secret_file(path).encode()
    try:
        serialization.load_pem_private_key(text, password=None)
    except (ValueError, TypeError):
        raise SecretError(f"{path} holds no unencrypted PEM private key") from None
    return text
