"""A reload compares token-source specs and builds a TokenSource only for a spec that is new."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import load_config
from sidecar.credentials.oauth import TokenSource, TokenSourceSpec
from sidecar.runtime.snapshot import Snapshot, compile_snapshot
from sidecar.tls.policy import compile_tls_policy


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the token sources constructed, in order (the real constructor runs)."""
    names: list[str] = []
    real_init = TokenSource.__init__

    def counting_init(self: TokenSource, name: str, *args: Any, **kwargs: Any) -> None:
        names.append(name)
        real_init(self, name, *args, **kwargs)

    monkeypatch.setattr(TokenSource, "__init__", counting_init)
    return names


def compile_file(path: Path, previous: Snapshot | None = None) -> Snapshot:
    return compile_snapshot(load_config(path), path, previous=previous)


def test_an_unchanged_definition_keeps_its_source_without_building_one(
        tmp_path: Path, built: list[str]) -> None:
    (tmp_path / "secret-a").write_text("first-secret-Zr4\n")
    (tmp_path / "secret-b").write_text("other-secret-Kq1\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "oauth:\n"
        "  a: {token_url: 'https://auth.example/token', client_id: ca,"
        " client_secret_file: secret-a}\n"
        "  b: {token_url: 'https://auth.example/token', client_id: cb,"
        " client_secret_file: secret-b, scopes: [system/Patient.rs]}\n"
        "connections:\n"
        "  c: {url: 'https://fhir.example/r4', auth: {oauth: a}}\n")
    first = compile_file(config)
    assert sorted(built) == ["a", "b"]

    built.clear()
    second = compile_file(config, first)
    assert built == []
    assert second.token_sources["a"] is first.token_sources["a"]
    assert second.token_sources["b"] is first.token_sources["b"]

    # A new secret for a, a new scope for b: both specs are new, so both are built anew.
    (tmp_path / "secret-a").write_text("rotated-secret-Vw8\n")
    config.write_text(config.read_text().replace("system/Patient.rs", "system/Patient.r"))
    third = compile_file(config, second)
    assert sorted(built) == ["a", "b"]
    assert third.token_sources["a"] is not second.token_sources["a"]
    assert third.token_sources["b"] is not second.token_sources["b"]


def test_the_spec_holds_no_secret_and_follows_every_input(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("spec-secret-Pq7\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text("oauth:\n  a: {token_url: 'https://auth.example/token', client_id: ca,"
                      " client_secret_file: secret}\n")
    snapshot = compile_file(config)
    source = snapshot.token_sources["a"]
    spec = source.settings_key
    assert isinstance(spec, TokenSourceSpec) and hash(spec) == hash(spec)
    assert "spec-secret-Pq7" not in repr(spec)
    definition = snapshot.config.oauth["a"]
    tls = compile_tls_policy(definition.tls)  # a policy equal to the source's own
    same = TokenSourceSpec.of("a", definition, client_secret="spec-secret-Pq7",
                              private_key_pem=None, tls=tls)
    assert same == spec
    assert TokenSourceSpec.of("a", definition, client_secret="other", private_key_pem=None,
                              tls=tls) != spec
    assert TokenSourceSpec.of("b", definition, client_secret="spec-secret-Pq7",
                              private_key_pem=None, tls=tls) != spec
