"""Where an OAuth access token is fetched, cached and refreshed
(docs/architecture.md#credentials).

One :class:`TokenSource` per OAuth definition, shared by every connection that uses it:

* ``token()`` answers from the cache without waiting whenever the cached token is usable.
  Without one, all callers wait on a single fetch (single flight).
* A background task refreshes the token *before* it expires (a margin plus jitter, so several
  sidecars do not all refresh at the same instant), so steady traffic never waits on a refresh.
* While the token endpoint fails, a still-usable token keeps being served and the refresh is
  retried with exponential backoff and jitter. Once no usable token is left, ``token()`` raises
  :class:`TokenUnavailable` quoting the endpoint's last answer, without calling the endpoint
  again until the backoff has passed (so a dead endpoint is not hammered by every request).
* Whatever the endpoint answers, a definition makes at most ``budget_requests`` token requests
  in ``budget_window`` seconds (12 a minute), and the next automatic fetch never starts sooner
  than ``min_interval`` (5 s) after the previous one: a token that lives shorter than the
  refresh margin is used as it is until it expires, and requests in the gap wait for the next
  fetch within their own timeout. A lifetime over a year counts as a year.

The wire format (form parameters, client authentication, response checks) is in
:mod:`sidecar.credentials.token_endpoint`; SMART discovery in :mod:`sidecar.credentials.discovery`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import math
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sidecar.config.models import CERTIFICATE_CLIENT_AUTH, OAuthDefinition
from sidecar.credentials.client_auth import OAuthSetupError, PrivateKeyJwt, load_signing_key
from sidecar.credentials.discovery import (
    check_client_support,
    fetch_smart_configuration,
    smart_configuration_url,
)
from sidecar.credentials.endpoint_errors import EndpointFailure
from sidecar.credentials.token_endpoint import (
    RESERVED_PARAMS,
    IssuedToken,
    TokenEndpoint,
    TokenRequest,
)
from sidecar.egress.proxies import EgressProxy
from sidecar.report.observe import TokenFailureResult
from sidecar.report.redaction import Redactor
from sidecar.tls.policy import UpstreamTlsPolicy
from sidecar.tracing import background as background_span

log = logging.getLogger(__name__)

class TokenUnavailable(Exception):
    """No usable token: names the definition, the token URL and the endpoint's answer."""

    def __init__(self, definition: str, token_url: str, reason: str,
                 result: TokenFailureResult | Literal["closed", "budget"] = "network"):
        self.definition = definition
        self.token_url = token_url
        self.reason = reason
        self.result = result
        super().__init__(definition, token_url, reason)

    def __str__(self) -> str:
        return f"OAuth definition {self.definition!r}: no token from {self.token_url}: " \
               f"{self.reason}"


@dataclass(frozen=True)
class TokenStatus:
    valid_until: dt.datetime | None  # expiry of the cached token (UTC); None without one
    last_refresh: dt.datetime | None  # when a token was last obtained (UTC)
    last_error: str | None  # the last attempt's failure; None once an attempt succeeded
    scopes: tuple[str, ...]  # granted scopes of the cached token
    issued_at: dt.datetime | None = None  # when the cached token was asked for (UTC)
    usable: bool = False  # the cached token may be sent now (not within the expiry skew)


@dataclass(frozen=True)
class FetchedToken:
    """The outcome of :meth:`TokenSource.fetch_once` (for ``check --online``); no token value."""

    token_url: str
    scopes: tuple[str, ...]
    expires_in: float
    expires_in_defaulted: bool  # the endpoint sent no expires_in; the definition's default is used
    bound_to: str | None = None  # cnf.x5t#S256 of a certificate-bound JWT token (RFC 8705)


@dataclass(frozen=True)
class ProbeToken:
    """A token for a connection test (:meth:`TokenSource.token_for_test`)."""

    value: str = field(repr=False)
    reused: bool  # the cached token, no request to the token endpoint
    expires_in: float  # seconds left
    scopes: tuple[str, ...]
    token_url: str


