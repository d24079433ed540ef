"""Runs the real authorization server of the tests (``tests/oauth_server``, npm oidc-provider).

Every key and certificate is made here, in Python, and handed to the node process in a JSON file:
a trustme CA and server certificate for its HTTPS listener, its own token-signing key, and the
clients' secrets and public keys. The process prints one JSON ``ready`` line once it listens;
it is stopped by its PID.

Install its dependencies once with ``npm ci --prefix tests/oauth_server``.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc.jwk import ECKey, RSAKey

from sidecar.config.models import OAuthDefinition, TlsSettings

SERVER_DIR = Path(__file__).resolve().parents[1] / "oauth_server"
NPM_INSTALL = "npm ci --prefix tests/oauth_server"
SCOPES = ("system/Patient.rs", "system/Observation.rs")
# The access tokens' audience when a client names no resource (the FHIR server's base URL).
DEFAULT_RESOURCE = "https://fhir.test.invalid/fhir"
OTHER_RESOURCE = "https://other-fhir.test.invalid/r4"
START_DEADLINE_SECONDS = 30.0
# A client whose id and secret need RFC 6749 §2.3.1 form-urlencoding to survive Basic auth.
RESERVED_CLIENT_ID = "svc:fhir+test%2Fid"
RESERVED_SECRET = "p:a+s%20s w/rd&=?"


@dataclass(frozen=True)
class TestClient:
    """One client registered at the provider, and what the sidecar needs to act as it."""

    client_id: str
    client_auth: str
    secret: str | None = field(default=None, repr=False)
    private_key_pem: bytes | None = field(default=None, repr=False)
    key_id: str | None = None
    signing_alg: str | None = None


class ProviderNotReady(RuntimeError):
    pass


class OAuthTestProvider:
    """A running oidc-provider; build it with :meth:`start`."""

    def __init__(self, process: subprocess.Popen[str], ready: dict[str, Any], *,
                 ca_bundle: Path, clients: dict[str, TestClient], log_file: Path,
                 stdout_tail: collections.deque[str]):
        self.process = process
        self.issuer: str = ready["issuer"]
        self.port: int = ready["port"]
        self.control_url = f"http://127.0.0.1:{ready['control_port']}"
        self.token_url = f"{self.issuer}/token"
        self.jwks_url = f"{self.issuer}/jwks"
        # The SMART configuration is served as if this were a FHIR server's base URL.
        self.fhir_base = f"{self.issuer}/fhir"
        self.ca_bundle = ca_bundle
        self.clients = clients
        self.default_resource = DEFAULT_RESOURCE
        self.other_resource = OTHER_RESOURCE
        self.scopes = SCOPES
        self.log_file = log_file
        self._stdout_tail = stdout_tail
        # trust_env=False: the control port is loopback; no proxy may get in between.
        self._control = httpx.Client(base_url=self.control_url, trust_env=False, timeout=10)

    # --- starting and stopping ---------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path, *, ttl_seconds: int = 300,
              extra_clients: Sequence[dict[str, Any]] = (),
              mtls_client_ca: Path | None = None) -> OAuthTestProvider:
        """Start the server; ``extra_clients`` are registered as given, besides the usual ones
        (for a client whose ``jwks_uri`` is known only when a test starts). With
        ``mtls_client_ca`` its HTTPS listener asks for client certificates (verified against
        that CA) and RFC 8705 client authentication and bound tokens are on."""
        node = shutil.which("node")
        if node is None:
            raise ProviderNotReady("node is not on PATH; the OAuth tests need Node.js 20")
        if not (SERVER_DIR / "node_modules" / "oidc-provider").is_dir():
            raise ProviderNotReady(f"oidc-provider is not installed; run: {NPM_INSTALL}")
        workdir.mkdir(parents=True, exist_ok=True)
        ca_bundle, tls_files = _write_tls_identity(workdir)
        clients, client_metadata = _make_clients()
        config = {
            "port": 0,
            "tls": tls_files,
            "ttl_seconds": ttl_seconds,
            "scopes": list(SCOPES),
            "default_resource": DEFAULT_RESOURCE,
            "resources": [DEFAULT_RESOURCE, OTHER_RESOURCE],
            "signing_jwk": _private_jwk(_rsa_key(), kid="provider-signing-1", alg="RS256"),
            "clients": [*client_metadata, *extra_clients],
        }
        if mtls_client_ca is not None:
            config["mtls"] = {"client_ca": str(mtls_client_ca)}
        config_file = workdir / "oauth-provider.json"
        config_file.touch(mode=0o600)
        config_file.write_text(json.dumps(config))
        log_file = workdir / "oauth-provider.log"
        env = {**os.environ, "OAUTH_TEST_CONFIG": str(config_file), "NODE_ENV": "test"}
        with log_file.open("w") as stderr:
            process = subprocess.Popen(
                [node, str(SERVER_DIR / "server.mjs")], cwd=SERVER_DIR, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        tail: collections.deque[str] = collections.deque(maxlen=50)
        try:
            ready = _wait_for_ready(process, tail, log_file)
        except BaseException:
            _stop(process)
            raise
        return cls(process, ready, ca_bundle=ca_bundle, clients=clients, log_file=log_file,
                   stdout_tail=tail)

    def stop(self) -> None:
        self._control.close()
        _stop(self.process)

    # --- test controls ------------------------------------------------------------------

    def reset(self) -> None:
        """Counters to zero, no failure, default settings; the HTTPS listener listens again."""
        self._post("/_test/reset", {})

    def fail(self, mode: str, **options: Any) -> None:
        """Failure injection at the token endpoint.

        ``status`` (answer ``status``, default 503, with an OAuth error JSON or ``body``),
        ``delay`` (wait ``delay_ms`` before answering), ``refuse`` (stop listening and cut
        open connections), ``none`` (back to normal).
        """
        self._post("/_test/fail", {"mode": mode, **options})

    def settings(self, *, ttl: int | None = None, strip_expires_in: bool | None = None,
                 smart_overrides: dict[str, Any] | None = None) -> None:
        changes: dict[str, Any] = {}
        if ttl is not None:
            changes["ttl"] = ttl
        if strip_expires_in is not None:
            changes["strip_expires_in"] = strip_expires_in
        if smart_overrides is not None:
            changes["smart_overrides"] = smart_overrides
        self._post("/_test/settings", changes)

    def stats(self) -> dict[str, Any]:
        """``token_requests`` (every request reaching /token), ``issued``, ``failed``."""
        response = self._control.get("/_test/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def recent_requests(self) -> list[dict[str, Any]]:
        """The last token requests as the server parsed them: client_id, params, headers."""
        response = self._control.get("/_test/recent")
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def _post(self, path: str, body: dict[str, Any]) -> None:
        self._control.post(path, json=body).raise_for_status()

    # --- what a client needs ----------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def jwks(self) -> dict[str, Any]:
        """The provider's public signing keys, read from its JWKS endpoint over HTTPS."""
        with httpx.Client(verify=self.ssl_context(), trust_env=False, timeout=10) as client:
            response = client.get(self.jwks_url)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def tls_settings(self) -> TlsSettings:
        return TlsSettings(verify="custom", ca_bundle=self.ca_bundle)

    def definition(self, client: str, **overrides: Any) -> OAuthDefinition:
        """An OAuth definition for the named test client (see :func:`_make_clients`)."""
        c = self.clients[client]
        fields: dict[str, Any] = {
            "token_url": self.token_url,
            "client_id": c.client_id,
            "client_auth": c.client_auth,
            "scopes": list(SCOPES),
            "tls": self.tls_settings(),
        }
        if c.client_auth == "private_key_jwt":
            fields |= {"private_key_file": Path("/unused/the-key-is-passed-in-memory.pem"),
                       "key_id": c.key_id, "signing_alg": c.signing_alg}
        else:
            fields["client_secret_env"] = "UNUSED_THE_SECRET_IS_PASSED_IN_MEMORY"
        fields |= overrides
        if "discover_from" in overrides:
            fields.pop("token_url", None)
        return OAuthDefinition(**fields)

    def diagnostics(self) -> str:
        log = self.log_file.read_text(errors="replace")[-4000:] if self.log_file.exists() else ""
        return f"stdout: {list(self._stdout_tail)}\nstderr: {log}"


