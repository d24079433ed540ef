"""Process settings from the environment (``FHIR_SIDECAR_*``), overridable by CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fhir-sidecar"


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FHIR_SIDECAR_", extra="ignore")

    config: Path | None = None
    # mitmproxy's CA store and other runtime state; a writable volume in containers.
    state_dir: Path = _default_state_dir()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    # Deprecated: the config file's shutdown.drain_seconds (sidecar.shutdown.shutdown_timings).
    drain_seconds: float | None = None
