"""Config validation: every problem is reported as FILE: field.path: what is wrong."""

from pathlib import Path

import pytest
from support.pki import TestPKI

from sidecar.config import ConfigError, load_config
from sidecar.runtime.live import load_snapshot


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path, snapshot: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_snapshot(path) if snapshot else load_config(path)
    return [str(p) for p in info.value.problems]


def test_missing_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: config file not found"]


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "connections:\n  a: [\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: line ") and "invalid YAML" in line


@pytest.mark.parametrize("text", ["", "   \n\t\n", "\n\n", "# only a comment\n", "---\n"])
def test_empty_config_is_invalid(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    [line] = problems(path)
    assert line.startswith(f"{path}: the config file is empty")


def test_explicit_empty_mapping_is_a_valid_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "{}\n"))
    assert config.connections == {} and config.basic_auth == {}


def test_unknown_key_and_reference_errors_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, """
basic_auth:
  b1: {username: u, password_env: PW, colour: blue}
connections:
  a: {url: "https://a.example/fhir", auth: {basic: nope}}
  c: {url: "https://c.example", auth: {basic: b1, oauth: o1}}
  d: {url: "https://d.example", tls: {verify: custom}}
""")
    found = problems(path)
    assert f"{path}: basic_auth.b1.colour: unknown key" in found
    assert any(p.startswith(f"{path}: connections.c.auth: set basic or oauth, not both")
               for p in found)
    assert any(p.startswith(f"{path}: connections.d.tls: verify: custom needs ca_bundle")
               for p in found)


def test_unknown_definition(tmp_path: Path) -> None:
    path = write(tmp_path, """
basic_auth:
  b1: {username: u, password_env: PW}
connections:
  a: {url: "https://a.example/fhir", auth: {basic: nope}}
""")
    assert problems(path) == [
        f"{path}: connections.a.auth.basic: no Basic Auth definition named 'nope' (defined: b1)"]


def test_bad_names_and_urls(tmp_path: Path) -> None:
    path = write(tmp_path, """
connections:
  Bad_Name: {url: "https://a.example"}
  ok: {url: "ftp://a.example"}
""")
    found = problems(path)
    assert any("connections: " in p and "'Bad_Name' must match" in p for p in found)
    assert any(p.startswith(f"{path}: connections.ok.url:") for p in found)


def test_every_named_section_checks_its_names_even_beside_other_errors(tmp_path: Path) -> None:
    too_long = "a" * 64
    path = write(tmp_path, f"""
egress_proxies:
  Corp: {{url: "http://proxy.example:3128", colour: blue}}
basic_auth:
  {too_long}: {{username: u, password_env: PW}}
  {"b" * 63}: {{username: u, password_env: PW}}
""")
    found = problems(path)
    assert f"{path}: egress_proxies: name 'Corp' must match [a-z0-9][a-z0-9_-]* (at most 63 " \
           "characters)" in found
    assert f"{path}: egress_proxies.Corp.colour: unknown key" in found
    assert any(p.startswith(f"{path}: basic_auth: name '{too_long}' must match") for p in found)
    assert len(found) == 3


def test_duplicate_listen_ports(tmp_path: Path) -> None:
    path = write(tmp_path, """
proxy: {listen: "127.0.0.1:18080"}
connections:
  a: {url: "https://a.example", listen: "127.0.0.1:18080"}
""")
    assert problems(path) == [
        f"{path}: connections.a.listen: 127.0.0.1:18080 is already used by proxy.listen"]


