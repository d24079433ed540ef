"""Process settings from the environment (``FHIR_SIDECAR_*``), overridable by CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FHIR_SIDECAR_"


class SettingsError(ValueError):
    """Environment variables that cannot be used; one line per variable, no traceback."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]


def _default_state_dir() -> Path | None:
    """``$XDG_STATE_HOME/fhir-sidecar``, else ``~/.local/state/fhir-sidecar``; ``None`` when
    there is no home directory (a user systemd makes up for a service has none, and no HOME):
    then ``--state-dir`` or ``FHIR_SIDECAR_STATE_DIR`` must say where (docs/systemd.md)."""
    base = os.environ.get("XDG_STATE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".local" / "state")
        except (RuntimeError, KeyError):  # no HOME and no passwd entry for this UID
            return None
    return Path(base) / "fhir-sidecar"


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    config: Path | None = None
    # mitmproxy's CA store and other runtime state; a writable volume in containers.
    state_dir: Path | None = Field(default_factory=_default_state_dir)
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
    # Deprecated: the config file's shutdown.drain_seconds
    # (sidecar.runtime.shutdown.shutdown_timings).
    drain_seconds: float | None = None


def load_settings() -> RuntimeSettings:
    """The settings from the environment; raise :class:`SettingsError` naming each bad variable
    and what it may be (its value is not repeated)."""
    try:
        return RuntimeSettings()
    except ValidationError as exc:
        raise SettingsError([_describe(err) for err in exc.errors(include_url=False)]) from None


def _describe(err: Any) -> str:
    field = str(err["loc"][0]) if err["loc"] else "?"
    variable = f"{ENV_PREFIX}{field.upper()}"
    expected = (err.get("ctx") or {}).get("expected")
    if err["type"] == "literal_error" and expected:
        return f"{variable}: must be one of {expected.replace(' or ', ', ')}"
    message = str(err["msg"]).removeprefix("Input should be ")
    return f"{variable}: must be {message}"
