"""HTTP Basic credentials: the header is built once per definition version."""

from __future__ import annotations

import base64


class BasicCredentials:
    kind = "basic"

    def __init__(self, definition: str, username: str, password: str):
        self.definition = definition
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._header = f"Basic {token}"
        # Lets a reload keep the same object (and compare versions) without holding the secret
        # in a second readable form.
        self.settings_key = hash((definition, self._header))

    def header(self) -> str:
        return self._header

    def __repr__(self) -> str:  # never show the header
        return f"BasicCredentials({self.definition!r})"
