"""The live configuration: the current snapshot, and the one path by which it is replaced.

File edits, SIGHUP and the admin API (the dashboard included) all call
:meth:`LiveConfig.reload`. A reload compiles a complete new snapshot first; only a valid one is
swapped in, in one assignment.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.config.errors import ConfigError
from sidecar.config.loader import load_config
from sidecar.report.logs import log_event
from sidecar.runtime.snapshot import Snapshot, compile_snapshot
from sidecar.runtime.watch import referenced_files

if TYPE_CHECKING:
    from sidecar.credentials.oauth import TokenObserver


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    at: float
    problems: tuple[str, ...] = ()
    config_sha256: str | None = None  # of the config file's bytes as this reload read them


def load_snapshot(path: str | Path, previous: Snapshot | None = None,
                  token_observer: TokenObserver | None = None) -> Snapshot:
    """Load, validate and compile ``path``; raise ConfigError naming every problem."""
    return compile_snapshot(load_config(path), path, previous, token_observer)


Validator = Callable[[Snapshot, Snapshot], None]


def _sha256_of(path: Path) -> str | None:
    """The audit trail's fingerprint of the config a reload read (docs/audit.md)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class LiveConfig:
    def __init__(self, path: str | Path, initial: Snapshot | None = None,
                 token_observer: TokenObserver | None = None):
        self.path = Path(path)
        # Metrics for every token source this config ever compiles, reloads included.
        self._token_observer = token_observer
        self._current = initial if initial is not None else load_snapshot(
            self.path, token_observer=token_observer)
        self.last_reload = ReloadOutcome(True, time.time())
        self.last_success_at = self.last_reload.at
        self._subscribers: list[Callable[[Snapshot, Snapshot], None]] = []
        self._validators: list[Validator] = []
        # Files named by the last config that parsed, valid or not: creating a missing secret
        # file must be noticed, so a rejected config's files are watched too.
        self._attempted_files: set[Path] = set()
        self._reload_observers: list[Callable[[ReloadOutcome], None]] = []
        for warning in self._current.warnings:
            log_event("config_warning", logging.WARNING, warning)

    @property
    def current(self) -> Snapshot:
        return self._current

    def on_swap(self, callback: Callable[[Snapshot, Snapshot], None]) -> None:
        """Call ``callback(old, new)`` after every successful swap."""
        self._subscribers.append(callback)

    def on_reload(self, callback: Callable[[ReloadOutcome], None]) -> None:
        self._reload_observers.append(callback)

    def add_validator(self, validator: Validator) -> None:
        """``validator(old, new)`` raises ConfigError to reject ``new`` before the swap."""
        self._validators.append(validator)

    def watched_files(self) -> set[Path]:
        return ({self.path} | referenced_files(self._current.config) | self._attempted_files)

    def reload(self) -> ReloadOutcome:
        old = self._current
        digest = _sha256_of(self.path)
        try:
            config = load_config(self.path)
            self._attempted_files = referenced_files(config)
            new = compile_snapshot(config, self.path, previous=old,
                                   token_observer=self._token_observer)
            for validator in self._validators:
                validator(old, new)
        except ConfigError as exc:
            outcome = ReloadOutcome(False, time.time(), tuple(str(p) for p in exc.problems),
                                    digest)
            for problem in outcome.problems:
                log_event("config_rejected", logging.ERROR, problem)
        else:
            self._current = new
            outcome = ReloadOutcome(True, time.time(), config_sha256=digest)
            self.last_success_at = outcome.at
            for warning in new.warnings:
                log_event("config_warning", logging.WARNING, warning)
            log_event("config_reloaded", generation=new.generation)
            for callback in self._subscribers:
                callback(old, new)
        self.last_reload = outcome
        for observer in self._reload_observers:
            observer(outcome)
        return outcome
