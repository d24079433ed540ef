"""The dashboard: server-rendered pages with plain HTML forms (no CDN, no JavaScript build).

Pages list connections, Basic Auth and OAuth definitions and CA bundles with their live state.
Changing anything needs a browser session (log in with the admin token) and the session's CSRF
token in every form; each form becomes the same API-shaped change that :class:`ConfigStore`
validates, persists and reloads. Secrets are never put into a page: only "set" / "not set".
On an admin listener that is not on loopback, every page but the login page needs a session.
The session is checked from the cookie before a form's body is read; bodies are capped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote

import tornado.template
import tornado.web

from sidecar.admin.auth import SESSION_COOKIE, SESSION_SECONDS, Session
from sidecar.admin.config_store import MAX_UPLOAD_BYTES, REFERENCE_SUFFIXES, ChangeRejected
from sidecar.admin.console import Console
from sidecar.admin.error_log import LoggedErrors
from sidecar.admin.glance import broken_first, light_summary, sparkline, token_bar, when
from sidecar.admin.guard import BoundedBody, with_body
from sidecar.config.models import CERTIFICATE_CLIENT_AUTH, ClientAuth, SigningAlg, TlsVerify

HERE = Path(__file__).parent
TEMPLATES = tornado.template.Loader(str(HERE / "templates"))
PAGES = (("connections", "/", "Connections"), ("basic-auth", "/basic-auth", "Basic Auth"),
         ("oauth", "/oauth", "OAuth"), ("ca-bundles", "/ca-bundles", "CA bundles"),
         ("egress-proxies", "/egress-proxies", "Egress proxies"))
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart framing and the form's other fields
LOGIN_BODY_BYTES = 8 * 1024
# The options of the forms' select fields, in the order shown.
CHOICES = {"verify": get_args(TlsVerify), "client_auth": tuple(a for a in get_args(ClientAuth)
                                          if a not in CERTIFICATE_CLIENT_AUTH),
           "signing_alg": get_args(SigningAlg)}


class StaticFiles(LoggedErrors, tornado.web.StaticFileHandler):
    """The dashboard's script and style sheet; a failure is logged like any other."""


class DashboardHandler(BoundedBody):
    page = ""
    template = ""
    body_limit = MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES

    def initialize(self, console: Console) -> None:
        self.console = console

    def admit(self) -> None:
        if self.session is not None:
            return
        if self.request.method not in ("GET", "HEAD"):
            self.render_page(401, "log in with the admin token to make changes")
        elif self.console.reads_need_token:
            self.render_page(401, "log in with the admin token: this admin listener is "
                                  "reachable from other machines")

    def refuse_too_large(self) -> None:
        self.render_page(413, f"the form is larger than {self.body_limit} bytes (files at most "
                              f"{MAX_UPLOAD_BYTES} bytes)")

    @property
    def locked(self) -> bool:
        """Show nothing of the configuration: off loopback, before logging in."""
        return self.console.reads_need_token and self.session is None

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Content-Security-Policy",
                        "default-src 'self'; style-src 'self'; script-src 'self'; "
                        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

    def check_xsrf_cookie(self) -> None:  # our own per-session CSRF token is checked below
        return None

    @property
    def session(self) -> Session | None:
        return self.console.auth.session(self.get_cookie(SESSION_COOKIE))

    def render_page(self, status: int = 200, error: str | None = None,
                    problems: list[str] | None = None, **extra: Any) -> None:
        session = self.session
        locked = self.locked
        read_only = None if locked else self.console.read_only_reason()
        live = self.console.sources.live
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        html = TEMPLATES.load("login.html" if locked else self.template).generate(
            pages=() if locked else PAGES, page="login" if locked else self.page,
            views=self.console.views, store=self.console.store, locked=locked,
            session=session, csrf=session.csrf if session else "",
            read_only=read_only, can_edit=session is not None and read_only is None,
            done=self.get_query_argument("done", ""), error=error, problems=problems or [],
            last_reload=live.last_reload, max_upload=MAX_UPLOAD_BYTES, choices=CHOICES,
            now=time.time(), when=when, sparkline=sparkline, token_bar=token_bar,
            broken_first=broken_first, light_summary=light_summary, **extra)
        self.finish(html)

    @with_body
    def get(self) -> None:
        self.render_page()

    @with_body
    def post(self) -> None:
        self.parse_form()
        session = self.session
        if session is None:
            self.render_page(401, "log in with the admin token to make changes")
            return
        if not self.console.auth.csrf_ok(session, self.get_body_argument("_csrf", None)):
            self.render_page(403, "the form's CSRF token is missing or wrong; reload the page "
                                  "and try again")
            return
        try:
            reason = self.console.read_only_reason()
            if reason is not None:
                raise ChangeRejected(403, reason)
            references = sorted(k for k in (*self.request.body_arguments, *self.request.files)
                                if k.endswith(REFERENCE_SUFFIXES))
            if references:
                raise ChangeRejected(422, "the dashboard takes secret values and uploaded CA "
                                          "bundle names, never file paths or environment "
                                          "variable names; nothing was changed",
                                     [f"{k}: not accepted here" for k in references])
            done = self.act()
            action = ("deleted" if self.field("action") == "delete"
                      else "created" if done.endswith("created") else "replaced")
            self.console.audit("change", result="success", client=self.request.remote_ip,
                               via="session", object=f"{self.page}/{self.field('name')}",
                               action=action)
        except ChangeRejected as exc:
            self.render_page(exc.status, exc.message, exc.problems)
            return
        self.redirect(f"{self.request.path}?done={quote(done)}", status=303)

    def act(self) -> str:
        raise ChangeRejected(405, "nothing to do here")

    def field(self, name: str) -> str:
        return self.get_body_argument(name, "").strip()

    def optional(self, name: str) -> str | None:
        return self.field(name) or None

    def upload(self, name: str) -> bytes | None:
        files = self.request.files.get(name)
        if not files or not files[0].body:
            return None
        if len(files[0].body) > MAX_UPLOAD_BYTES:
            raise ChangeRejected(413, f"the uploaded file is larger than {MAX_UPLOAD_BYTES} "
                                      "bytes")
        return files[0].body


