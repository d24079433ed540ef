"""What every request to the admin listener passes before a handler sees it.

- ``Host`` must name this listener (:mod:`sidecar.callers.hosts`); anything else gets ``421``.
- Request bodies are read only by handlers that take one (:class:`BoundedBody`), after they
  have checked who is asking and only up to their own limit; a body sent to any other resource
  gets ``413`` before a byte of it is read. Without this, tornado would buffer up to 100 MB per
  request for anyone who can connect, before a handler could say ``401``.
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Callable
from typing import Any, cast

import tornado.httputil
import tornado.web

from sidecar.admin.error_log import LoggedErrors
from sidecar.callers.hosts import host_allowed
from sidecar.report.redaction import Redactor
from sidecar.runtime.live import LiveConfig

MAX_API_BODY_BYTES = 1024 * 1024


def _answering_before_body(handler: tornado.web.RequestHandler) -> None:
    # tornado closes a connection answered before its request was read to the end (even an
    # empty body); say so, or a client that keeps connections alive sends its next request
    # into a closed socket.
    handler.set_header("Connection", "close")


def _problem(handler: tornado.web.RequestHandler, status: int, message: str) -> None:
    _answering_before_body(handler)
    handler.clear_header("Content-Type")
    handler.set_status(status)
    handler.set_header("Content-Type", "application/json")
    handler.set_header("Cache-Control", "no-store")
    handler.finish(json.dumps({"error": message, "problems": []}) + "\n")


def declares_body(request: tornado.httputil.HTTPServerRequest) -> bool:
    length = request.headers.get("Content-Length")
    return "Transfer-Encoding" in request.headers or (length is not None
                                                      and length.strip() != "0")


def declared_length(request: tornado.httputil.HTTPServerRequest) -> int | None:
    length = request.headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None


def local_address(request: tornado.httputil.HTTPServerRequest) -> str | None:
    """The address the request's connection arrived on (tornado keeps the socket on the
    connection's stream; it is not part of the request's documented attributes)."""
    stream = getattr(request.connection, "stream", None)
    sock = getattr(stream, "socket", None)
    if not isinstance(sock, socket.socket):
        return None
    try:
        return str(sock.getsockname()[0])
    except OSError:
        return None


@tornado.web.stream_request_body
class MisdirectedHandler(LoggedErrors):
    def prepare(self) -> None:
        _problem(self, 421, f"this admin listener does not answer for the host "
                            f"{self.request.host_name!r}; if that name is meant to reach it, "
                            "add it to admin.allowed_hosts")


@tornado.web.stream_request_body
class NoBodyHandler(LoggedErrors):
    def prepare(self) -> None:
        _problem(self, 413, f"{self.request.method} {self.request.path} takes no request body")


@tornado.web.stream_request_body
class BoundedBody(LoggedErrors):
    """A handler that takes a request body, streamed and capped at ``body_limit`` bytes.

    Subclasses check who is asking in :meth:`admit` (from headers alone), before any of the
    body is read; :meth:`refuse_too_large` answers a body over the limit. Handler methods that
    act are wrapped in :func:`with_body`, which skips them once the body was refused.
    """

    accepts_body = True
    body_limit = MAX_API_BODY_BYTES
    body_refused = False
    answered = False  # a response was sent (possibly before the body arrived)

    def on_finish(self) -> None:
        self.answered = True

    def prepare(self) -> None:
        self._body_parts: list[bytes] = []
        self._body_size = 0
        _answering_before_body(self)  # in effect only if admit() answers
        self.admit()
        if self.answered:
            return
        self.clear_header("Connection")
        declared = declared_length(self.request)
        if declared is not None and declared > self.body_limit:
            self.body_refused = True
            _answering_before_body(self)
            self.refuse_too_large()

    def admit(self) -> None:
        """Raise or answer when this request may not go on; its body is not read then."""

    def refuse_too_large(self) -> None:
        _problem(self, 413, f"the request body is larger than {self.body_limit} bytes")

    def data_received(self, chunk: bytes) -> None:
        if self.body_refused:
            return
        self._body_size += len(chunk)
        if self._body_size > self.body_limit:  # a chunked body with no declared length
            self.body_refused = True
            self._body_parts.clear()
            _answering_before_body(self)
            self.refuse_too_large()
            return
        self._body_parts.append(chunk)

    @property
    def body(self) -> bytes:
        return b"".join(self._body_parts)

    def parse_form(self) -> None:
        """Fill the request's body arguments and files, as tornado does for a buffered body."""
        request = self.request
        request.body = self.body
        tornado.httputil.parse_body_arguments(request.headers.get("Content-Type", ""),
                                              request.body, request.body_arguments,
                                              request.files, request.headers)
        for name, values in request.body_arguments.items():
            request.arguments.setdefault(name, []).extend(values)


def with_body[M: Callable[..., Any]](method: M) -> M:
    """Run a handler method only when its request body was accepted and read."""
    @functools.wraps(method)
    def run(self: BoundedBody, *args: Any, **kwargs: Any) -> Any:
        if self.body_refused or self.answered:
            return None
        return method(self, *args, **kwargs)
    return cast(M, run)


class AdminApplication(tornado.web.Application):
    """The admin listener's application: the ``Host`` check and the body rule, then routing."""

    def __init__(self, handlers: list[Any], live: LiveConfig, **settings: Any):
        super().__init__(handlers, **settings)
        self._live = live
        listen = live.current.config.admin.listen
        # The address is read at start, like the listener itself (it moves only on restart).
        self.listen_host = listen.host if listen else "127.0.0.1"

    @property
    def redactor(self) -> Redactor:
        """The live snapshot's: it knows every secret the sidecar has read."""
        return self._live.current.redactor

    def find_handler(self, request: tornado.httputil.HTTPServerRequest,
                     **kwargs: Any) -> Any:
        host = request.headers.get("Host")
        # No Host at all is not a browser (browsers always send one): HTTP/1.0 health checkers.
        if host is not None and not host_allowed(
                host, listen_host=self.listen_host, local_address=local_address(request),
                allowed_hosts=self._live.current.config.admin.allowed_hosts):
            return self.get_handler_delegate(request, MisdirectedHandler)
        delegate = super().find_handler(request, **kwargs)
        if declares_body(request) and not getattr(delegate.handler_class, "accepts_body",
                                                  False):
            return self.get_handler_delegate(request, NoBodyHandler)
        return delegate
