"""Config file models, loading and error reporting."""

from sidecar.config.errors import ConfigError, ConfigProblem
from sidecar.config.loader import load_config, parse_config
from sidecar.config.models import (
    BasicAuthDefinition,
    ConnectionSettings,
    OAuthDefinition,
    SidecarConfig,
    TlsSettings,
)

__all__ = [
    "BasicAuthDefinition",
    "ConfigError",
    "ConfigProblem",
    "ConnectionSettings",
    "OAuthDefinition",
    "SidecarConfig",
    "TlsSettings",
    "load_config",
    "parse_config",
]