def _wait_for_ready(process: subprocess.Popen[str], tail: collections.deque[str],
                    log_file: Path) -> dict[str, Any]:
    assert process.stdout is not None
    ready: dict[str, Any] = {}
    got_ready = threading.Event()

    def read_stdout() -> None:
        # Keeps draining after "ready" so the process can never block on a full pipe.
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            if not got_ready.is_set():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("event") == "ready":
                    ready.update(message)
                    got_ready.set()
        got_ready.set()  # EOF: the process is gone; the caller sees an empty `ready`

    threading.Thread(target=read_stdout, name="oauth-provider-stdout", daemon=True).start()
    if not got_ready.wait(START_DEADLINE_SECONDS) or not ready:
        stderr = log_file.read_text(errors="replace")[-4000:] if log_file.exists() else ""
        raise ProviderNotReady(
            f"the OAuth test provider did not report ready within {START_DEADLINE_SECONDS:g} s "
            f"(exit code {process.poll()}); stdout: {list(tail)}; stderr: {stderr}")
    return ready


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


# --- keys and certificates ----------------------------------------------------------------

def _write_tls_identity(workdir: Path) -> tuple[Path, dict[str, str]]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_bundle = workdir / "oauth-ca.pem"
    ca.cert_pem.write_to_path(str(ca_bundle))
    chain = workdir / "oauth-server-chain.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = workdir / "oauth-server-key.pem"
    key.touch(mode=0o600)
    cert.private_key_pem.write_to_path(str(key))
    return ca_bundle, {"cert_chain": str(chain), "key": str(key)}


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _private_jwk(key: rsa.RSAPrivateKey, *, kid: str, alg: str) -> dict[str, Any]:
    jwk = dict(RSAKey.import_key(key).as_dict(private=True))
    return jwk | {"kid": kid, "alg": alg, "use": "sig"}