class TokenObserver(Protocol):
    """Metrics hooks (docs/metrics.md)."""

    def token_requested(self, definition: str, result: str) -> None: ...

    def token_expiry(self, definition: str, expires_at: float) -> None: ...

    def token_request_took(self, definition: str, seconds: float) -> None: ...


YEAR = 365 * 86400.0
BUDGET_SPENT = "token budget spent"


class BudgetSpent(Exception):
    """No token request may be sent now: the budget is spent (the words say until when)."""


@dataclass(frozen=True)
class RefreshPolicy:
    """When to refresh and how to back off. The defaults suit real token lifetimes (minutes to
    hours); tests pass tighter values to observe several cycles within seconds."""

    # Refresh when min(lifetime * margin_fraction, margin_max) + skew is left, minus jitter.
    margin_fraction: float = 0.25
    margin_max: float = 60.0
    jitter_fraction: float = 0.1
    jitter_max: float = 30.0
    # Stop handing out a token this close to its expiry: it must survive the trip upstream, and
    # servers round `exp` down to whole seconds.
    skew_fraction: float = 0.1
    skew_min: float = 1.0
    skew_max: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    request_timeout: float = 10.0
    # Whatever the endpoint answers: at most this many token requests in the window, and the
    # next automatic fetch no sooner than min_interval after the previous one started.
    budget_requests: int = 12
    budget_window: float = 60.0
    min_interval: float = 5.0
    max_lifetime: float = YEAR

    def margin(self, lifetime: float) -> float:
        """How long before its expiry a token of ``lifetime`` is refreshed (without jitter)."""
        return min(lifetime * self.margin_fraction, self.margin_max) + self.skew(lifetime)

    def skew(self, lifetime: float) -> float:
        return min(self.skew_max, max(self.skew_min, lifetime * self.skew_fraction))

    def refresh_delay(self, lifetime: float) -> float:
        margin = self.margin(lifetime)
        jitter = random.uniform(0, min(lifetime * self.jitter_fraction, self.jitter_max))
        return max(0.0, lifetime - margin - jitter)

    def backoff(self, failures: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
        return random.uniform(ceiling / 2, ceiling)  # jitter, but never a near-zero retry


@dataclass(frozen=True)
class _CachedToken:
    value: str = field(repr=False)
    usable_until: float  # monotonic
    refresh_at: float  # monotonic
    expires_wall: float  # epoch seconds
    scopes: tuple[str, ...]
    issued_wall: float = 0.0  # epoch seconds: when the token request was sent


# Keys the settings fingerprint so equal settings compare equal without the fingerprint being a
# reusable digest of a secret outside this process.
_FINGERPRINT_KEY = secrets.token_bytes(32)


def _fingerprint(*parts: bytes | str | None) -> str:
    mac = hmac.new(_FINGERPRINT_KEY, digestmod=hashlib.sha256)
    for part in parts:
        data = b"\x00" if part is None else b"\x01" + (
            part.encode("utf-8") if isinstance(part, str) else part)
        mac.update(len(data).to_bytes(8, "big") + data)
    return mac.hexdigest()


def _proxy_fingerprint(via: EgressProxy | None) -> str | None:
    if via is None:
        return None
    tls = via.tls
    return _fingerprint(via.name, via.url, via.username, via.password,
                        *((tls.verify, tls.ca_pem, tls.client_cert_pem, tls.client_key_pem,
                           tls.server_name) if tls is not None else ()))


@dataclass(frozen=True)
class TokenSourceSpec:
    """Everything a token source's tokens depend on, as plain hashable values: a reload
    compares these and builds a :class:`TokenSource` only for a spec that is new, so an
    unchanged definition keeps its source and its cached token. Secrets appear only as keyed
    fingerprints."""

    name: str
    definition: str  # the definition as JSON, without an inline client_secret
    client_secret: str
    private_key: str
    tls: str
    via: str | None

    @classmethod
    def of(cls, name: str, definition: OAuthDefinition, *, client_secret: str | None,
           private_key_pem: bytes | None, tls: UpstreamTlsPolicy,
           via: EgressProxy | None = None) -> TokenSourceSpec:
        return cls(
            name=name,
            definition=definition.model_dump_json(exclude={"client_secret"}),
            client_secret=_fingerprint(client_secret),
            private_key=_fingerprint(private_key_pem),
            tls=_fingerprint(tls.verify, tls.ca_pem, tls.client_cert_pem, tls.client_key_pem,
                             tls.server_name),
            via=_proxy_fingerprint(via),
        )


class TokenSource:
    """The token lifecycle of one OAuth definition. Use from one event loop."""

    def __init__(self, name: str, definition: OAuthDefinition, *, client_secret: str | None,
                 private_key_pem: bytes | None, tls: UpstreamTlsPolicy,
                 observer: TokenObserver | None = None,
                 policy: RefreshPolicy | None = None,
                 redactor: Redactor | None = None,
                 via: EgressProxy | None = None):
        self.name = name
        self._via = via
        self.definition = definition
        self._secret = client_secret
        # The snapshot's redactor knows this definition's secret with all the others.
        self._redactor = redactor if redactor is not None else \
            Redactor(pairs=[(definition.client_id, client_secret)])
        self._key_pem = private_key_pem
        self._observer = observer
        self._policy = policy or RefreshPolicy()
        self._tls = tls
        self._check_setup()
        self._request = TokenRequest(
            scopes=tuple(definition.scopes), audience=definition.audience,
            resource=definition.resource,
            extra_params=tuple(sorted(definition.extra_params.items())),
        )
        self.settings_key = TokenSourceSpec.of(name, definition, client_secret=client_secret,
                                               private_key_pem=private_key_pem, tls=tls,
                                               via=via)
        self._endpoint: TokenEndpoint | None = None

        self._current: _CachedToken | None = None
        self._inflight: asyncio.Task[_CachedToken] | None = None
        self._failures = 0
        self._retry_at = 0.0  # monotonic; no on-demand attempt before it after a failure
        self._last_failure: TokenUnavailable | None = None
        self._last_refresh: dt.datetime | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._closed = False
        # When each token request of the budget window started (monotonic), oldest first.
        self._requests_sent: deque[float] = deque()

    # --- public interface ---------------------------------------------------------------

    @property
    def token_url(self) -> str:
        """The token endpoint, once known; before discovery, the SMART document's URL."""
        if self._endpoint is not None:
            return self._endpoint.token_url
        if self.definition.token_url is not None:
            return self.definition.token_url
        assert self.definition.discover_from is not None
        return smart_configuration_url(self.definition.discover_from)

    def cached_token(self) -> str | None:
        """The cached token while it is usable, without waiting; None when one must be fetched.

        The request path asks this first, so a request that finds a token never suspends.
        """
        now = time.monotonic()
        current = self._current
        if current is None or now >= current.usable_until:
            return None
        if now >= current.refresh_at:
            # Normally the refresher has done this already; this keeps a source that was
            # never start()ed (or whose refresher is between wake-ups) refreshing too.
            self._refresh_in_background(now)
        return current.value

    async def token(self, wait_limit: float | None = None) -> str:
        """A usable access token, from the cache when possible; raises TokenUnavailable.

        Without one, the caller waits for the next fetch, which starts at once unless the
        previous one started less than ``min_interval`` ago or the budget is spent; with
        ``wait_limit`` (the request's own timeout), it waits no longer than that, and is told at
        once when the next fetch is further away.
        """
        cached = self.cached_token()
        if cached is not None:
            return cached
        now = time.monotonic()
        if self._closed:
            raise TokenUnavailable(self.name, self.token_url, "the token source is closed",
                                   "closed")
        task = self._inflight
        if task is None:
            failure = self._last_failure
            if failure is not None and now < self._retry_at:
                raise self._copy(failure)
            due = self._next_fetch_at(now)
            if wait_limit is not None and due - now > wait_limit:
                raise self._not_before(due, now)
            task = self._start_fetch(due)
        try:
            if wait_limit is None:
                return (await asyncio.shield(task)).value
            return (await asyncio.wait_for(asyncio.shield(task), wait_limit)).value
        except TokenUnavailable as exc:
            raise self._copy(exc) from None
        except TimeoutError:
            raise TokenUnavailable(self.name, self.token_url,
                                   f"no token within {wait_limit:g} s (the connection's "
                                   "timeout_seconds)") from None

    def budget_spent(self) -> bool:
        """Whether the budget of token requests is spent for now (no request may be sent)."""
        return self._budget_free_at(time.monotonic()) > time.monotonic()

    def _budget_free_at(self, now: float) -> float:
        """When the budget next allows a token request (``now`` or earlier: it does now)."""
        sent = self._requests_sent
        window = self._policy.budget_window
        while sent and sent[0] <= now - window:
            sent.popleft()
        if len(sent) < self._policy.budget_requests:
            return now
        return sent[len(sent) - self._policy.budget_requests] + window

    def _next_fetch_at(self, now: float) -> float:
        """When the next automatic fetch may start: never sooner than ``min_interval`` after
        the previous one started, and only within the budget."""
        due = self._budget_free_at(now)
        if self._requests_sent:
            due = max(due, self._requests_sent[-1] + self._policy.min_interval)
        return max(now, due)

    def _not_before(self, due: float, now: float) -> TokenUnavailable:
        wait = math.ceil(due - now)
        if self._budget_free_at(now) > now:
            reason = f"{BUDGET_SPENT}; next fetch in {wait} s"
        else:
            reason = (f"the last token request was less than "
                      f"{self._policy.min_interval:g} s ago; next fetch in {wait} s")
        return TokenUnavailable(self.name, self.token_url, reason)

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the upstream rejected it), unless a newer one has replaced it."""
        current = self._current
        if current is not None and hmac.compare_digest(current.value.encode(), token.encode()):
            self._current = None
            self._wake()

    def start(self) -> None:
        """Fetch a first token now (readiness) and keep it fresh in the background."""
        if self._refresher is None and not self._closed:
            self._wakeup = asyncio.Event()
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name=f"oauth-refresh-{self.name}")

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in (self._refresher, self._inflight) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, TokenUnavailable):
                await task
        self._refresher = self._inflight = None
        self._current = None
        if self._endpoint is not None:
            await self._endpoint.aclose()
            self._endpoint = None

    def status(self) -> TokenStatus:
        current = self._current
        return TokenStatus(
            valid_until=_utc(current.expires_wall) if current is not None else None,
            last_refresh=self._last_refresh,
            last_error=str(self._last_failure.reason) if self._last_failure else None,
            scopes=current.scopes if current is not None else (),
            issued_at=_utc(current.issued_wall) if current is not None else None,
            usable=current is not None and time.monotonic() < current.usable_until,
        )

    async def fetch_once(self) -> FetchedToken:
        """One fresh token request, bypassing and not touching the cache (``check --online``)."""
        try:
            endpoint = await self._get_endpoint()
            issued = await self._send_request(endpoint)
        except EndpointFailure as exc:
            raise self._unavailable(exc) from None
        except BudgetSpent as exc:
            raise TokenUnavailable(self.name, self.token_url, str(exc), "budget") from None
        lifetime, defaulted = self._lifetime(issued)
        return FetchedToken(token_url=endpoint.token_url, scopes=self._granted(issued),
                            expires_in=lifetime, expires_in_defaulted=defaulted,
                            bound_to=issued.bound_thumbprint)

    async def token_for_test(self, fresh: bool, wait_limit: float | None = None) -> ProbeToken:
        """A token for a connection test (docs/admin-api.md#testing-a-connection).

        Without ``fresh``: the path a request takes, the cached token while it is usable, else
        a fetch whose token is cached for the requests too. With ``fresh``: one new token
        request that leaves the cache and the backoff alone, as ``fetch_once`` does. Either
        way within the budget of token requests. Raises :class:`TokenUnavailable`.
        """
        if fresh:
            try:
                endpoint = await self._get_endpoint()
                issued = await self._send_request(endpoint)
            except EndpointFailure as exc:
                raise self._unavailable(exc) from None
            except BudgetSpent as exc:
                raise TokenUnavailable(self.name, self.token_url, str(exc), "budget") from None
            lifetime, _ = self._lifetime(issued)
            return ProbeToken(issued.access_token, False, lifetime, self._granted(issued),
                             endpoint.token_url)
        cached = self.cached_token()
        value = cached if cached is not None else await self.token(wait_limit)
        current = self._current
        left = current.expires_wall - time.time() if current is not None else 0.0
        return ProbeToken(value, cached is not None, max(0.0, left),
                         current.scopes if current is not None else (), self.token_url)

    @property
    def tls(self) -> UpstreamTlsPolicy:
        """The TLS policy of the token endpoint (the definition's ``tls``)."""
        return self._tls

    @property
    def via(self) -> EgressProxy | None:
        """The egress proxy token requests tunnel through, if any."""
        return self._via

    @property
    def client_cert_pem(self) -> bytes | None:
        """The client certificate presented to the token endpoint (``tls.client_cert``)."""
        return self._tls.client_cert_pem

    def use_redactor(self, redactor: Redactor) -> None:
        """Scrub with the new snapshot's ``redactor`` (a reload kept this source; its secret
        is unchanged, so the new redactor knows it)."""
        self._redactor = redactor

    def scrub(self, text: str) -> str:
        return self._redactor.scrub(text)

    def __repr__(self) -> str:
        return f"TokenSource({self.name!r}, client_auth={self.definition.client_auth!r})"

    def _unavailable(self, failure: EndpointFailure) -> TokenUnavailable:
        # Every endpoint text passes here on its way to logs, status pages and 503 bodies.
        return TokenUnavailable(self.name, self.scrub(self.token_url), self.scrub(failure.reason),
                                failure.result)

    # --- fetching -----------------------------------------------------------------------

    def _start_fetch(self, due: float | None = None) -> asyncio.Task[_CachedToken]:
        """The one fetch everybody waits on; it sends its request at ``due`` (monotonic)."""
        task = asyncio.get_running_loop().create_task(self._fetch(due),
                                                      name=f"oauth-token-{self.name}")
        # Failures are recorded by _fetch itself; nobody may be awaiting a background refresh.
        task.add_done_callback(_consume_exception)
        if not task.done():  # an eager task factory may already have run it to completion
            self._inflight = task
        return task

    def _refresh_in_background(self, now: float) -> None:
        if self._inflight is None and not self._closed and (
                self._last_failure is None or now >= self._retry_at):
            self._start_fetch(self._next_fetch_at(now))

    async def _fetch(self, due: float | None = None) -> _CachedToken:
        if due is not None and due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        started_mono, started_wall = time.monotonic(), time.time()
        try:
            try:
                endpoint = await self._get_endpoint()
            except Exception as exc:  # discovery failed: counted as this attempt's result
                self._notify_requested(exc.result if isinstance(exc, EndpointFailure)
                                       else "invalid_response")
                raise
            issued = await self._send_request(endpoint)  # counts its own result
        except EndpointFailure as exc:
            failure = self._unavailable(exc)
            self._record_failure(failure)
            raise failure from None
        except BudgetSpent as exc:
            # Fresh tests spent the budget meanwhile: no request was sent.
            raise TokenUnavailable(self.name, self.token_url, str(exc), "budget") from None
        except Exception as exc:
            # A bug, or a library failing in a way not foreseen above: still a clean 503 for
            # the requests, and the traceback in the log (it carries no request data).
            log.exception("OAuth definition %r: unexpected error while fetching a token",
                          self.name)
            failure = TokenUnavailable(self.name, self.token_url,
                                       f"internal error ({type(exc).__name__})",
                                       "invalid_response")
            self._record_failure(failure)
            raise failure from None
        else:
            cached = self._cache(issued, started_mono, started_wall)
            self._record_success(cached)
            return cached
        finally:
            self._inflight = None
            self._wake()

    async def _send_request(self, endpoint: TokenEndpoint) -> IssuedToken:
        """One token request, within the budget, timed for the metrics; every request to the
        token endpoint goes through here."""
        now = time.monotonic()
        free_at = self._budget_free_at(now)
        if free_at > now:
            raise BudgetSpent(f"{BUDGET_SPENT}; next fetch in {math.ceil(free_at - now)} s")
        self._requests_sent.append(now)
        try:
            issued = await endpoint.request_token()
        except EndpointFailure as exc:
            self._notify_requested(exc.result)
            raise
        except Exception:
            self._notify_requested("invalid_response")
            raise
        else:
            self._notify_requested("success")
            return issued
        finally:
            if self._observer is not None:
                try:
                    self._observer.token_request_took(self.name, time.monotonic() - now)
                except Exception:  # metrics must never break token handling
                    log.exception("token observer failed")

    async def _get_endpoint(self) -> TokenEndpoint:
        if self._endpoint is None:
            token_url = self.definition.token_url
            if token_url is None:
                token_url = await self._discover()
            self._endpoint = self._make_endpoint(token_url)
        return self._endpoint

    async def _discover(self) -> str:
        d = self.definition
        assert d.discover_from is not None
        config = await fetch_smart_configuration(
            d.discover_from, tls=self._tls,
            timeout=self._policy.request_timeout, redactor=self._redactor, via=self._via)
        signing_alg = d.signing_alg if d.client_auth == "private_key_jwt" else None
        check_client_support(config, d.client_auth, signing_alg)
        return config.token_endpoint_for(d.client_auth)

    def _make_endpoint(self, token_url: str) -> TokenEndpoint:
        d = self.definition
        signer = None
        if d.client_auth == "private_key_jwt":
            assert self._key_pem is not None
            signer = PrivateKeyJwt(self._key_pem, alg=d.signing_alg, key_id=d.key_id,
                                   token_url=token_url)
        return TokenEndpoint(
            token_url, client_id=d.client_id, client_auth=d.client_auth,
            client_secret=self._secret, assertion_signer=signer, request=self._request,
            tls=self._tls, timeout=self._policy.request_timeout,
            redactor=self._redactor, via=self._via,
        )

    def _lifetime(self, issued: IssuedToken) -> tuple[float, bool]:
        if issued.expires_in is None:
            return float(self.definition.default_expires_in), True
        longest = self._policy.max_lifetime
        if issued.expires_in > longest:
            log.warning("OAuth definition %r: the token endpoint says the token lives %.3g s; "
                        "it is counted as %g s (a year)", self.name, issued.expires_in, longest,
                        extra={"event": "oauth_token_lifetime_capped"})
            return longest, False
        return issued.expires_in, False

    def _granted(self, issued: IssuedToken) -> tuple[str, ...]:
        # RFC 6749 §5.1: without a scope in the answer, the requested scope was granted.
        return issued.scope if issued.scope is not None else self._request.scopes

    def _cache(self, issued: IssuedToken, started_mono: float, started_wall: float
               ) -> _CachedToken:
        # Counting from when the request was sent errs on the early side of the real expiry.
        lifetime, _ = self._lifetime(issued)
        policy = self._policy
        if lifetime <= policy.margin(lifetime):
            # Shorter than the refresh margin: used as it is until it (nearly) expires, then
            # replaced; _next_fetch_at keeps the next request min_interval after this one.
            usable_until = started_mono + lifetime * (1 - policy.skew_fraction)
            refresh_at = usable_until
        else:
            usable_until = started_mono + lifetime - policy.skew(lifetime)
            refresh_at = started_mono + policy.refresh_delay(lifetime)
        return _CachedToken(
            value=issued.access_token,
            usable_until=usable_until,
            refresh_at=refresh_at,
            expires_wall=started_wall + lifetime,
            scopes=self._granted(issued),
            issued_wall=started_wall,
        )

    def _record_success(self, cached: _CachedToken) -> None:
        recovered = self._last_failure is not None
        self._current = cached
        self._failures = 0
        self._last_failure = None
        self._last_refresh = dt.datetime.now(dt.UTC)
        if self._observer is not None:
            self._observer.token_expiry(self.name, cached.expires_wall)
        if recovered:
            log.info("OAuth definition %r: token endpoint %s answers again", self.name,
                     self.token_url, extra={"event": "oauth_token_recovered"})

    def _record_failure(self, failure: TokenUnavailable) -> None:
        self._failures += 1
        now = time.monotonic()
        delay = self._policy.backoff(self._failures)
        self._retry_at = max(now + delay, self._next_fetch_at(now))
        delay = self._retry_at - now
        self._last_failure = failure
        still_usable = self._current is not None and time.monotonic() < \
            self._current.usable_until
        log.warning("%s (attempt %d; retrying in %.1f s; %s)", failure, self._failures, delay,
                    "the current token is still used" if still_usable else "no usable token",
                    extra={"event": "oauth_token_failed", "error": failure.reason})

    def _notify_requested(self, result: str) -> None:
        if self._observer is not None:
            try:
                self._observer.token_requested(self.name, result)
            except Exception:  # metrics must never break token handling
                log.exception("token observer failed")

    def _copy(self, failure: TokenUnavailable) -> TokenUnavailable:
        # A fresh exception per caller: re-raising one instance from many tasks would keep
        # growing its traceback.
        return TokenUnavailable(failure.definition, failure.token_url, failure.reason,
                                failure.result)

    # --- background refresh ----------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        assert self._wakeup is not None
        while not self._closed:
            self._wakeup.clear()
            delay = self._seconds_until_due()
            if delay is None or delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                continue
            traced = None
            if self._inflight is None:  # a refresh no request asked for: a trace of its own
                traced = background_span.start(f"token {self.name}",
                                                **{"fhir_sidecar.oauth.definition": self.name,
                                                   "fhir_sidecar.token.background": "true"})
            task = self._inflight or self._start_fetch(self._next_fetch_at(time.monotonic()))
            try:
                await asyncio.shield(task)
            except TokenUnavailable as exc:
                background_span.end(traced, exc.result)
            else:
                background_span.end(traced)

    def _seconds_until_due(self) -> float | None:
        """Seconds until the next attempt; None while one is in flight (it wakes us)."""
        if self._inflight is not None:
            return None
        now = time.monotonic()
        if self._last_failure is not None:
            return self._retry_at - now
        due = self._next_fetch_at(now)
        if self._current is not None:
            due = max(due, self._current.refresh_at)
        return due - now

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # --- construction checks ---------------------------------------------------------------

    def _check_setup(self) -> None:
        d = self.definition
        if d.client_auth == "private_key_jwt":
            if self._key_pem is None:
                raise OAuthSetupError(f"OAuth definition {self.name!r}: private_key_jwt needs "
                                      "a private key", "private_key_file")
            try:
                load_signing_key(self._key_pem, d.signing_alg)
            except OAuthSetupError as exc:
                raise OAuthSetupError(f"OAuth definition {self.name!r}: {exc}",
                                      "private_key_file") from None
        elif d.client_auth in CERTIFICATE_CLIENT_AUTH:
            if self._tls.client_cert_pem is None:
                raise OAuthSetupError(f"OAuth definition {self.name!r}: {d.client_auth} needs "
                                      "tls.client_cert", "tls.client_cert")
        elif not self._secret:
            raise OAuthSetupError(f"OAuth definition {self.name!r}: {d.client_auth} needs a "
                                  "client secret")
        clashes = sorted(RESERVED_PARAMS & d.extra_params.keys())
        if clashes:
            raise OAuthSetupError(f"OAuth definition {self.name!r}: extra_params must not set "
                                  f"{', '.join(clashes)} (the sidecar sets it)", "extra_params")


def _consume_exception(task: asyncio.Task[_CachedToken]) -> None:
    if not task.cancelled():
        task.exception()


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)
