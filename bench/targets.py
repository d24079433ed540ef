"""The things the benchmark starts: the HTTPS upstream, the token endpoint and the five targets.

Every process is started here, remembered by PID and stopped by that PID only (other people
share this machine). Everything binds to 127.0.0.1 on ports the kernel picked free.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pages import Page
from pages import body as page_body

from sidecar.testkit.pki import DemoPKI
from sidecar.testkit.ports import free_port
from sidecar.testkit.token_server import TokenServer

VENV_BIN = Path(sys.executable).parent
BENCH_DIR = Path(__file__).resolve().parent
PATIENT_PATH = "/fhir/Patient/example"
BIG_PATH = "/fhir/Binary/big"
PAGES_PATH = "/fhir/pages/"
BIG_BYTES = 100 * 1024 * 1024
BASIC_USER, BASIC_PASSWORD = "bench-user", "bench-password"
BASIC_AUTHORIZATION = "Basic " + base64.b64encode(
    f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode()
BENCH_CLIENT_ID, BENCH_CLIENT_SECRET = "bench-client", "bench-secret"
BENCH_TOKEN_PREFIX = "bench-token-"  # the upstream accepts any bearer token with this prefix
READY_TIMEOUT = 20.0
BENCH_ISSUER = "https://kubernetes.default.svc.cluster.local"
BENCH_SUBJECT = "system:serviceaccount:bench:app"


def _workload_identity() -> tuple[str, str]:
    """A cluster key set (JSON) and a projected-ServiceAccount-style token it verifies."""
    from joserfc import jwt
    from joserfc.jwk import RSAKey

    key = RSAKey.generate_key(2048, parameters={"kid": "bench"})
    token = jwt.encode({"alg": "RS256", "kid": "bench"},
                       {"iss": BENCH_ISSUER, "aud": ["fhir-sidecar"], "sub": BENCH_SUBJECT,
                        "exp": int(time.time()) + 86400}, key)
    return json.dumps({"keys": [key.as_dict(private=False)]}), token


def patient_json() -> bytes:
    """A fixed Patient resource of about 1.5 KB, as a FHIR server would send it."""
    patient = {
        "resourceType": "Patient", "id": "example",
        "meta": {"versionId": "3", "lastUpdated": "2024-05-01T10:00:00Z",
                 "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"]},
        "text": {"status": "generated",
                 "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Peter James Chalmers</div>"},
        "identifier": [{"use": "usual", "type": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
            "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345",
            "period": {"start": "2001-05-06"}, "assigner": {"display": "Acme Healthcare"}}],
        "active": True,
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
                 {"use": "usual", "given": ["Jim"]},
                 {"use": "maiden", "family": "Windsor", "given": ["Peter", "James"],
                  "period": {"end": "2002"}}],
        "telecom": [{"use": "home"}, {"system": "phone", "value": "(03) 5555 6473",
                                      "use": "work", "rank": 1},
                    {"system": "phone", "value": "(03) 3410 5613", "use": "mobile", "rank": 2},
                    {"system": "phone", "value": "(03) 5555 8834", "use": "old",
                     "period": {"end": "2014"}}],
        "gender": "male", "birthDate": "1974-12-25", "deceasedBoolean": False,
        "address": [{"use": "home", "type": "both", "text": "534 Erewhon St PeasantVille, "
                     "Rainbow, Vic  3999", "line": ["534 Erewhon St"], "city": "PleasantVille",
                     "district": "Rainbow", "state": "Vic", "postalCode": "3999",
                     "period": {"start": "1974-12-25"}}],
        "contact": [{"relationship": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}],
            "name": {"family": "du Marché", "given": ["Bénédicte"]},
            "telecom": [{"system": "phone", "value": "+33 (237) 998327"}],
            "address": {"use": "home", "type": "both", "line": ["534 Erewhon St"],
                        "city": "PleasantVille", "district": "Rainbow", "state": "Vic",
                        "postalCode": "3999", "period": {"start": "1974-12-25"}},
            "gender": "female", "period": {"start": "2012"}}],
        "managingOrganization": {"reference": "Organization/1"},
    }
    return json.dumps(patient, indent=1, ensure_ascii=False).encode()


# -- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    """One started process; ``pids`` are the processes whose CPU and memory belong to it."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready_seconds: float | None = None

    @property
    def pids(self) -> list[int]:
        return [self.popen.pid, *_children(self.popen.pid)]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU consumed so far by ``pids`` (from /proc, no extra dependency)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mib(pids: list[int]) -> float:
    return sum(_status_kib(p, "VmHWM") for p in pids) / 1024


