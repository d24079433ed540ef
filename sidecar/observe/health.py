"""The status light of a connection: green, amber or red, and why.

The rule is documented in docs/admin-api.md#the-status-light.

A pure function of what the status board, the token source and the certificates say, and of
the time: the dashboard and the API show what :func:`connection_health` answers, and tests
call it with any inputs and any ``now``. Every reason is made of configured names, numbers and
fixed error words; nothing from outside the sidecar is quoted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Light = Literal["green", "amber", "red"]
LIGHTS: tuple[Light, ...] = ("green", "amber", "red")  # better to worse

WINDOW_SECONDS = 300.0  # "the last 5 minutes"
DAY = 86400.0
RED_DAYS = 7  # a certificate expiring sooner (or expired) is red
AMBER_DAYS = 30  # ... sooner than this is amber

# Error words (docs/errors.md, docs/metrics.md) that say nothing about the connection: the app
# left, or sent something the sidecar refused before routing it.
APP_ERRORS = frozenset({"client-disconnected", "bad-request", "header-too-large", "no-route"})
# The caller's fault, refused by the sidecar on a connection's listener (a Host the listener
# does not answer, an Origin or a caller it does not allow), and the sidecar's own audit
# refusals: answers the sidecar made, never the FHIR server's; never counted against a
# connection.
CALLER_FAULTS = frozenset({"misdirected", "origin-not-allowed", "caller-unauthenticated",
                           "caller-forbidden", "audit-unavailable"})
NOT_THE_CONNECTION = APP_ERRORS | CALLER_FAULTS
# The FHIR server refused the credentials: a 401 or 403 it answered itself (after the one
# retry with a new token, for OAuth). Red when at least REJECTED_SHARE of the requests that
# reached it in the window, and at least REJECTED_MIN of them, were refused so.
REJECTION_STATUSES = ("401", "403")
REJECTED_SHARE = 0.5
REJECTED_MIN = 3
# A response cut off in the middle: the upstream (or the app) left while it streamed.
INTERRUPTED = "stream-aborted"


@dataclass(frozen=True)
class TokenState:
    """What the connection's OAuth token source says (connections with an OAuth definition)."""

    usable: bool  # it holds a token that may be sent now
    last_attempt_failed: bool  # the last token request failed (and none has worked since)


@dataclass(frozen=True)
class HealthInputs:
    """What the light is computed from; times are epoch seconds."""

    requests_recent: int  # requests finished in the last 5 minutes
    errors_recent: Mapping[str, int]  # error word -> requests of the last 5 minutes
    last_error: str | None = None
    last_error_at: float | None = None
    last_answer_at: float | None = None  # the upstream's last answer (any status)
    token: TokenState | None = None  # None: no OAuth definition
    # What the FHIR server itself answered in the last 5 minutes (the sidecar's own answers
    # are not in it): how many requests reached it, and its 401s and 403s by status.
    upstream_recent: int = 0
    rejections_recent: Mapping[str, int] = field(default_factory=dict)
    last_rejection_at: float | None = None
    ca_bundle_expires_at: float | None = None  # the bundle's earliest certificate expiry
    client_cert_expires_at: float | None = None


@dataclass(frozen=True)
class Health:
    light: Light
    reason: str  # the worst finding (the first of ``reasons``), or why it is green
    reasons: tuple[str, ...]  # every finding, worst first; empty when green


def is_failure(error: str) -> bool:
    """An error word that says the connection did not work (not the app's doing)."""
    return error not in NOT_THE_CONNECTION and error != INTERRUPTED


def days_left(expires_at: float, now: float) -> int:
    """Whole days until ``expires_at``, rounded down; negative once expired."""
    return int((expires_at - now) // DAY)


def expiry_light(expires_at: float, now: float) -> Light:
    """Red when expired or under :data:`RED_DAYS` days left, amber under :data:`AMBER_DAYS`."""
    left = expires_at - now
    if left < RED_DAYS * DAY:
        return "red"
    if left < AMBER_DAYS * DAY:
        return "amber"
    return "green"


def connection_health(inputs: HealthInputs, now: float) -> Health:
    findings: list[tuple[Light, str]] = []
    findings += _errors(inputs, now)
    findings += _rejections(inputs, now)
    findings += _token(inputs.token)
    for what, expires in (("CA bundle", inputs.ca_bundle_expires_at),
                          ("client certificate", inputs.client_cert_expires_at)):
        if expires is not None and expiry_light(expires, now) != "green":
            findings.append((expiry_light(expires, now), _expiry_words(what, expires, now)))
    if not findings:
        return Health("green", "no requests in the last 5 min" if not inputs.requests_recent
                      else "no errors in the last 5 min", ())
    # Worst first; among equals, in the order found (errors, rejections, token, certificates).
    findings.sort(key=lambda f: -LIGHTS.index(f[0]))
    return Health(findings[0][0], findings[0][1], tuple(words for _, words in findings))


def _errors(inputs: HealthInputs, now: float) -> list[tuple[Light, str]]:
    found: list[tuple[Light, str]] = []
    # The most frequent kind first.
    failures = {k: n for k, n in sorted(inputs.errors_recent.items(), key=lambda i: (-i[1], i[0]))
                if n and is_failure(k)}
    last, at = inputs.last_error, inputs.last_error_at
    failing_now = (last is not None and at is not None and is_failure(last)
                   and now - at < WINDOW_SECONDS
                   and (inputs.last_answer_at is None or inputs.last_answer_at < at))
    counted = ", ".join(f"{n} {k}" for k, n in failures.items())
    if failing_now:
        assert last is not None and at is not None
        found.append(("red", f"failing: {last} {_ago(now - at)}, no answer since"
                             + (f" ({counted} in 5 min)" if counted else "")))
    elif failures:
        found.append(("amber", f"{counted} in the last 5 min; answered since"))
    interrupted = inputs.errors_recent.get(INTERRUPTED, 0)
    if interrupted:
        found.append(("amber", f"{interrupted} response{'s' if interrupted > 1 else ''} cut "
                               f"off ({INTERRUPTED}) in the last 5 min"))
    return found


def _rejections(inputs: HealthInputs, now: float) -> list[tuple[Light, str]]:
    refused = {status: n for status, n in sorted(inputs.rejections_recent.items()) if n}
    total = sum(refused.values())
    if not total:
        return []
    reached = max(inputs.upstream_recent, total)
    red = total >= REJECTED_MIN and total >= REJECTED_SHARE * reached
    words = (f"the FHIR server refused the credentials ({', '.join(refused)}) "
             f"{_times(total)} in 5 min")
    if inputs.last_rejection_at is not None:
        words += f"; last {_ago(now - inputs.last_rejection_at)}"
    return [("red" if red else "amber", words)]


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def _token(token: TokenState | None) -> list[tuple[Light, str]]:
    if token is None:
        return []
    if not token.usable and token.last_attempt_failed:
        return [("red", "no usable OAuth token: the last token request failed")]
    if not token.usable:
        return [("amber", "no OAuth token yet")]
    if token.last_attempt_failed:
        return [("amber", "the last token refresh failed; the current token is still used")]
    return []


def _expiry_words(what: str, expires_at: float, now: float) -> str:
    days = days_left(expires_at, now)
    if expires_at <= now:
        return f"{what} expired"
    if days == 0:
        return f"{what} expires within a day"
    return f"{what} expires in {days} day{'s' if days > 1 else ''}"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s ago" if seconds < 60 else f"{seconds // 60} min ago"