def _tls_form(handler: DashboardHandler, prefix: str, existing: Any) -> dict[str, Any]:
    verify = handler.field(f"{prefix}verify") or "default"
    tls: dict[str, Any] = {"verify": verify}
    if verify == "custom":
        tls["ca_bundle"] = handler.optional(f"{prefix}ca_bundle")
    if existing is not None:
        # Settings the form does not show are kept; the client certificate's paths come
        # from the config file, which the store accepts only unchanged.
        for hidden in ("server_name", "client_cert", "client_key"):
            value = getattr(existing, hidden)
            if value is not None:
                tls[hidden] = str(value)
    return tls


class ConnectionsPage(DashboardHandler):
    page, template = "connections", "connections.html"

    def act(self) -> str:
        name = self.field("name")
        store = self.console.store
        if self.field("action") == "delete":
            store.delete("connections", name)
            return f"connection {name} deleted"
        existing = store.config.connections.get(name)
        auth_choice = self.field("auth")
        auth: dict[str, str] = {}
        if auth_choice:
            kind, _, definition = auth_choice.partition(":")
            if kind not in ("basic", "oauth") or not definition:
                raise ChangeRejected(422, f"unknown credentials choice {auth_choice!r}")
            auth[kind] = definition
        body: dict[str, Any] = {"url": self.field("url"), "listen": self.optional("listen"),
                                "auth": auth,
                                "tls": _tls_form(self, "", existing.tls if existing else None)}
        timeout = self.field("timeout_seconds")
        if timeout:
            try:
                body["timeout_seconds"] = float(timeout)
            except ValueError:
                raise ChangeRejected(422, "timeout_seconds must be a number") from None
            if not math.isfinite(body["timeout_seconds"]):
                raise ChangeRejected(422, "timeout_seconds must be a finite number")
        body["via"] = self.optional("via")
        if existing is not None:
            # Settings the form does not show are kept as the file had them: one written out
            # stays, a default left implicit stays implicit (not copied into the file).
            for hidden in ("rewrite_links", "read_timeout_seconds"):
                if hidden in existing.model_fields_set:
                    body[hidden] = getattr(existing, hidden)
        created, _ = store.put_connection(name, body)
        return f"connection {name} {'created' if created else 'saved'}"


class ConnectionsLive(DashboardHandler):
    """The live cells of every connection row (light, token, trend, counts, last error), which
    static/glance.js fetches every 10 s and puts in place of the page's."""

    page, template = "connections", "connections_live.html"
    SUPPORTED_METHODS = ("GET",)
    body_limit = 0


class BasicAuthPage(DashboardHandler):
    page, template = "basic-auth", "basic_auth.html"

    def act(self) -> str:
        name = self.field("name")
        store = self.console.store
        if self.field("action") == "delete":
            store.delete("basic_auth", name)
            return f"Basic Auth definition {name} deleted"
        body: dict[str, Any] = {"username": self.field("username")}
        password = self.get_body_argument("password", "")
        if password:
            body["password"] = password
        created, _ = store.put_basic(name, body)
        return f"Basic Auth definition {name} {'created' if created else 'saved'}"