def rss_mib(pids: list[int]) -> float:
    return sum(_status_kib(p, "VmRSS") for p in pids) / 1024


def _spawn(name: str, argv: list[str], workdir: Path, **kwargs: object) -> Proc:
    log = workdir / f"{name}.log"
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log.open("wb"),
                             stdin=subprocess.DEVNULL, **kwargs)  # type: ignore[call-overload]
    return Proc(name, popen, log)


def _wait_line(proc: Proc, predicate: Callable[[dict[str, object]], bool]) -> dict[str, object]:
    """Read JSON lines from stdout until one satisfies ``predicate``; keep draining after."""
    assert proc.popen.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    buffer = b""
    fd = proc.popen.stdout.fileno()
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        ready, _, _ = select.select([fd], [], [], 0.05)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and predicate(data):
                _drain_forever(proc)
                return data
    raise RuntimeError(f"{proc.name} did not become ready; see {proc.log}")


def _drain_forever(proc: Proc) -> None:
    # Request logs go to stdout; a full pipe would stall the proxy, so a thread discards them.
    import threading

    stream = proc.popen.stdout
    assert stream is not None
    threading.Thread(target=lambda: [None for _ in iter(lambda: stream.read(65536), b"")],
                     daemon=True).start()


def _wait_port(port: int, proc: Proc) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited; see {proc.log}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{proc.name} did not listen on {port}; see {proc.log}")