def test_secrets_and_bundles_are_read_at_compile(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FHIR_TEST_UNSET", raising=False)
    (tmp_path / "not-pem.pem").write_text("hello")
    path = write(tmp_path, """
basic_auth:
  f: {username: u, password_file: secrets/missing}
  e: {username: u, password_env: FHIR_TEST_UNSET}
connections:
  a: {url: "https://a.example", tls: {verify: custom, ca_bundle: not-pem.pem}}
  b: {url: "https://b.example", tls: {verify: custom, ca_bundle: nowhere.pem}}
""")
    found = problems(path, snapshot=True)
    assert f"{path}: basic_auth.f.password_file: secret file " \
           f"{tmp_path / 'secrets/missing'} does not exist" in found
    assert f"{path}: basic_auth.e.password_env: environment variable FHIR_TEST_UNSET " \
           "is not set" in found
    assert f"{path}: connections.a.tls.ca_bundle: {tmp_path / 'not-pem.pem'} contains no " \
           "PEM certificate" in found
    assert any(p.startswith(f"{path}: connections.b.tls.ca_bundle: cannot read") for p in found)


def test_each_tls_file_problem_names_its_own_field(tmp_path: Path, pki: TestPKI) -> None:
    # The field comes from where the problem was found, whatever the paths or messages say:
    # here every file name contains "client_cert" and "private key", which once decided it.
    client = pki.client_identity(name="tls-fields")
    other = pki.client_identity(name="tls-fields-other")
    folder = tmp_path / "client_cert private key"
    folder.mkdir()
    (folder / "not-a-cert.pem").write_text("hello")
    (folder / "not-a-key.pem").write_text("hello")
    path = write(tmp_path, f"""
connections:
  missing-key: {{url: "https://a.example", tls: {{client_cert: "{client.cert}",
                 client_key: "{folder}/nowhere.key"}}}}
  missing-cert: {{url: "https://b.example", tls: {{client_cert: "{folder}/nowhere.pem"}}}}
  bad-cert: {{url: "https://c.example", tls: {{client_cert: "{folder}/not-a-cert.pem"}}}}
  bad-key: {{url: "https://d.example", tls: {{client_cert: "{client.cert}",
             client_key: "{folder}/not-a-key.pem"}}}}
  no-key-inside: {{url: "https://e.example", tls: {{client_cert: "{client.cert}"}}}}
  wrong-key: {{url: "https://f.example", tls: {{client_cert: "{client.cert}",
               client_key: "{other.key}"}}}}
  bad-bundle: {{url: "https://g.example", tls: {{verify: custom,
                ca_bundle: "{folder}/not-a-key.pem"}}}}
""")
    fields = {p.split(": ")[1] for p in problems(path, snapshot=True)}
    assert fields == {"connections.missing-key.tls.client_key",
                      "connections.missing-cert.tls.client_cert",
                      "connections.bad-cert.tls.client_cert",
                      "connections.bad-key.tls.client_key",
                      "connections.no-key-inside.tls.client_cert",
                      "connections.wrong-key.tls.client_key",
                      "connections.bad-bundle.tls.ca_bundle"}


def test_oauth_setup_problems_name_their_field(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "ec.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (tmp_path / "secret").write_text("setup-secret\n")
    path = write(tmp_path, """
oauth:
  k: {token_url: "https://auth.example/token", client_id: c, client_auth: private_key_jwt,
      private_key_file: ec.pem, signing_alg: RS384}
  e: {token_url: "https://auth.example/token", client_id: c, client_secret_file: secret,
      extra_params: {grant_type: password}}
""")
    found = problems(path, snapshot=True)
    assert any(p.startswith(f"{path}: oauth.k.private_key_file: OAuth definition 'k': "
                            "signing_alg RS384 needs an RSA key") for p in found), found
    assert any(p.startswith(f"{path}: oauth.e.extra_params: OAuth definition 'e': "
                            "extra_params must not set grant_type") for p in found), found
    assert len(found) == 2, found


def test_secret_file_trailing_newline_stripped_once(tmp_path: Path) -> None:
    from sidecar.config.secrets import read_secret_file

    for raw, expected in [(b"pw\n", "pw"), (b"pw\r\n", "pw"), (b"pw\n\n", "pw\n"),
                          (b" pw ", " pw ")]:
        (tmp_path / "s").write_bytes(raw)
        assert read_secret_file(tmp_path / "s") == expected


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    path = write(tmp_path, """
basic_auth:
  b: {username: u, password_file: secrets/pw}
""")
    config = load_config(path)
    assert config.basic_auth["b"].password_file == tmp_path / "secrets" / "pw"


def test_inline_secret_is_a_warning_not_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, """
basic_auth:
  b: {username: u, password: dev-only}
connections:
  a: {url: "https://a.example", auth: {basic: b}}
""")
    snapshot = load_snapshot(path)
    assert any("basic_auth.b.password: inline secret" in w for w in snapshot.warnings)
    assert "dev-only" not in repr(snapshot)


def test_limits_and_read_timeout_defaults_and_errors(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'connections:\n  a: {url: "https://a.example"}\n'))
    assert config.limits.max_request_header_bytes == 65536
    assert config.limits.client_header_timeout_seconds == 30
    assert config.limits.client_idle_timeout_seconds == 300
    assert config.connections["a"].read_timeout_seconds == 60

    path = write(tmp_path, """
limits:
  max_request_header_bytes: 100
  client_header_timeout_seconds: 0
  client_idle_timeout_seconds: -1
  max_body: 5
connections:
  a: {url: "https://a.example", read_timeout_seconds: 0}
""")
    found = problems(path)
    for field in ("limits.max_request_header_bytes", "limits.client_header_timeout_seconds",
                  "limits.client_idle_timeout_seconds", "connections.a.read_timeout_seconds"):
        assert any(p.startswith(f"{path}: {field}: ") for p in found), (field, found)
    assert f"{path}: limits.max_body: unknown key" in found


def test_yaml_1_2_strings_stay_strings(tmp_path: Path) -> None:
    # YAML 1.1 read these as False and as the sexagesimal number 750.
    config = load_config(write(tmp_path, """
basic_auth:
  b: {username: no, password: on}
oauth:
  o: {token_url: "https://t.example/token", client_id: 12:30, client_secret: yes}
"""))
    assert config.basic_auth["b"].username == "no"
    assert config.basic_auth["b"].password == "on"
    assert config.oauth["o"].client_id == "12:30"
    assert config.oauth["o"].client_secret == "yes"


def test_duplicate_key_is_invalid_and_its_values_are_not_quoted(tmp_path: Path) -> None:
    path = write(tmp_path, """
basic_auth:
  b: {username: svc, password: inline-secret-one, password: inline-secret-two}
""")
    [line] = problems(path)
    assert line.startswith(f"{path}: line 3, column ")
    assert "duplicate key 'password'" in line
    assert "inline-secret" not in line