class OAuthPage(DashboardHandler):
    page, template = "oauth", "oauth.html"

    def act(self) -> str:
        name = self.field("name")
        store = self.console.store
        if self.field("action") == "delete":
            store.delete("oauth", name)
            return f"OAuth definition {name} deleted"
        existing = store.config.oauth.get(name)
        body: dict[str, Any] = {
            "client_id": self.field("client_id"),
            "client_auth": self.field("client_auth") or "client_secret_basic",
            "scopes": self.field("scopes").split(),
            "tls": _tls_form(self, "tls_", existing.tls if existing else None),
        }
        for key in ("token_url", "discover_from", "key_id", "audience"):
            if self.field(key):
                body[key] = self.field(key)
        if self.field("signing_alg"):
            body["signing_alg"] = self.field("signing_alg")
        body["via"] = self.optional("via")
        if existing is not None:  # settings the form does not show are kept
            if existing.resource:
                body["resource"] = existing.resource
            if existing.extra_params:
                body["extra_params"] = dict(existing.extra_params)
            body["default_expires_in"] = existing.default_expires_in
        secret = self.get_body_argument("client_secret", "")
        if secret:
            body["client_secret"] = secret
        key_upload = self.upload("private_key")
        if key_upload is not None:
            try:
                body["private_key_pem"] = key_upload.decode("utf-8")
            except UnicodeDecodeError:
                raise ChangeRejected(422, "the private key file is not PEM text") from None
        created, _ = store.put_oauth(name, body)
        return f"OAuth definition {name} {'created' if created else 'saved'}"


class CaBundlesPage(DashboardHandler):
    page, template = "ca-bundles", "ca_bundles.html"

    def act(self) -> str:
        name = self.field("name")
        store = self.console.store
        if self.field("action") == "delete":
            store.delete_ca_bundle(name)
            return f"CA bundle {name} deleted"
        pem = self.upload("bundle") or self.get_body_argument("pem", "").encode("utf-8")
        if not pem.strip():
            raise ChangeRejected(422, "choose a PEM file (or paste PEM text) to upload")
        created, _ = store.put_ca_bundle(name, pem)
        return f"CA bundle {name} {'uploaded' if created else 'replaced'}"


class EgressProxiesPage(DashboardHandler):
    """Read-only: egress proxies are the config file's (docs/admin-api.md#egress-proxies)."""

    page, template = "egress-proxies", "egress_proxies.html"

    def act(self) -> str:
        raise ChangeRejected(405, "egress proxies are read-only here: define them in the "
                                  "config file (egress_proxies)")


class LoginPage(DashboardHandler):
    page, template = "login", "login.html"
    body_limit = LOGIN_BODY_BYTES

    def admit(self) -> None:
        return None  # the one form anyone may send; its body is small

    @with_body
    def post(self) -> None:
        self.parse_form()
        auth = self.console.auth
        if not auth.token_configured():
            self.render_page(403, "no admin token is configured (admin.token_file), so the "
                                  "dashboard is read-only")
            return
        client = self.request.remote_ip or "-"
        wait = auth.throttle.wait_seconds(client)
        if wait > 0:
            self.set_header("Retry-After", str(math.ceil(wait)))
            self.render_page(429, f"too many failed logins; try again in {math.ceil(wait)} s")
            return
        made = auth.login(self.get_body_argument("token", ""))
        if made is None:
            auth.throttle.failed(client)
            self.console.audit("login", result="failure", client=client, via="session")
            self.render_page(401, "wrong admin token")
            return
        auth.throttle.succeeded(client)
        self.console.audit("login", result="success", client=client, via="session")
        session_id, _ = made
        self.set_cookie(SESSION_COOKIE, session_id, path="/", httponly=True,
                        samesite="Strict", max_age=SESSION_SECONDS)
        self.redirect("/?done=" + quote("logged in"), status=303)


class LogoutPage(DashboardHandler):
    body_limit = LOGIN_BODY_BYTES

    def admit(self) -> None:
        return None  # without a session it only clears the cookie

    @with_body
    def post(self) -> None:
        self.parse_form()
        session = self.session
        if session is not None and self.console.auth.csrf_ok(
                session, self.get_body_argument("_csrf", None)):
            self.console.auth.logout(self.get_cookie(SESSION_COOKIE))
        self.clear_cookie(SESSION_COOKIE, path="/")
        self.redirect("/", status=303)


def dashboard_handlers(console: Console) -> list[tuple[str, type[tornado.web.RequestHandler],
                                                        dict[str, Any]]]:
    args = {"console": console}
    return [
        (r"/", ConnectionsPage, args),
        (r"/connections", ConnectionsPage, args),
        (r"/connections/live", ConnectionsLive, args),
        (r"/basic-auth", BasicAuthPage, args),
        (r"/oauth", OAuthPage, args),
        (r"/ca-bundles", CaBundlesPage, args),
        (r"/egress-proxies", EgressProxiesPage, args),
        (r"/login", LoginPage, args),
        (r"/logout", LogoutPage, args),
        (r"/static/(.*)", StaticFiles, {"path": str(HERE / "static")}),
    ]
