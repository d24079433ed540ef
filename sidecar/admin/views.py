"""What the dashboard and the API show of each resource: its settings and its live state.

Built from the live snapshot, the metrics' status board and the token sources' ``status()``.
A connection's status light is :func:`sidecar.admin.readiness.connection_health_now`, the
same that ``/readyz?verbose=1`` shows.
Secrets appear only as ``"set"`` / ``"not set"``; no value, token or header is ever included.
``read_only`` says why the API will not change a definition (it reads files or environment
variables the config file names), or is null.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from sidecar.admin import api_models as api
from sidecar.admin.config_store import CaBundle, ConfigStore, secret_state
from sidecar.admin.readiness import StatusSources, _iso, _iso_dt, connection_health_now
from sidecar.config.models import TlsSettings
from sidecar.egress.proxies import EgressProxy
from sidecar.observe.health import TokenState, days_left, expiry_light
from sidecar.observe.metrics import ConnectionActivity
from sidecar.tls.policy import client_cert_expiry, earliest_expiry

EGRESS_READ_ONLY = ("egress proxies are defined in the config file (egress_proxies); the API and "
                    "the dashboard show them and assign them with via, but do not change them")


class Views:
    def __init__(self, sources: StatusSources, store: ConfigStore,
                 clock: Callable[[], float] = time.time):
        self.sources = sources
        self.store = store
        self.clock = clock

    def tls(self, tls: TlsSettings) -> api.TlsView:
        bundle = tls.ca_bundle
        return api.TlsView(
            verify=tls.verify,
            ca_bundle=self.store.bundle_name_for(bundle) or (str(bundle) if bundle else None),
            client_cert=str(tls.client_cert) if tls.client_cert else None,
            client_key="set" if tls.client_key else None,
            server_name=tls.server_name,
        )

    def connections(self) -> list[dict[str, Any]]:
        return [self.connection(n) for n in sorted(self.store.config.connections)]

    def connection(self, name: str) -> dict[str, Any]:
        now = self.clock()
        conn = self.store.config.connections[name]
        activity = self.sources.metrics.board.connection(name)
        compiled = self.sources.live.current.connections.get(name)
        policy = compiled.tls if compiled is not None else None
        ca_expiry = earliest_expiry(policy) if policy is not None else None
        cert_expiry = client_cert_expiry(policy) if policy is not None else None
        token = self.connection_token(conn.auth.oauth, now)
        requests_recent = activity.recent.totals()
        errors_recent = activity.errors_recent.totals()
        health = connection_health_now(
            activity, now, requests_recent=requests_recent, errors_recent=errors_recent,
            token=None if token is None else TokenState(
                usable=token.usable, last_attempt_failed=token.last_error is not None),
            ca_expiry=ca_expiry, cert_expiry=cert_expiry)
        return _body(api.Connection(
            name=name,
            url=conn.url,
            listen=str(conn.listen) if conn.listen is not None else None,
            auth=api.AuthView(basic=conn.auth.basic, oauth=conn.auth.oauth),
            tls=self.tls(conn.tls),
            timeout_seconds=conn.timeout_seconds,
            read_timeout_seconds=conn.read_timeout_seconds,
            rewrite_links=conn.rewrite_links,
            via=conn.via,
            read_only=self.store.read_only_definition("connections", name),
            from_config_file={f"tls.{field}": path.literal
                              for field, path in self.store.file_paths_of(name).items()},
            status=api.ConnectionStatus(
                requests_recent=requests_recent,
                errors_recent=errors_recent,
                in_flight=activity.in_flight,
                last_status=activity.last_status,
                last_error=None if activity.last_error is None else api.LastError(
                    error=activity.last_error, at=_iso(activity.last_error_at)),
                tls_ok=activity.tls_ok,
            ),
            health=api.HealthView(light=health.light, reason=health.reason,
                                  reasons=list(health.reasons)),
            token=token,
            certificates=api.CertificatesView(ca_bundle=expiry_view(ca_expiry, now),
                                              client_cert=expiry_view(cert_expiry, now)),
            trend=trend_view(activity, now),
        ))

    def connection_token(self, definition: str | None, now: float) -> api.ConnectionToken | None:
        if definition is None:
            return None
        source = self.sources.live.current.token_sources.get(definition)
        if source is None:
            return api.ConnectionToken(definition=definition, usable=False, valid_until=None,
                                       issued_at=None, seconds_left=None,
                                       lifetime_seconds=None, last_error=None)
        status = source.status()
        until, issued = status.valid_until, status.issued_at
        return api.ConnectionToken(
            definition=definition,
            usable=status.usable,
            valid_until=_iso_dt(until),
            issued_at=_iso_dt(issued),
            seconds_left=None if until is None else max(0, int(until.timestamp() - now)),
            lifetime_seconds=None if until is None or issued is None
            else max(0, int((until - issued).total_seconds())),
            last_error=self.sources.live.current.redactor.scrub(status.last_error)
            if status.last_error else None,
        )

    def basic_auths(self) -> list[dict[str, Any]]:
        return [self.basic_auth(n) for n in sorted(self.store.config.basic_auth)]

    def basic_auth(self, name: str) -> dict[str, Any]:
        definition = self.store.config.basic_auth[name]
        return _body(api.BasicAuth(
            name=name,
            username=definition.username,
            password=secret_state(definition.password_file, definition.password_env,
                                  definition.password),
            password_env=definition.password_env,
            read_only=self.store.read_only_definition("basic_auth", name),
            used_by=sorted(c for c, conn in self.store.config.connections.items()
                           if conn.auth.basic == name),
        ))

    def oauths(self) -> list[dict[str, Any]]:
        return [self.oauth(n) for n in sorted(self.store.config.oauth)]

    def oauth(self, name: str) -> dict[str, Any]:
        d = self.store.config.oauth[name]
        source = self.sources.live.current.token_sources.get(name)
        status = source.status() if source is not None else None
        uses_key = d.client_auth == "private_key_jwt"
        uses_secret = d.client_auth in ("client_secret_basic", "client_secret_post")
        return _body(api.OAuth(
            name=name,
            token_url=d.token_url,
            discover_from=d.discover_from,
            client_id=d.client_id,
            client_auth=d.client_auth,
            client_secret="not used" if not uses_secret else secret_state(
                d.client_secret_file, d.client_secret_env, d.client_secret),
            client_secret_env=d.client_secret_env,
            private_key=secret_state(d.private_key_file, None, None) if uses_key
            else "not used",
            key_id=d.key_id,
            signing_alg=d.signing_alg,
            signing_keys=[api.SigningKeyView(slot=k.slot, kid=k.kid, alg=k.alg)
                          for k in self.sources.live.current.signing_keys
                          if k.definition == name],
            scopes=list(d.scopes),
            audience=d.audience,
            resource=d.resource,
            extra_params=dict(d.extra_params),
            default_expires_in=d.default_expires_in,
            tls=self.tls(d.tls),
            via=d.via,
            read_only=self.store.read_only_definition("oauth", name),
            used_by=sorted(c for c, conn in self.store.config.connections.items()
                           if conn.auth.oauth == name),
            token=api.TokenView(
                valid_until=_iso_dt(status.valid_until) if status else None,
                last_refresh=_iso_dt(status.last_refresh) if status else None,
                last_error=self.sources.live.current.redactor.scrub(status.last_error)
                if status and status.last_error else None,
                scopes=list(status.scopes) if status else [],
                last_result=self.sources.metrics.board.token(name).last_result,
            ),
        ))

    def egress_proxies(self) -> list[dict[str, Any]]:
        return [self.egress_proxy(n) for n in sorted(self.store.config.egress_proxies)]

    def egress_proxy(self, name: str) -> dict[str, Any]:
        config = self.store.config
        d = config.egress_proxies[name]
        has_user = d.username is not None
        used_by = sorted(c for c, conn in config.connections.items() if conn.via == name)
        used_by += sorted(f"oauth:{o}" for o, od in config.oauth.items() if od.via == name)
        https = urlsplit(d.url).scheme.lower() == "https"
        return _body(api.EgressProxy(
            name=name,
            # Rebuilt from host and port: nothing of the configured text but those is shown.
            url=EgressProxy.from_url(name, d.url).url,
            username_set=has_user,
            password=secret_state(d.password_file, d.password_env, None) if has_user
            else "not used",
            password_source=None if not has_user
            else "env" if d.password_env is not None else "file",
            tls_verify=(d.tls.verify if d.tls else "default") if https else None,
            read_only=EGRESS_READ_ONLY,
            used_by=used_by,
        ))

    def ca_bundles(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [ca_bundle_view(b, now) for b in self.store.ca_bundles()]


def ca_bundle_view(bundle: CaBundle, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return _body(api.CaBundle(
        name=bundle.name,
        certificates=[api.CertificateView(subject=c.subject, not_after=_iso_dt(c.not_after),
                                          is_ca=c.is_ca, expiry=expiry_view(c.not_after, now))
                      for c in bundle.certificates],
        expiry=expiry_view(min((c.not_after for c in bundle.certificates), default=None), now),
        used_by=bundle.used_by,
        problem=bundle.problem,
    ))


def expiry_view(expires: dt.datetime | None, now: float) -> api.ExpiryView | None:
    if expires is None:
        return None
    at = expires.timestamp()
    return api.ExpiryView(expires_at=_iso_dt(expires) or "", days_left=days_left(at, now),
                          light=expiry_light(at, now))


def trend_view(activity: ConnectionActivity, now: float) -> api.TrendView:
    series = activity.trend.series(now)
    return api.TrendView(since=_iso(series[0].minute * 60.0) or "",
                         requests=[m.requests for m in series],
                         errors=[m.errors for m in series])


def _body(view: api.ApiModel) -> dict[str, Any]:
    """A view as the API sends it and the dashboard's templates read it."""
    body: dict[str, Any] = view.model_dump(mode="json")
    return body
