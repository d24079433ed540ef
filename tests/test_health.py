"""The status light's rule (sidecar/observe/health.py), the per-minute ring of the last hour
(sidecar/observe/trends.py) and what the dashboard draws from them (sidecar/admin/glance.py),
with the time given as an argument (docs/admin-api.md#the-status-light)."""

from __future__ import annotations

import pytest

from sidecar.admin.glance import relative, spark_y, sparkline, token_bar, when
from sidecar.observe.health import (
    DAY,
    Health,
    HealthInputs,
    TokenState,
    connection_health,
    days_left,
    expiry_light,
)
from sidecar.observe.metrics import StatusBoard
from sidecar.observe.trends import MINUTES, MinuteRing

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC, on a minute boundary


def health(now: float = NOW, **given: object) -> Health:
    inputs: dict[str, object] = {"requests_recent": 0, "errors_recent": {}}
    inputs.update(given)
    return connection_health(HealthInputs(**inputs), now)  # type: ignore[arg-type]


# -- the light ------------------------------------------------------------------------------

def test_idle_and_working_connections_are_green() -> None:
    assert health() == Health("green", "no requests in the last 5 min", ())
    assert health(requests_recent=12, last_answer_at=NOW - 3) == \
        Health("green", "no errors in the last 5 min", ())


def test_an_error_after_the_last_answer_within_5_minutes_is_red() -> None:
    failing = health(requests_recent=5, errors_recent={"upstream-tls": 3},
                     last_error="upstream-tls", last_error_at=NOW - 42,
                     last_answer_at=NOW - 200)
    assert failing.light == "red"
    assert failing.reason == "failing: upstream-tls 42 s ago, no answer since " \
                             "(3 upstream-tls in 5 min)"
    never_answered = health(requests_recent=1, errors_recent={"upstream-unreachable": 1},
                            last_error="upstream-unreachable", last_error_at=NOW - 130)
    assert never_answered.light == "red" and "2 min ago" in never_answered.reason


def test_errors_followed_by_an_answer_are_amber() -> None:
    recovered = health(requests_recent=9,
                       errors_recent={"upstream-tls": 1, "upstream-timeout": 2},
                       last_error="upstream-timeout", last_error_at=NOW - 60,
                       last_answer_at=NOW - 10)
    words = "2 upstream-timeout, 1 upstream-tls in the last 5 min; answered since"
    assert recovered == Health("amber", words, (words,))


def test_the_last_errors_age_ends_red_after_5_minutes() -> None:
    # The window has moved past the error: no counts left, and its age is over 5 minutes.
    old = health(requests_recent=0, errors_recent={}, last_error="upstream-tls",
                 last_error_at=NOW - 301, last_answer_at=NOW - 900)
    assert old.light == "green"
    # Counted in the window but older than the last answer: amber, not red.
    boundary = health(requests_recent=2, errors_recent={"upstream-tls": 1},
                      last_error="upstream-tls", last_error_at=NOW - 299,
                      last_answer_at=NOW - 299.5)
    assert boundary.light == "red"


def test_the_apps_own_errors_do_not_change_the_light_and_cut_off_responses_are_amber() -> None:
    app = health(requests_recent=4, errors_recent={"client-disconnected": 4},
                 last_error="client-disconnected", last_error_at=NOW - 1)
    assert app.light == "green"
    cut = health(requests_recent=4, errors_recent={"stream-aborted": 2},
                 last_error="stream-aborted", last_error_at=NOW - 1, last_answer_at=NOW - 30)
    assert cut == Health("amber", "2 responses cut off (stream-aborted) in the last 5 min",
                         ("2 responses cut off (stream-aborted) in the last 5 min",))


@pytest.mark.parametrize("kind", ["misdirected", "origin-not-allowed", "caller-unauthenticated",
                                  "caller-forbidden", "audit-unavailable"])
def test_the_callers_faults_and_audit_refusals_never_count_against_a_connection(
        kind: str) -> None:
    refused = health(requests_recent=10, errors_recent={kind: 10}, last_error=kind,
                     last_error_at=NOW - 1)
    assert refused == Health("green", "no errors in the last 5 min", ())


# -- credentials the FHIR server refused -------------------------------------------------------

@pytest.mark.parametrize(("reached", "refused", "light"), [
    (26, {"401": 13}, "red"),  # half: red
    (27, {"401": 13}, "amber"),  # under half
    (3, {"401": 3}, "red"),  # all of three
    (2, {"401": 2}, "amber"),  # all, but fewer than three
    (4, {"401": 1, "403": 2}, "red"),  # 401s and 403s add up
    (100, {"403": 1}, "amber"),  # any refusal is amber
])
def test_refused_credentials_are_red_from_half_and_three(reached: int, refused: dict[str, int],
                                                         light: str) -> None:
    found = health(requests_recent=reached, upstream_recent=reached, rejections_recent=refused,
                   last_rejection_at=NOW - 20, last_answer_at=NOW - 20)
    assert found.light == light, found