def _opener(context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    # No proxy from the environment: the benchmark talks to loopback targets only.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                       urllib.request.HTTPSHandler(context=context))


# -- the environment ------------------------------------------------------------------------


@dataclass
class Target:
    key: str
    label: str
    url: str  # the Patient URL a client asks for
    proc: Proc | None  # the process whose CPU and memory are the target's cost
    token_count: Callable[[], int] | None = None
    headers: dict[str, str] = field(default_factory=dict)  # what the client itself must send


@dataclass
class Bench:
    workdir: Path
    token_lifetime: int = 300
    procs: list[Proc] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    tokens: TokenServer | None = None

    def __post_init__(self) -> None:
        self.pki = DemoPKI(self.workdir / "pki")
        self.server = self.pki.server(("localhost", "127.0.0.1"))
        self.upstream_port = free_port()
        self.base = f"https://127.0.0.1:{self.upstream_port}"
        self.fhir_base = f"{self.base}/fhir"  # the FHIR base URL every proxy target uses

    # nginx needs a user to run workers as when started as root; the files are ours.
    def _nginx_user(self) -> str:
        return "user root;\n" if os.geteuid() == 0 else ""

    def _start_nginx(self, name: str, http_block: str, port: int) -> Proc:
        conf = self.workdir / f"{name}.conf"
        conf.write_text(
            f"{self._nginx_user()}worker_processes 1;\ndaemon off;\n"
            f"pid {self.workdir}/{name}.pid;\nerror_log {self.workdir}/{name}-error.log warn;\n"
            "events { worker_connections 8192; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {self.workdir}/tmp-{name};\n"
            f"  proxy_temp_path {self.workdir}/ptmp-{name};\n{http_block}\n}}\n")
        proc = _spawn(name, [shutil.which("nginx") or "nginx", "-c", str(conf),
                             "-p", str(self.workdir)], self.workdir)
        self.procs.append(proc)
        _wait_port(port, proc)
        return proc

    def start_upstream(self, pages: Sequence[Page] = ()) -> None:
        """nginx serving the fixed Patient (and a 100 MB Binary) over HTTPS, and ``pages``
        (searchset Bundles, bench/pages.py) under ``PAGES_PATH``."""
        docs = self.workdir / "docs"
        docs.mkdir(exist_ok=True)
        (docs / "patient.json").write_bytes(patient_json())
        (docs / "pages").mkdir(exist_ok=True)
        for page in pages:
            (docs / "pages" / page.file_name).write_bytes(page_body(self.fhir_base, page))
        with (docs / "big.bin").open("wb") as big:
            big.truncate(BIG_BYTES)
        # The upstream refuses requests without the injected credential, so a target that
        # forgot to add it cannot look fast by answering 401s. It logs the first request of
        # every upstream connection with whether TLS was resumed: that counts upstream
        # handshakes per target without costing keep-alive requests anything.
        block = f"""
  map $http_authorization $authorized {{ "{BASIC_AUTHORIZATION}" 1;
                                         "~^Bearer {BENCH_TOKEN_PREFIX}" 1; default 0; }}
  log_format conn '$ssl_session_reused $ssl_protocol';
  map $connection_requests $first_request {{ 1 1; default 0; }}
  server {{
    listen 127.0.0.1:{self.upstream_port} ssl;
    ssl_certificate {self.server.cert_chain};
    ssl_certificate_key {self.server.key};
    ssl_session_cache shared:bench:10m;
    keepalive_requests 1000000;
    access_log {self.workdir}/upstream-conns.log conn if=$first_request;
    location = {PATIENT_PATH} {{ if ($authorized = 0) {{ return 401; }}
                                  default_type application/fhir+json;
                                  alias {docs}/patient.json; }}
    location = {BIG_PATH} {{ if ($authorized = 0) {{ return 401; }}
                              default_type application/octet-stream; alias {docs}/big.bin; }}
    location {PAGES_PATH} {{ if ($authorized = 0) {{ return 401; }}
                             types {{ application/fhir+json json; application/fhir+xml xml; }}
                             alias {docs}/pages/; }}
  }}"""
        self.upstream = self._start_nginx("upstream", block, self.upstream_port)

    def upstream_handshakes(self) -> tuple[int, int]:
        """(full, resumed) upstream TLS handshakes so far."""
        path = self.workdir / "upstream-conns.log"
        if not path.exists():
            return 0, 0
        lines = path.read_text().splitlines()
        resumed = sum(1 for line in lines if line.startswith("r "))
        return len(lines) - resumed, resumed

    def add_direct(self) -> None:
        self.targets.append(Target("direct", "direct HTTPS", self.base + PATIENT_PATH, None,
                                   headers={"Authorization": BASIC_AUTHORIZATION}))

    def add_nginx_proxy(self) -> None:
        port = free_port()
        block = f"""
  upstream fhir {{ server 127.0.0.1:{self.upstream_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    location / {{
      proxy_pass https://fhir;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "{BASIC_AUTHORIZATION}";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {self.pki.ca_bundle_path};
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
      proxy_ssl_session_reuse on;
    }}
  }}"""
        proc = self._start_nginx("nginx-proxy", block, port)
        self.targets.append(Target("nginx", "nginx reverse proxy",
                                   f"http://127.0.0.1:{port}{PATIENT_PATH}", proc))

    def add_mitmdump(self) -> None:
        port = free_port()
        argv = [str(VENV_BIN / "mitmdump"), "--mode", f"reverse:{self.base}",
                "--listen-host", "127.0.0.1", "--listen-port", str(port),
                "--set", f"upstream_auth={BASIC_USER}:{BASIC_PASSWORD}",
                "--set", f"ssl_verify_upstream_trusted_ca={self.pki.ca_bundle_path}",
                "--set", f"confdir={self.workdir / 'mitmdump-conf'}",
                "--set", "stream_large_bodies=1m", "-q"]
        proc = _spawn("mitmdump", argv, self.workdir)
        self.procs.append(proc)
        _wait_port(port, proc)
        _drain_forever(proc)
        self.targets.append(Target("mitmdump", "plain mitmdump",
                                   f"http://127.0.0.1:{port}{PATIENT_PATH}", proc))

    def start_token_server(self) -> None:
        """The test kit's token server, in this process: it answers one request per token
        lifetime per target, too few to cost the measured processes anything."""
        self.tokens = TokenServer(self.server, BENCH_CLIENT_ID, BENCH_CLIENT_SECRET,
                                  lifetime_seconds=self.token_lifetime,
                                  token_prefix=BENCH_TOKEN_PREFIX).start()
        self.token_port = self.tokens.port

    def tokens_issued(self) -> int:
        assert self.tokens is not None, "start_token_server() first"
        return self.tokens.issued

    def add_sidecar(self, auth: str, source: Path | None = None, rewrite_links: bool = True,
                    key: str | None = None, callers: bool = False, audit: bool = False
                    ) -> None:
        """fhir-sidecar with ``auth`` (basic or oauth) credentials.

        ``source``: a directory holding another ``sidecar`` package (e.g. the code before a
        change) to run instead of the installed one, as target ``sidecar-before``.
        ``callers``: the connection serves only a workload token's subject (allowed_callers),
        and the client sends that token with every request (target ``sidecar-callers``).
        ``audit``: the audit trail's file is on (target ``sidecar-audit``).
        """
        port, admin = free_port(), free_port()
        ca = self.pki.ca_bundle_path
        lines = [f"admin: {{listen: 127.0.0.1:{admin}}}",
                 "basic_auth:",
                 f"  bench: {{username: {BASIC_USER}, password: {BASIC_PASSWORD}}}"]
        if auth == "oauth":
            lines += ["oauth:", "  bench:",
                      f"    token_url: https://127.0.0.1:{self.token_port}/token",
                      f"    client_id: {BENCH_CLIENT_ID}",
                      f"    client_secret: {BENCH_CLIENT_SECRET}",
                      f"    tls: {{verify: custom, ca_bundle: {ca}}}"]
        lines += ["connections:", "  upstream:", f"    url: {self.base}/fhir",
                  f"    listen: 127.0.0.1:{port}", f"    auth: {{{auth}: bench}}",
                  f"    tls: {{verify: custom, ca_bundle: {ca}}}"]
        if not rewrite_links:
            lines.append("    rewrite_links: false")
        client_headers: dict[str, str] = {}
        if callers:
            jwks, token = _workload_identity()
            (self.workdir / "cluster-jwks.json").write_text(jwks)
            lines.append(f"    allowed_callers: ['k8s:{BENCH_SUBJECT}']")
            lines += ["callers:", "  k8s:", f"    issuer: {BENCH_ISSUER}",
                      "    audience: fhir-sidecar",
                      f"    jwks_file: {self.workdir / 'cluster-jwks.json'}"]
            client_headers["Authorization"] = f"Bearer {token}"
            key = key or "sidecar-callers"
        if audit:
            lines += ["audit:", "  file: audit/audit.jsonl"]
            key = key or "sidecar-audit"
        key = key or (f"sidecar-{auth}" if source is None else "sidecar-before")
        config = self.workdir / f"{key}.yaml"
        config.write_text("\n".join(lines) + "\n")
        run = ["run", "-c", str(config), "--state-dir", str(self.workdir / f"state-{key}")]
        argv = [str(VENV_BIN / "fhir-sidecar"), *run]
        env = None
        if source is not None:
            # PYTHONPATH comes before the editable install's finder on sys.path.
            env = {**os.environ, "PYTHONPATH": str(source)}
            # -P: no current directory on sys.path, which would find the checkout instead.
            argv = [sys.executable, "-P", "-c", "import sys; from sidecar.cli import main; "
                    "sys.exit(main(sys.argv[1:]))", *run]
        started = time.monotonic()
        proc = _spawn(key, argv, self.workdir, env=env)
        self.procs.append(proc)
        _wait_line(proc, lambda d: d.get("event") == "ready")
        proc.ready_seconds = time.monotonic() - started
        counter = self.tokens_issued if auth == "oauth" else None
        extra = ", caller tokens" if callers else ", audit file" if audit else ""
        label = f"fhir-sidecar ({auth}{extra})"
        self.targets.append(Target(key, label, f"http://127.0.0.1:{port}{PATIENT_PATH}", proc,
                                   counter, headers=client_headers))

    def check_targets(self) -> None:
        """Every target must answer 200 with the Patient, or the numbers mean nothing."""
        expected = patient_json()
        trusting = ssl.create_default_context(cafile=str(self.pki.ca_bundle_path))
        for target in self.targets:
            request = urllib.request.Request(target.url, headers=target.headers)
            with _opener(trusting).open(request, timeout=10) as answer:
                body = answer.read()
            if answer.status != 200 or body != expected:
                raise RuntimeError(f"{target.label} answered {answer.status} with "
                                   f"{len(body)} bytes, not the Patient")

    def stream_big(self, target: Target) -> dict[str, float]:
        """Download the 100 MB Binary through ``target``; sample its RSS while it streams."""
        assert target.proc is not None
        pids = target.proc.pids
        before = rss_mib(pids)
        peak = before
        url = target.url.replace(PATIENT_PATH, BIG_PATH)
        host, port = url.split("/")[2].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        started = time.monotonic()
        conn.request("GET", BIG_PATH)
        answer = conn.getresponse()
        received = 0
        while chunk := answer.read(1 << 20):
            received += len(chunk)
            peak = max(peak, rss_mib(pids))
        conn.close()
        seconds = time.monotonic() - started
        if answer.status != 200 or received != BIG_BYTES:
            raise RuntimeError(f"{target.label}: streaming got {answer.status}, {received} B")
        return {"rss_before_mib": before, "rss_growth_mib": peak - before, "seconds": seconds}

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.tokens is not None:
            self.tokens.stop()
