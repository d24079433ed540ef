"""Read a YAML config file into a validated :class:`SidecarConfig` (YAML 1.2, see yaml_io)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sidecar.config.errors import ConfigError, ConfigProblem
from sidecar.config.models import SidecarConfig
from sidecar.config.yaml_io import YAMLError, error_position, error_reason, load

EMPTY_CONFIG_MESSAGE = ("the config file is empty (or holds only comments); write {} for a "
                        "configuration without any settings")

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required field is missing",
}


def load_config(path: str | Path) -> SidecarConfig:
    """Load and validate ``path``; raise :class:`ConfigError` naming every problem."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem(file, "", "config file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(file, "", f"cannot read config file: {_reason(exc)}")]
                          ) from None
    return parse_config(text, file=file, base_dir=Path(os.path.abspath(path)).parent)


def parse_config(text: str, *, file: str, base_dir: Path) -> SidecarConfig:
    if not text.strip():
        raise ConfigError([ConfigProblem(file, "", EMPTY_CONFIG_MESSAGE)])
    try:
        data: Any = load(text)
    except YAMLError as exc:
        raise ConfigError([ConfigProblem(file, error_position(exc), error_reason(exc))]) from None
    if data is None:
        # An empty file is far more often a write caught halfway (or a truncated ConfigMap)
        # than a wish to drop every connection; "{}" says the latter explicitly.
        raise ConfigError([ConfigProblem(file, "", EMPTY_CONFIG_MESSAGE)])
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(file, "", "the top level must be a mapping of sections")])
    try:
        config = SidecarConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(validation_problems(file, exc)) from None
    problems = [ConfigProblem(file, p, m) for p, m in config.reference_problems()]
    if problems:
        raise ConfigError(problems)
    return config


def validation_problems(file: str, exc: ValidationError) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        # Validators on a whole model report at the model's own location; a bad name (a
        # mapping's key) at its section, which the message then names.
        loc = err["loc"]
        if loc[-1:] == ("[key]",):
            loc = loc[:-2]
        path = ".".join(str(part) for part in loc)
        message = _MESSAGES.get(err["type"], err["msg"])
        if message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        problems.append(ConfigProblem(file, path, message))
    return problems


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or type(exc).__name__
