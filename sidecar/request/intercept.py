"""Opt-in HTTPS interception (``proxy.intercept_https``): exporting the sidecar's CA certificate.

With interception on, mitmproxy terminates an app's TLS (``CONNECT`` to a configured upstream)
with a certificate issued by its own CA, kept in ``<state_dir>/mitmproxy``. Apps must trust
that CA, so its certificate (never its key) is copied to the path the config names.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MITM_CA_CERT = "mitmproxy-ca-cert.pem"


class CaExportError(Exception):
    pass


def ca_certificate(confdir: str | Path) -> Path:
    """Where mitmproxy keeps its CA certificate (PEM, certificate only)."""
    return Path(os.path.expanduser(str(confdir))) / MITM_CA_CERT


def export_ca_certificate(confdir: str | Path, destination: Path) -> bool:
    """Copy the CA certificate to ``destination`` (atomically, world-readable).

    Returns whether the file changed; raises :class:`CaExportError` in plain words.
    """
    source = ca_certificate(confdir)
    try:
        pem = source.read_bytes()
    except OSError as exc:
        raise CaExportError(f"cannot read the sidecar's CA certificate {source}: "
                            f"{exc.strerror or exc}") from None
    if b"PRIVATE KEY" in pem:  # never export a key, whatever the file holds
        raise CaExportError(f"{source} holds a private key; refusing to export it")
    try:
        if destination.read_bytes() == pem:
            return False
    except OSError:
        pass
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            os.chmod(tmp, 0o644)
            os.replace(tmp, destination)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CaExportError(f"cannot write the CA certificate to {destination}: "
                            f"{exc.strerror or exc}") from None
    return True
