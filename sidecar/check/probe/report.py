"""The steps of a test and their outcome: ok, failed, or skipped after an earlier failure."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from sidecar.report.redaction import Redactor

log = logging.getLogger(__name__)

StepName = Literal["connect", "tls", "credentials", "metadata"]
StepStatus = Literal["ok", "failed", "skipped"]

TITLES: dict[StepName, str] = {
    "connect": "DNS and connect",
    "tls": "TLS handshake",
    "credentials": "Credentials",
    "metadata": "GET [base]/metadata",
}


class StepFailed(Exception):
    """Ends the current step as failed with ``detail`` (plain words, scrubbed later)."""

    def __init__(self, detail: str, **facts: Any):
        super().__init__(detail)
        self.detail = detail
        self.facts = facts


@dataclass
class Step:
    name: StepName
    status: StepStatus = "skipped"
    ms: float | None = None
    detail: str = "not run: an earlier step failed"
    facts: dict[str, Any] = field(default_factory=dict)


class Report:
    """Collects the steps in order; once one fails, the rest are reported as skipped."""

    def __init__(self, kind: Literal["connection", "oauth"], name: str, url: str,
                 steps: tuple[StepName, ...]):
        self.kind = kind
        self.name = name
        self.url = url
        self.steps = [Step(step) for step in steps]
        self._started = time.time()

    @property
    def failed(self) -> bool:
        return any(step.status == "failed" for step in self.steps)

    def step(self, name: StepName) -> Step:
        return next(step for step in self.steps if step.name == name)

    @contextmanager
    def run(self, name: StepName) -> Iterator[Step]:
        """Time the block as step ``name``; :class:`StepFailed` inside it fails the step.

        The block sets ``detail`` (and ``facts``) of the step it is given. Callers check
        :attr:`failed` before running a step: a step not run keeps its "skipped" default.
        """
        step = self.step(name)
        started = time.perf_counter()
        step.status = "ok"
        try:
            yield step
        except StepFailed as exc:
            step.status = "failed"
            step.detail = exc.detail
            step.facts.update(exc.facts)
        except Exception:
            # A bug in the test must not look like a verdict on the upstream.
            log.exception("testing %s %r failed in step %s", self.kind, self.name, name,
                          extra={"event": "probe_failed"})
            step.status = "failed"
            step.detail = "the sidecar failed while running this step; its log has the details"
        finally:
            step.ms = round((time.perf_counter() - started) * 1000, 1)

    def not_applicable(self, name: StepName, detail: str) -> None:
        step = self.step(name)
        step.status, step.detail, step.ms = "skipped", detail, 0.0

    def as_dict(self, redactor: Redactor) -> dict[str, Any]:
        """The report as the API answers it, every text scrubbed by ``redactor``."""
        return _scrubbed({
            "kind": self.kind,
            "name": self.name,
            "url": self.url,
            "ok": not self.failed,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started)),
            "steps": [{"step": s.name, "title": TITLES[s.name], "status": s.status,
                       "ms": s.ms, "detail": s.detail, **_facts(s)} for s in self.steps],
        }, redactor)


_FACT_KEYS = ("certificate", "tls_version", "http_status", "fhir_version", "software",
              "token_reused", "token_expires_in_seconds")


def _facts(step: Step) -> dict[str, Any]:
    return {key: step.facts.get(key) for key in _FACT_KEYS}


def _scrubbed(value: Any, redactor: Redactor) -> Any:
    # Every text of the report, whoever wrote it: upstream answers, certificate names and
    # error messages may all carry what a hostile server echoed back.
    if isinstance(value, str):
        return redactor.scrub(value)
    if isinstance(value, dict):
        return {key: _scrubbed(item, redactor) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item, redactor) for item in value]
    return value