def test_the_refusal_reason_says_it_plainly() -> None:
    found = health(requests_recent=30 + 13, upstream_recent=26, rejections_recent={"401": 13},
                   last_rejection_at=NOW - 20, last_answer_at=NOW - 20)
    assert found.reason == ("the FHIR server refused the credentials (401) 13 times in 5 min; "
                            "last 20 s ago")
    once = health(requests_recent=9, upstream_recent=9, rejections_recent={"403": 1},
                  last_rejection_at=NOW - 130)
    assert once == Health("amber", "the FHIR server refused the credentials (403) once in "
                                   "5 min; last 2 min ago",
                          ("the FHIR server refused the credentials (403) once in 5 min; "
                           "last 2 min ago",))
    both = health(upstream_recent=4, rejections_recent={"403": 1, "401": 2},
                  last_rejection_at=NOW - 1)
    assert both.reason.startswith("the FHIR server refused the credentials (401, 403) 3 times")


def test_the_board_counts_only_what_the_fhir_server_answered() -> None:
    board = StatusBoard(clock=lambda: NOW)
    for status, error, upstream in ((200, None, 200), (401, None, 401), (403, None, 403),
                                    (403, "origin-not-allowed", None),  # the sidecar's answer
                                    (401, "caller-unauthenticated", None),
                                    (502, "upstream-unreachable", None),
                                    (200, None, 200)):  # a 401 retried into a 200
        board.started("a")
        board.finished("a", status, error, upstream)
    activity = board.connection("a")
    assert activity.upstream_recent.totals() == {"2xx": 2, "4xx": 2}
    assert activity.rejections_recent.totals() == {"401": 1, "403": 1}
    assert activity.last_rejection_at == NOW


@pytest.mark.parametrize(("token", "light", "reason"), [
    (TokenState(usable=True, last_attempt_failed=False), "green", "no requests in the last 5 min"),
    (TokenState(usable=True, last_attempt_failed=True), "amber",
     "the last token refresh failed; the current token is still used"),
    (TokenState(usable=False, last_attempt_failed=False), "amber", "no OAuth token yet"),
    (TokenState(usable=False, last_attempt_failed=True), "red",
     "no usable OAuth token: the last token request failed"),
])
def test_the_token_state(token: TokenState, light: str, reason: str) -> None:
    found = health(token=token)
    assert (found.light, found.reason) == (light, reason)


@pytest.mark.parametrize(("days", "light", "words"), [
    (400, "green", None),
    (30.01, "green", None),
    (29.99, "amber", "CA bundle expires in 29 days"),
    (7.01, "amber", "CA bundle expires in 7 days"),
    (6.99, "red", "CA bundle expires in 6 days"),
    (1.5, "red", "CA bundle expires in 1 day"),
    (0.5, "red", "CA bundle expires within a day"),
    (-2, "red", "CA bundle expired"),
])
def test_certificate_expiry(days: float, light: str, words: str | None) -> None:
    expires = NOW + days * DAY
    assert expiry_light(expires, NOW) == light
    found = health(ca_bundle_expires_at=expires)
    assert found.light == light
    assert found.reasons == (() if words is None else (words,))


def test_days_left_rounds_down_and_goes_negative() -> None:
    assert days_left(NOW + 3.9 * DAY, NOW) == 3
    assert days_left(NOW + 0.1 * DAY, NOW) == 0
    assert days_left(NOW - 0.1 * DAY, NOW) == -1


def test_the_worst_finding_comes_first_and_every_finding_is_listed() -> None:
    found = health(requests_recent=3, errors_recent={"upstream-tls": 1},
                   last_error="upstream-tls", last_error_at=NOW - 100, last_answer_at=NOW - 5,
                   client_cert_expires_at=NOW + 3 * DAY,
                   token=TokenState(usable=True, last_attempt_failed=True))
    assert found.light == "red"
    assert found.reasons == ("client certificate expires in 3 days",
                             "1 upstream-tls in the last 5 min; answered since",
                             "the last token refresh failed; the current token is still used")
    assert found.reason == found.reasons[0]


# -- the ring of the last hour ---------------------------------------------------------------

def series(ring: MinuteRing, now: float) -> list[tuple[int, int]]:
    return [(m.requests, m.errors) for m in ring.series(now)]


