"""Log lines: JSON by default (keys: docs/metrics.md#logs), or plain text for humans.

Nothing here ever receives a secret, an ``Authorization`` value or a query string: callers pass
only the fields below, and the request path is stripped of its query before it gets here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "fhir_sidecar"
logger = logging.getLogger(LOGGER_NAME)

_FIELD_SET = frozenset(("request_id", "connection", "method", "path", "status",
                        "upstream_status", "duration_ms", "bytes_in", "bytes_out", "error",
                        "caller", "trace_id"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or record.getMessage(),
        }
        fields = getattr(record, "fields", None) or {}
        line.update({k: v for k, v in fields.items() if v is not None})
        if getattr(record, "event", None) and record.getMessage() != record.event:  # type: ignore[attr-defined]
            line.setdefault("message", record.getMessage())
        if record.exc_info:  # an exception (ours, or one mitmproxy caught in our hooks)
            line["logger"] = record.name
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        event = getattr(record, "event", None) or record.getMessage()
        message = record.getMessage()
        text = event if message == event else f"{event}: {message}"
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname.lower():7} {text} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    # mitmproxy's own problems (addon errors, TLS alerts) belong in the same stream; its
    # informational lines would repeat every request with its full URL, query string included.
    # Modules log under their own names (``sidecar.credentials.oauth``, ...).
    package = logging.getLogger("sidecar")
    package.handlers[:] = [handler]
    package.setLevel(level.upper())
    package.propagate = False
    mitm = logging.getLogger("mitmproxy")
    mitm.handlers[:] = [handler]
    mitm.setLevel(logging.WARNING)
    mitm.propagate = False


def log_event(event: str, level: int = logging.INFO, message: str | None = None,
              **fields: Any) -> None:
    logger.log(level, message or event, extra={"event": event, "fields": fields})


def log_request(**fields: Any) -> None:
    """One line per request. On the hot path: the record is made directly, skipping the
    caller lookup (a stack walk) that ``Logger.log`` does for a source location we never
    print."""
    assert set(fields) <= _FIELD_SET, f"unexpected log fields {set(fields) - _FIELD_SET}"
    status = fields.get("status") or 0
    level = logging.WARNING if status >= 500 else logging.INFO
    if logger.isEnabledFor(level):
        logger.handle(logger.makeRecord(LOGGER_NAME, level, __file__, 0, "request", (), None,
                                        extra={"event": "request", "fields": fields}))
