"""Every ``500`` of the admin listener is logged: one JSON line ``{"level": "error", "event":
"admin_error", "request_id", "traceback"}``, whose ``request_id`` the answer carries as
``X-Request-ID``, so the "see the sidecar's log" of the answer leads to its line.

The traceback passes the live snapshot's redactor line by line: an exception whose text holds a
secret (a password the sidecar read, a token) does not carry it into the log.
"""

from __future__ import annotations

import logging
import os
import traceback
from types import TracebackType

import tornado.web

from sidecar.report.logs import log_event
from sidecar.report.redaction import Redactor

REQUEST_ID = "X-Request-ID"
# A traceback line is code and an exception's words; longer ones are cut (after redacting).
MAX_LINE_CHARS = 2000


def scrubbed_traceback(typ: type[BaseException] | None, value: BaseException | None,
                       tb: TracebackType | None, redactor: Redactor) -> str:
    text = "".join(traceback.format_exception(typ, value, tb))
    return "\n".join(redactor.scrub(line, MAX_LINE_CHARS) for line in text.splitlines())


class LoggedErrors(tornado.web.RequestHandler):
    """The base of every admin handler: logs what failed with a 500, once, through the
    redactor, and answers with the request id of that log line."""

    _error_request_id: str | None = None

    def log_exception(self, typ: type[BaseException] | None, value: BaseException | None,
                      tb: TracebackType | None) -> None:
        if isinstance(value, tornado.web.HTTPError) and value.status_code < 500:
            return  # an answer on purpose (404, 405), not a failure
        request_id = os.urandom(16).hex()
        self._error_request_id = request_id
        redactor = getattr(self.application, "redactor", None)
        if not isinstance(redactor, Redactor):
            redactor = Redactor()
        log_event("admin_error", logging.ERROR,
                  f"the admin listener failed on {self.request.method} {self.request.path}",
                  request_id=request_id,
                  traceback=scrubbed_traceback(typ, value, tb, redactor))

    def clear(self) -> None:
        # send_error clears the headers before it writes the error page: put the id back.
        super().clear()
        if self._error_request_id is not None:
            self.set_header(REQUEST_ID, self._error_request_id)
