"""The JSON API under ``/api`` (design §9 "Admin API"), described at ``/api/openapi.json``.

Reads are open on the admin listener (they never contain a secret). Writes need
``Authorization: Bearer <admin token>``, or a browser session cookie plus its CSRF token in
``X-CSRF-Token``; every write goes through :class:`ConfigStore`, the one write path.
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
from sidecar.admin.openapi import openapi_document
from sidecar.admin.views import ca_bundle_view

MAX_JSON_BYTES = 2 * MAX_UPLOAD_BYTES  # a body may carry a private key


class ApiHandler(tornado.web.RequestHandler):
    def initialize(self, console: Console) -> None:
        self.console = console

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

    def reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body, indent=2) + "\n")

    def authorize_write(self) -> None:
        """Raise ChangeRejected unless this request may change the configuration."""
        console = self.console
        if not console.auth.token_configured():
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
                raise ChangeRejected(401, "the Authorization header does not carry the admin "
                                          "token (Authorization: Bearer <token>)")
            console.auth.throttle.succeeded(client)
        else:
            session = console.auth.session(self.get_cookie(SESSION_COOKIE))
            if session is None:
                self.set_header("WWW-Authenticate", 'Bearer realm="fhir-sidecar"')
                raise ChangeRejected(401, "changes need the admin token: send "
                                          "Authorization: Bearer <token>")
            if not console.auth.csrf_ok(session, self.request.headers.get("X-CSRF-Token")):
                raise ChangeRejected(403, "missing or wrong X-CSRF-Token for this session")
        reason = console.read_only_reason()
        if reason is not None:
            raise ChangeRejected(403, reason)

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, ChangeRejected):
            self.reply_error(e.status, e.message, e.problems)
            return
        super()._handle_request_exception(e)

    def json_body(self) -> dict[str, Any]:
        if len(self.request.body) > MAX_JSON_BYTES:
            raise ChangeRejected(413, f"the request body is larger than {MAX_JSON_BYTES} bytes")
        try:
            body = json.loads(self.request.body or b"null")
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

    def get(self, name: str | None = None) -> None:
        if name is None:
            self.reply({"items": self._list()})
            return
        self._require_known(name)
        self.reply(self._get_one(name))

    def put(self, name: str | None = None) -> None:
        name = _named(name)
        check_name(name, self.kind)
        self.authorize_write()
        created = self._put(name, self.json_body())
        self.reply(self._get_one(name), 201 if created else 200)

    def delete(self, name: str | None = None) -> None:
        name = _named(name)
        check_name(name, self.kind)
        self.authorize_write()
        self.console.store.delete(self.kind, name)
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

    def put(self, name: str | None = None) -> None:
        name = _named(name)
        check_name(name, "ca_bundles")
        self.authorize_write()
        body = self.request.body
        if len(body) > MAX_UPLOAD_BYTES:
            raise ChangeRejected(413, f"the CA bundle is larger than {MAX_UPLOAD_BYTES} bytes")
        created, _ = self.console.store.put_ca_bundle(name, body)
        bundle = self.console.store.ca_bundle(name)
        assert bundle is not None
        self.reply(ca_bundle_view(bundle), 201 if created else 200)

    def delete(self, name: str | None = None) -> None:
        name = _named(name)
        check_name(name, "ca_bundles")
        self.authorize_write()
        self.console.store.delete_ca_bundle(name)
        self.set_status(204)
        self.finish()


def _named(name: str | None) -> str:
    if name is None:
        raise ChangeRejected(405, "PUT and DELETE need a name: /api/<resource>/<name>")
    return name


class OpenApiHandler(ApiHandler):
    def get(self) -> None:
        self.reply(openapi_document())


class ApiNotFound(ApiHandler):
    def prepare(self) -> None:
        self.reply_error(404, f"no API resource at {self.request.path}")


def api_handlers(console: Console) -> list[tuple[str, type[tornado.web.RequestHandler],
                                                  dict[str, Any]]]:
    args = {"console": console}
    found: list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]] = [
        (r"/api/openapi\.json", OpenApiHandler, args)]
    for prefix, handler in (("connections", ConnectionsHandler),
                            ("basic-auth", BasicAuthHandler),
                            ("oauth", OAuthHandler),
                            ("ca-bundles", CaBundlesHandler)):
        found += [(rf"/api/{prefix}/?", handler, args),
                  (rf"/api/{prefix}/([^/]+)", handler, args)]
    found.append((r"/api(/.*)?", ApiNotFound, args))
    return found
