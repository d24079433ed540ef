"""Reading secret values from files or environment variables.

A secret file's single trailing newline (``\\n`` or ``\\r\\n``) is stripped, nothing else:
editors and ``kubectl create secret --from-file`` commonly add one.
"""

from __future__ import annotations

import os
from pathlib import Path


class SecretError(ValueError):
    """A secret that cannot be read; the message never contains the secret."""


def read_secret_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SecretError(f"secret file {path} does not exist") from None
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"secret file {path} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise SecretError(f"secret file {path} is empty")
    return text


def read_secret_env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise SecretError(f"environment variable {name} is not set")
    if not value:
        raise SecretError(f"environment variable {name} is empty")
    return value


def read_secret(file: Path | None, env: str | None, inline: str | None) -> str:
    if file is not None:
        return read_secret_file(file)
    if env is not None:
        return read_secret_env(env)
    assert inline is not None
    return inline