def _public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, *, kid: str,
                alg: str) -> dict[str, Any]:
    imported = RSAKey.import_key(key) if isinstance(key, rsa.RSAPrivateKey) \
        else ECKey.import_key(key)
    return dict(imported.as_dict(private=False)) | {"kid": kid, "alg": alg, "use": "sig"}


def _make_clients() -> tuple[dict[str, TestClient], list[dict[str, Any]]]:
    """One client per auth method, plus one whose id and secret need form-urlencoding."""
    clients: dict[str, TestClient] = {}
    metadata: list[dict[str, Any]] = []

    def register(role: str, client: TestClient, extra: dict[str, Any]) -> None:
        clients[role] = client
        metadata.append({
            "client_id": client.client_id,
            "token_endpoint_auth_method": client.client_auth,
            "grant_types": ["client_credentials"],
            "response_types": [],
            "redirect_uris": [],
            **extra,
        })

    for role, method in (("basic", "client_secret_basic"), ("post", "client_secret_post")):
        secret = os.urandom(24).hex()
        register(role, TestClient(f"sidecar-{role}", method, secret=secret),
                 {"client_secret": secret})
    register("reserved", TestClient(RESERVED_CLIENT_ID, "client_secret_basic",
                                    secret=RESERVED_SECRET),
             {"client_secret": RESERVED_SECRET})
    for role, alg, key in (("rs384", "RS384", _rsa_key()),
                           ("es384", "ES384", ec.generate_private_key(ec.SECP384R1()))):
        kid = f"{role}-key-1"
        register(role, TestClient(f"sidecar-{role}", "private_key_jwt",
                                  private_key_pem=_pem(key), key_id=kid, signing_alg=alg),
                 {"token_endpoint_auth_signing_alg": alg,
                  "jwks": {"keys": [_public_jwk(key, kid=kid, alg=alg)]}})
    return clients, metadata