def test_the_ring_counts_per_minute_and_rolls_over() -> None:
    ring = MinuteRing()
    assert series(ring, NOW) == [(0, 0)] * MINUTES
    ring.add(NOW + 1, error=False)
    ring.add(NOW + 59.9, error=True)
    ring.add(NOW + 60, error=False)  # the next minute
    found = series(ring, NOW + 60)
    assert found[-2:] == [(2, 1), (1, 0)] and sum(r for r, _ in found) == 3
    minutes = [m.minute for m in ring.series(NOW + 60)]
    assert minutes[-1] == int(NOW // 60) + 1 and minutes == list(range(minutes[0],
                                                                       minutes[0] + 60))
    # 59 minutes later the first minute is still the oldest bucket; a minute on, it is gone.
    assert series(ring, NOW + 59 * 60)[0] == (2, 1)
    assert series(ring, NOW + 60 * 60)[0] == (1, 0)
    assert series(ring, NOW + 61 * 60) == [(0, 0)] * MINUTES


def test_a_slot_is_emptied_before_it_is_reused() -> None:
    ring = MinuteRing()
    ring.add(NOW, error=True)
    ring.add(NOW + 60 * 60, error=False)  # the same slot, one lap later
    assert series(ring, NOW + 60 * 60)[-1] == (1, 0)
    assert sum(r for r, _ in series(ring, NOW + 60 * 60)) == 1
    ring.add(NOW + 60 * 60 * 5 + 30, error=True)  # hours later: everything else is gone
    assert series(ring, NOW + 60 * 60 * 5 + 30) == [(0, 0)] * (MINUTES - 1) + [(1, 1)]


def test_a_clock_that_goes_back_counts_into_the_newest_minute() -> None:
    ring = MinuteRing()
    ring.add(NOW + 600, error=False)
    ring.add(NOW, error=True)  # ten minutes back
    assert series(ring, NOW + 600)[-1] == (2, 1)
    assert sum(r for r, _ in series(ring, NOW + 600)) == 2


def test_the_board_feeds_the_ring_and_forgets_removed_connections() -> None:
    clock = [NOW]
    board = StatusBoard(clock=lambda: clock[0])
    for status, error in ((200, None), (502, "upstream-tls"), (200, None)):
        board.started("a")
        board.finished("a", status, error)
    clock[0] += 60
    board.started("a")
    board.finished("a", 504, "upstream-timeout")
    found = series(board.connection("a").trend, clock[0])
    assert found[-2:] == [(3, 1), (1, 1)]
    assert board.connection("a").errors_recent.totals() == {"upstream-tls": 1,
                                                            "upstream-timeout": 1}
    board.started("a")  # still running when "a" is removed
    board.keep_only([], [])
    assert series(board.connection("a").trend, clock[0]) == [(0, 0)] * MINUTES
    assert board.connection("a").in_flight == 1
    board.finished("a", 200, None)
    board.keep_only([], [])
    assert "a" not in board.connections()


# -- what the dashboard draws ----------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "words"), [
    (0, "just now"), (-4, "just now"), (-42, "42 s ago"), (240, "in 4 min"),
    (59 * 60 + 59, "in 59 min"), (-3 * 3600 - 5, "3 h ago"), (47 * 3600, "in 47 h"),
    (-12 * 86400, "12 days ago"),
])
def test_relative_times(seconds: float, words: str) -> None:
    assert relative(seconds) == words


def test_when_gives_the_exact_utc_time_for_the_hover() -> None:
    shown = when("2027-01-15T08:02:30Z", NOW)  # NOW is 08:00:00 UTC
    assert shown.exact == "2027-01-15 08:02:30 UTC"
    assert shown.relative == "in 2 min"
    assert shown.iso == "2027-01-15T08:02:30Z"
    assert when("2027-01-15T05:00:00+00:00", NOW).relative == "3 h ago"


def test_sparkline_points_scale_to_the_busiest_minute() -> None:
    spark = sparkline([0, 4, 2], [0, 1, 2])
    assert spark.peak == 4 and spark.total_requests == 6 and spark.total_errors == 3
    assert spark.requests == f"0,29 2,{spark_y(4, 4):g} 4,{spark_y(2, 4):g}"
    assert spark_y(4, 4) == 1 and spark_y(0, 4) == 29 and spark_y(2, 4) == 15
    assert spark.errors == "0,29 2,22 4,15"
    assert spark.width == 5
    assert sparkline([0] * 60, [0] * 60).peak == 1  # an idle hour is a flat line at zero


def test_token_bar() -> None:
    assert token_bar({"seconds_left": 150, "lifetime_seconds": 600}).percent == 25  # type: ignore[union-attr]
    assert token_bar({"seconds_left": 150, "lifetime_seconds": 600}).filled == 25.0  # type: ignore[union-attr]
    assert token_bar({"seconds_left": 900, "lifetime_seconds": 600}).percent == 100  # type: ignore[union-attr]
    assert token_bar({"seconds_left": None, "lifetime_seconds": None}) is None
    assert token_bar({"seconds_left": 0, "lifetime_seconds": 0}) is None
