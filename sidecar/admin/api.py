"""The JSON API under ``/api``, described at ``/api/openapi.json``.

Writes need ``Authorization: Bearer <admin token>``, or a browser session cookie plus its CSRF
token in ``X-CSRF-Token``; every write goes through :class:`ConfigStore`, the one write path.
Reads never contain a secret; they are open on a loopback admin listener and need the token (or
a session) on any other. Who is asking is decided from the headers, before the body is read;
bodies are capped (:data:`~sidecar.admin.guard.MAX_API_BODY_BYTES`, CA bundles smaller).
"""

from __future__ import annotations

import json
import math
from typing import Any

import tornado.web

from sidecar.admin.auth import SESSION_COOKIE
from sidecar.admin.config_store import (
    MAX_UPLOAD_BYTES,
    ChangeRejected,
    Kind,
    check_name,
)
from sidecar.admin.console import Console
from sidecar.admin.guard import BoundedBody, with_body
from sidecar.admin.openapi import openapi_document
from sidecar.admin.views import ca_bundle_view

READ_METHODS = frozenset({"GET", "HEAD"})


# The object names of audit records: the API's own path segments.
OBJECT_WORDS = {"connections": "connections", "basic_auth": "basic-auth", "oauth": "oauth"}


class ApiHandler(BoundedBody):
    def initialize(self, console: Console) -> None:
        self.console = console

    def admit(self) -> None:
        reading = self.request.method in READ_METHODS
        if reading and not self.console.reads_need_token:
            return
        self.authorize(write=not reading)

    def refuse_too_large(self) -> None:
        self.reply_error(413, f"the request body is larger than {self.body_limit} bytes")

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def check_xsrf_cookie(self) -> None:  # CSRF is checked in authorize_write
        return None

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ChangeRejected):
            self.reply_error(exc.status, exc.message, exc.problems)
            return
        reason = self._reason if status_code < 500 else "internal error; see the sidecar's log"
        self.reply_error(status_code, reason)

    def reply_error(self, status: int, message: str, problems: list[str] | None = None) -> None:
        self.clear_header("Content-Type")
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message, "problems": problems or []}) + "\n")

    def audit_change(self, object_: str, action: str) -> None:
        """A change made: who (client address; admin token or session), what, how."""
        via = "token" if self.request.headers.get("Authorization") is not None else "session"
        self.console.audit("change", result="success", client=self.request.remote_ip,
                           via=via, object=object_, action=action)

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, indent=2) + "\n")

    def authorize(self, write: bool, changes: bool = True) -> None:
        """Raise ChangeRejected unless this request carries the admin token (or a session).

        ``write``: a POST, PUT or DELETE, which a session must send with its CSRF token.
        ``changes``: it changes the configuration, which read-only mode refuses (a connection
        test is a write that changes nothing, so it works in read-only mode too).
        """
        console = self.console
        if not console.auth.token_configured():
            if write and not changes:
                raise ChangeRejected(403, "testing needs the admin token, and no readable "
                                          "admin.token_file is configured")
            if not write:
                raise ChangeRejected(403, "this admin listener is not on loopback, so reading "
                                          "the API needs the admin token, and no readable "
                                          "admin.token_file is configured")
            raise ChangeRejected(403, console.read_only_reason() or
                                 "the admin token file cannot be read; changes are disabled")
        client = self.request.remote_ip or "-"
        wait = console.auth.throttle.wait_seconds(client)
        if wait > 0:
            self.set_header("Retry-After", str(math.ceil(wait)))
            raise ChangeRejected(429, f"too many failed attempts; try again in "
                                      f"{math.ceil(wait)} s")
        header = self.request.headers.get("Authorization")
        if header is not None:
            if not console.auth.bearer_ok(header):
                console.auth.throttle.failed(client)
                console.audit("login", result="failure", client=client, via="token")
                raise ChangeRejected(401, "the Authorization header does not carry the admin "
                                          "token (Authorization: Bearer <token>)")
            console.auth.throttle.succeeded(client)
        else:
            session = console.auth.session(self.get_cookie(SESSION_COOKIE))
            if session is None:
                self.set_header("WWW-Authenticate", 'Bearer realm="fhir-sidecar"')
                raise ChangeRejected(401, f"{'changes need' if write else 'reading needs'} "
                                          "the admin token: send Authorization: Bearer <token>")
            if write and not console.auth.csrf_ok(session,
                                                  self.request.headers.get("X-CSRF-Token")):
                raise ChangeRejected(403, "missing or wrong X-CSRF-Token for this session")
        reason = console.read_only_reason()
        if write and changes and reason is not None:
            raise ChangeRejected(403, reason)

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, ChangeRejected):
            self.reply_error(e.status, e.message, e.problems)
            return
        super()._handle_request_exception(e)

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError):
            raise ChangeRejected(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ChangeRejected(400, "the request body must be a JSON object")
        return body


class _DefinitionHandler(ApiHandler):
    kind: Kind

    def _get_one(self, name: str) -> dict[str, Any]:
        raise NotImplementedError

    def _list(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _put(self, name: str, body: dict[str, Any]) -> bool:
        raise NotImplementedError

    @with_body
    def get(self, name: str | None = None) -> None:
        if name is None:
            self.reply({"items": self._list()})
            return
        self._require_known(name)
        self.reply(self._get_one(name))

    @with_body
    def put(self, name: str | None = None) -> None:
        name = _named(name)
        check_name(name, self.kind)
        created = self._put(name, self.json_body())
        self.audit_change(f"{OBJECT_WORDS[self.kind]}/{name}",
                          "created" if created else "replaced")
        self.reply(self._get_one(name), 201 if created else 200)

    @with_body
    def delete(self, name: str | None = None) -> None:
        name = _named(name)
        check_name(name, self.kind)
        self.console.store.delete(self.kind, name)
        self.audit_change(f"{OBJECT_WORDS[self.kind]}/{name}", "deleted")
        self.set_status(204)
        self.finish()

    def _require_known(self, name: str) -> None:
        check_name(name, self.kind)
        if name not in getattr(self.console.store.config, self.kind):
            raise ChangeRejected(404, f"no {self.kind.replace('_', ' ')} entry named {name!r}")


class ConnectionsHandler(_DefinitionHandler):
    kind = "connections"

    def _list(self) -> list[dict[str, Any]]:
        return self.console.views.connections()

    def _get_one(self, name: str) -> dict[str, Any]:
        return self.console.views.connection(name)

    def _put(self, name: str, body: dict[str, Any]) -> bool:
        return self.console.store.put_connection(name, body)[0]


class BasicAuthHandler(_DefinitionHandler):
    kind = "basic_auth"

    def _list(self) -> list[dict[str, Any]]:
        return self.console.views.basic_auths()

    def _get_one(self, name: str) -> dict[str, Any]:
        return self.console.views.basic_auth(name)

    def _put(self, name: str, body: dict[str, Any]) -> bool:
        return self.console.store.put_basic(name, body)[0]


class OAuthHandler(_DefinitionHandler):
    kind = "oauth"

    def _list(self) -> list[dict[str, Any]]:
        return self.console.views.oauths()

    def _get_one(self, name: str) -> dict[str, Any]:
        return self.console.views.oauth(name)

    def _put(self, name: str, body: dict[str, Any]) -> bool:
        return self.console.store.put_oauth(name, body)[0]


class CaBundlesHandler(ApiHandler):
    body_limit = MAX_UPLOAD_BYTES

    def refuse_too_large(self) -> None:
        self.reply_error(413, f"the CA bundle is larger than {MAX_UPLOAD_BYTES} bytes")

    @with_body
    def get(self, name: str | None = None) -> None:
        store = self.console.store
        if name is None:
            self.reply({"items": self.console.views.ca_bundles()})
            return
        check_name(name, "ca_bundles")
        bundle = store.ca_bundle(name)
        if bundle is None:
            raise ChangeRejected(404, f"no CA bundle named {name!r}")
        self.reply(ca_bundle_view(bundle))

    @with_body
    def put(self, name: str | None = None) -> None:
        name = _named(name)
        check_name(name, "ca_bundles")
        created, _ = self.console.store.put_ca_bundle(name, self.body)
        self.audit_change(f"ca-bundles/{name}", "created" if created else "replaced")
        bundle = self.console.store.ca_bundle(name)
        assert bundle is not None
        self.reply(ca_bundle_view(bundle), 201 if created else 200)

    @with_body
    def delete(self, name: str | None = None) -> None:
        name = _named(name)
        check_name(name, "ca_bundles")
        self.console.store.delete_ca_bundle(name)
        self.audit_change(f"ca-bundles/{name}", "deleted")
        self.set_status(204)
        self.finish()


class EgressProxiesHandler(ApiHandler):
    """Read-only: egress proxies are the config file's (docs/admin-api.md#egress-proxies)."""

    @with_body
    def get(self, name: str | None = None) -> None:
        views = self.console.views
        if name is None:
            self.reply({"items": views.egress_proxies()})
            return
        check_name(name, "egress_proxies")
        if name not in self.console.store.config.egress_proxies:
            raise ChangeRejected(404, f"no egress proxy named {name!r}")
        self.reply(views.egress_proxy(name))

    @with_body
    def refuse(self, name: str | None = None) -> None:
        self.set_header("Allow", "GET")
        raise ChangeRejected(405, "egress proxies are read-only here: define them in the "
                                  "config file (egress_proxies) and assign them with via")

    put = post = delete = patch = refuse


def _named(name: str | None) -> str:
    if name is None:
        raise ChangeRejected(405, "PUT and DELETE need a name: /api/<resource>/<name>")
    return name


class OpenApiHandler(ApiHandler):
    @with_body
    def get(self) -> None:
        self.reply(openapi_document())


class ApiNotFound(ApiHandler):
    def admit(self) -> None:
        self.reply_error(404, f"no API resource at {self.request.path}")


def api_handlers(console: Console) -> list[tuple[str, type[tornado.web.RequestHandler],
                                                  dict[str, Any]]]:
    args = {"console": console}
    found: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
        (r"/api/openapi\.json", OpenApiHandler, args)]
    for prefix, handler in (("connections", ConnectionsHandler),
                            ("basic-auth", BasicAuthHandler),
                            ("oauth", OAuthHandler),
                            ("ca-bundles", CaBundlesHandler),
                            ("egress-proxies", EgressProxiesHandler)):
        found += [(rf"/api/{prefix}/?", handler, args),
                  (rf"/api/{prefix}/([^/]+)", handler, args)]
    found.append((r"/api(/.*)?", ApiNotFound, args))
    return found
