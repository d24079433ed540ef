"""The dashboard's and API's write path: change the config file, validate, persist, reload.

Every change follows the same steps: read the config file's text; apply the change to its data
(ruamel.yaml keeps comments and order); write new secrets (passwords, client secrets, private
keys) as new 0600 files in the sidecar's own secrets directory (``<state dir>/secrets``) and
reference them as ``*_file`` paths; validate the whole candidate exactly as a reload would
(``parse_config`` then ``compile_snapshot``); only then write the config atomically (temp file,
fsync, rename) and call :meth:`LiveConfig.reload`, the one reload path. A rejected change leaves
every file as it was.

The API and the dashboard take secret *values*, never a file path or an environment variable
name: anyone holding the admin token could otherwise make the sidecar read any file on the host
and send it upstream as a password. Definitions whose config-file entry names a file or an
environment variable this module did not write stay as the operator wrote them: they can be read
and assigned, not changed or removed here.

Secrets are write-only: the views returned here say ``"set"`` / ``"not set"``, never a value.
This module knows nothing about HTTP.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from sidecar.admin import destinations
from sidecar.admin.api_models import REFERENCE_SUFFIXES, TLS_PATH_FIELDS, SecretState
from sidecar.config.errors import ConfigError
from sidecar.config.loader import parse_config
from sidecar.config.models import NAME_RULE, SidecarConfig, is_valid_name, require_valid_name
from sidecar.config.secrets import SecretError, read_secret_file
from sidecar.config.yaml_io import YAMLError, dump, round_trip
from sidecar.runtime.live import LiveConfig, ReloadOutcome
from sidecar.runtime.snapshot import compile_snapshot
from sidecar.tls.material import CertificateInfo, TlsMaterialError, parse_ca_bundle

# Beside the config file: where versions before the state-dir secrets directory wrote. Its
# files are still recognised as written by the API (so their definitions stay editable).
LEGACY_SECRETS_DIR_NAME = "dashboard-secrets"
MAX_UPLOAD_BYTES = 256 * 1024  # a CA bundle or private key; far above any real one

Kind = Literal["connections", "basic_auth", "oauth"]
KIND_WORDS: dict[str, str] = {"connections": "connection", "basic_auth": "Basic Auth definition",
                              "oauth": "OAuth definition", "ca_bundles": "CA bundle",
                              "egress_proxies": "egress proxy"}
_CA_FILE = re.compile(rf"ca-({NAME_RULE})\.pem")
# Secret files this module wrote: "<kind>-<name>.<field>.<random>"; a version is removed once a
# change leaves the config no longer naming it.
# Secrets written into the config file itself; the API never writes them there.
INLINE_SECRET_FIELDS = ("password", "client_secret")
_MANAGED_SECRET = re.compile(rf"(basic|oauth)-{NAME_RULE}\.[a-z-]+\.[0-9a-f]{{16}}")


class ChangeRejected(Exception):
    """A change that was not made; ``status`` is the HTTP status that fits, ``problems`` the
    validation messages (``FILE: field.path: what is wrong``). Never contains a secret."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


# The fields of a connection's ``tls`` that name a file on the host.
CONNECTION_PATH_FIELDS = ("ca_bundle", "client_cert", "client_key")


@dataclass(frozen=True)
class FilePath:
    """A host path as the config file spells it, and where it leads (as GET shows it)."""

    literal: str
    resolved: Path


@dataclass(frozen=True)
class CaBundle:
    name: str
    path: Path
    certificates: list[CertificateInfo]
    used_by: list[str]
    problem: str | None = None


@dataclass
class _Plan:
    """One change in progress: the new config data and the secret files written for it."""

    data: Any
    new_files: list[Path] = field(default_factory=list)


def check_name(name: str, kind: str) -> None:
    try:
        require_valid_name(name)
    except ValueError as problem:
        raise ChangeRejected(400, f"{KIND_WORDS.get(kind, kind)} {problem}") from None


def check_no_references(body: dict[str, Any]) -> None:
    """Refuse file paths and environment variable names in an API body or dashboard form.

    Decided on the field names alone, before anything touches the file system, so the answer
    is the same whether or not a named file exists.
    """
    problems = [f"{key}: file paths and environment variable names are not accepted here; "
                f"send the value itself ({_value_field(key)})"
                for key in body if key.endswith(REFERENCE_SUFFIXES)]
    tls = body.get("tls")
    if isinstance(tls, dict):
        problems += [f"tls.{key}: file paths are not accepted here; set it in the config file"
                     for key in tls if key.endswith(REFERENCE_SUFFIXES) or key in TLS_PATH_FIELDS]
        bundle = tls.get("ca_bundle")
        if bundle is not None and not (isinstance(bundle, str) and is_valid_name(bundle)):
            problems.append("tls.ca_bundle: give the name of an uploaded CA bundle (upload its "
                            "PEM with PUT /api/ca-bundles/<name>), not a path")
    if problems:
        raise ChangeRejected(422, "the API and the dashboard take secret values and uploaded "
                                  "CA bundle names, never file paths or environment variable "
                                  "names; nothing was changed", problems)


def _value_field(key: str) -> str:
    stem = key.rsplit("_", 1)[0]
    return {"private_key": "private_key_pem"}.get(stem, stem)


class ConfigStore:
    def __init__(self, live: LiveConfig, secrets_dir: Path):
        self.live = live
        self._secrets_dir = Path(os.path.abspath(secrets_dir))
        # (kind, definition name) -> every destination a config seen by this process sent its
        # secret to; see _require_known_destination.
        self._seen: dict[destinations.Key, set[destinations.Destination]] = {}
        self._note_destinations()

    # -- where things are ------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        # Write where the file really is, so a symlinked config stays a symlink.
        return Path(os.path.realpath(self.live.path))

    @property
    def base_dir(self) -> Path:
        return Path(os.path.abspath(self.live.path)).parent

    @property
    def secrets_dir(self) -> Path:
        """Where new secrets and uploaded CA bundles are written (``<state dir>/secrets``)."""
        return self._secrets_dir

    @property
    def managed_dirs(self) -> tuple[Path, ...]:
        return self._secrets_dir, self.base_dir / LEGACY_SECRETS_DIR_NAME

    def ca_bundle_path(self, name: str) -> Path:
        return self.secrets_dir / f"ca-{name}.pem"

    def is_managed(self, path: Path) -> bool:
        """Whether ``path`` is a secret file or CA bundle that this module wrote."""
        path = Path(os.path.normpath(path))
        return path.parent in self.managed_dirs and (
            _MANAGED_SECRET.fullmatch(path.name) is not None
            or _CA_FILE.fullmatch(path.name) is not None)

    def external_references(self, definition: BaseModel, prefix: str = "") -> list[str]:
        """Fields of a definition that name a file or environment variable the operator chose
        (not one this module wrote): such a definition is the config file's to change."""
        found: list[str] = []
        for field_name, value in definition:
            if value is None:
                continue
            if isinstance(value, BaseModel):
                found += self.external_references(value, f"{prefix}{field_name}.")
            elif field_name.endswith("_env") or (isinstance(value, Path)
                                                 and not self.is_managed(value)):
                found.append(prefix + field_name)
        return found

    def read_only_definition(self, kind: Kind, name: str) -> str | None:
        """Why the API must not change this definition; None when it may.

        A connection is always editable: the host paths its config-file entry names (its
        ``tls`` files) are kept as they are, not changed (:meth:`file_paths_of`)."""
        definition = getattr(self.config, kind).get(name)
        if definition is None or kind == "connections":
            return None
        references = self.external_references(definition)
        if not references:
            return None
        return (f"{KIND_WORDS[kind]} {name!r} comes from the config file and reads "
                f"{', '.join(references)} from the host; the API and the dashboard do not "
                "change or remove it: edit the config file")

    def file_paths_of(self, name: str) -> dict[str, FilePath]:
        """The host paths the config file itself gives connection ``name`` (its ``tls``
        files, not uploaded CA bundles), by field: what an API or dashboard change may keep,
        and never introduce or change (docs/admin-api.md#host-paths-from-the-config-file)."""
        conn = self.config.connections.get(name)
        entry = self._file_section("connections").get(name) if conn is not None else None
        tls = entry.get("tls") if isinstance(entry, dict) else None
        if conn is None or not isinstance(tls, dict):
            return {}
        found = {}
        for field_name in CONNECTION_PATH_FIELDS:
            resolved = getattr(conn.tls, field_name)
            literal = tls.get(field_name)
            if resolved is None or not isinstance(literal, str) or self.is_managed(resolved):
                continue
            found[field_name] = FilePath(str(literal), Path(resolved))
        return found

    def _keep_file_paths(self, name: str, body: dict[str, Any]) -> dict[str, str]:
        """Take out of ``body["tls"]`` every path that repeats the file's own value for the
        same field (its literal text, or the resolved path GET shows; ``client_key`` also as
        the ``"set"`` GET shows); returns them as the file spells them, to be written back
        unchanged. A new or different path stays in the body, where it is refused."""
        tls = body.get("tls")
        if not isinstance(tls, dict):
            return {}
        tls = dict(tls)
        kept = {}
        for field_name, path in self.file_paths_of(name).items():
            given = tls.get(field_name)
            repeats = isinstance(given, str) and (
                given in (path.literal, str(path.resolved))
                or (field_name == "client_key" and given == "set"))
            if repeats:
                del tls[field_name]
                kept[field_name] = path.literal
        body["tls"] = tls
        return kept

    def _require_editable(self, kind: Kind, name: str) -> None:
        reason = self.read_only_definition(kind, name)
        if reason is not None:
            raise ChangeRejected(409, reason)

    # -- may we write at all -----------------------------------------------------------------

    def read_only_reason(self) -> str | None:
        """Why changes are impossible, in words for the user; None when they are possible."""
        if self.live.current.config.admin.token_file is None:
            return ("no admin.token_file is configured, so the dashboard and API are "
                    "read-only; set admin.token_file to allow changes")
        path = self.config_path
        for what, target in (("config file", path), ("config directory", path.parent)):
            if not _writable(target):
                return (f"the {what} {target} is read-only (for example a Kubernetes "
                        "ConfigMap); change the configuration at its source")
        if self.secrets_dir.exists() and not _writable(self.secrets_dir):
            return f"the secrets directory {self.secrets_dir} is read-only"
        return None

    # -- reading ----------------------------------------------------------------------------

    @property
    def config(self) -> SidecarConfig:
        return self.live.current.config

    def bundle_name_for(self, path: Path | None) -> str | None:
        if path is None:
            return None
        path = Path(os.path.normpath(path))
        if path.parent in self.managed_dirs:
            found = _CA_FILE.fullmatch(path.name)
            if found:
                return found.group(1)
        return None

    def _bundle_files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for directory in reversed(self.managed_dirs):  # the current directory wins
            if directory.is_dir():
                for path in directory.iterdir():
                    match = _CA_FILE.fullmatch(path.name)
                    if match and path.is_file():
                        found[match.group(1)] = path
        return found

    def ca_bundles(self) -> list[CaBundle]:
        return [self._describe_bundle(name, path)
                for name, path in sorted(self._bundle_files().items())]

    def ca_bundle(self, name: str) -> CaBundle | None:
        path = self._bundle_files().get(name)
        return self._describe_bundle(name, path) if path is not None else None

    def _describe_bundle(self, name: str, path: Path) -> CaBundle:
        used_by = [c for c, conn in self.config.connections.items()
                   if self.bundle_name_for(conn.tls.ca_bundle) == name]
        used_by += [f"oauth:{o}" for o, d in self.config.oauth.items()
                    if self.bundle_name_for(d.tls.ca_bundle) == name]
        try:
            certs = parse_ca_bundle(path.read_bytes(), path.name)
        except (OSError, TlsMaterialError) as exc:
            return CaBundle(name, path, [], used_by, str(exc))
        return CaBundle(name, path, certs, used_by)

    # -- changes ----------------------------------------------------------------------------

    def put_basic(self, name: str, body: dict[str, Any]) -> tuple[bool, ReloadOutcome]:
        check_name(name, "basic_auth")
        check_no_references(body)
        self._require_editable("basic_auth", name)
        body = dict(body)
        password = _pop_secret(body, "password")

        def change(plan: _Plan) -> bool:
            section = _section(plan.data, "basic_auth")
            existing = section.get(name)
            entry: dict[str, Any] = dict(body)
            if password is not None:
                entry["password_file"] = self._write_secret(plan, f"basic-{name}.password",
                                                            password)
            else:
                if not isinstance(existing, dict):
                    raise ChangeRejected(422, "password is required for a new Basic Auth "
                                              "definition")
                for key in ("password_file", "password"):
                    if key in existing:
                        entry[key] = existing[key]
            section[name] = entry
            return existing is None

        return self._apply(change)

    def put_oauth(self, name: str, body: dict[str, Any]) -> tuple[bool, ReloadOutcome]:
        check_name(name, "oauth")
        check_no_references(body)
        self._require_editable("oauth", name)
        body = self._via_from_api(dict(body))
        client_secret = _pop_secret(body, "client_secret")
        key_pem = _pop_secret(body, "private_key_pem")
        if key_pem is not None:
            _check_private_key(key_pem)
        if isinstance(body.get("tls"), dict):
            body["tls"] = self._tls_from_api(body["tls"])

        def change(plan: _Plan) -> bool:
            section = _section(plan.data, "oauth")
            existing = section.get(name)
            entry: dict[str, Any] = dict(body)
            client_auth = entry.get("client_auth", "client_secret_basic")
            if client_secret is not None:
                entry["client_secret_file"] = self._write_secret(
                    plan, f"oauth-{name}.client-secret", client_secret)
            elif (client_auth != "private_key_jwt" and isinstance(existing, dict)
                  and existing.get("client_auth", "client_secret_basic") != "private_key_jwt"):
                for key in ("client_secret_file", "client_secret"):
                    if key in existing:
                        entry[key] = existing[key]
            if key_pem is not None:
                entry["private_key_file"] = self._write_secret(
                    plan, f"oauth-{name}.private-key", key_pem)
            elif (client_auth == "private_key_jwt"
                  and isinstance(existing, dict) and "private_key_file" in existing):
                entry["private_key_file"] = existing["private_key_file"]
            section[name] = entry
            return existing is None

        return self._apply(change)

    def put_connection(self, name: str, body: dict[str, Any]) -> tuple[bool, ReloadOutcome]:
        check_name(name, "connections")
        body = dict(body)
        kept = self._keep_file_paths(name, body)
        check_no_references(body)
        body = self._via_from_api(body)
        if isinstance(body.get("tls"), dict):
            body["tls"] = {**self._tls_from_api(body["tls"]), **kept}
        auth = body.get("auth")
        if isinstance(auth, dict):
            body["auth"] = {k: v for k, v in auth.items() if v is not None}
            if not body["auth"]:
                body.pop("auth")
            elif "basic" in auth and "oauth" in auth and auth["basic"] and auth["oauth"]:
                raise ChangeRejected(422, "a connection uses a Basic Auth or an OAuth "
                                          "definition, not both: HTTP has a single "
                                          "Authorization header")

        def change(plan: _Plan) -> bool:
            section = _section(plan.data, "connections")
            existing = section.get(name)
            section[name] = body
            return existing is None

        return self._apply(change)

    def _require_known_destination(self, candidate: SidecarConfig, *,
                                   noted: bool = False) -> None:
        """A secret the API caller did not give (it comes from the config file: inline, a file
        or an environment variable) goes only where it already goes: the same origin, through
        the same egress proxy, under the same TLS trust. Otherwise the admin token would be a
        way to read it, by pointing a connection or a token endpoint at a server of one's own,
        or by making the sidecar accept anyone's certificate on the way
        (docs/admin-api.md#credentials-go-only-to-known-upstreams). Checked on the whole
        candidate config, so no edit, whatever it changes, can send a secret anywhere new.
        ``noted``: the destinations of the live config were noted already (before a CA bundle
        they read was replaced)."""
        if not noted:
            self._note_destinations()
        for key, new in destinations.destinations(candidate, self._secret_from_config_file):
            seen = self._seen.get(key, set())
            if not destinations.is_known(new, seen):
                raise ChangeRejected(403, _new_destination_words(key, new, seen))

    def _note_destinations(self) -> None:
        # Remembered, not only read from the current config: a connection switched to another
        # definition and back keeps its upstream. Every destination here came from the config
        # file or passed this check, so the memory grants nothing the config file did not.
        for key, seen in destinations.destinations(self.config, self._secret_from_config_file):
            self._seen.setdefault(key, set()).add(seen)

    def _secret_from_config_file(self, definition: BaseModel) -> bool:
        """Whether the definition holds a secret the API did not write (an inline value, a
        file of the operator's or an environment variable)."""
        inline = any(getattr(definition, f, None) is not None for f in INLINE_SECRET_FIELDS)
        return inline or bool(self.external_references(definition))

    def delete(self, kind: Kind, name: str) -> ReloadOutcome:
        check_name(name, kind)
        if name not in self._file_section(kind):
            raise ChangeRejected(404, f"no {KIND_WORDS[kind]} named {name!r}")
        self._require_editable(kind, name)
        if kind != "connections":
            users = [c for c, conn in self.config.connections.items()
                     if getattr(conn.auth, "basic" if kind == "basic_auth" else "oauth") == name]
            if users:
                raise ChangeRejected(409, f"{KIND_WORDS[kind]} {name!r} is used by connection"
                                          f"{'s' if len(users) > 1 else ''} "
                                          f"{', '.join(users)}; assign another first")

        def change(plan: _Plan) -> bool:
            del _section(plan.data, kind)[name]
            return False

        return self._apply(change)[1]

    def put_ca_bundle(self, name: str, pem: bytes) -> tuple[bool, ReloadOutcome]:
        check_name(name, "ca_bundles")
        self._require_writable()
        validate_ca_pem(pem)
        target = self.ca_bundle_path(name)
        old = target.read_bytes() if target.is_file() else None
        self._note_destinations()  # before the new content is in place
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _atomic_write(target, pem, 0o600)
        if old is not None:
            # New content for a bundle in use is a new trust for whoever uses it.
            try:
                self._require_known_destination(self.config, noted=True)
            except ChangeRejected:
                _atomic_write(target, old, 0o600)
                raise
        outcome = self.live.reload()
        if not outcome.ok:
            if old is None:
                target.unlink(missing_ok=True)
            else:
                _atomic_write(target, old, 0o600)
            self.live.reload()
            raise ChangeRejected(422, "the sidecar rejected the configuration with this CA "
                                      "bundle; nothing was changed", list(outcome.problems))
        return old is None, outcome

    def delete_ca_bundle(self, name: str) -> None:
        check_name(name, "ca_bundles")
        self._require_writable()
        bundle = self.ca_bundle(name)
        if bundle is None:
            raise ChangeRejected(404, f"no CA bundle named {name!r}")
        if bundle.used_by:
            raise ChangeRejected(409, f"CA bundle {name!r} is used by "
                                      f"{', '.join(bundle.used_by)}; change their TLS "
                                      "settings first")
        bundle.path.unlink()

    # -- the one write path -----------------------------------------------------------------

    def _apply(self, change: Any) -> tuple[bool, ReloadOutcome]:
        self._require_writable()
        path = self.config_path
        original = path.read_bytes()
        yaml = round_trip()
        try:
            data = yaml.load(original.decode("utf-8")) or {}
        except (YAMLError, UnicodeDecodeError) as exc:
            raise ChangeRejected(409, f"the config file {path} cannot be parsed; fix it "
                                      f"first: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise ChangeRejected(409, f"the config file {path} is not a mapping; fix it first")
        plan = _Plan(data)
        had_secrets_dir = self.secrets_dir.exists()
        named_before = set(self._managed_secrets())

        def undo_files() -> None:
            _remove(plan.new_files)
            if not had_secrets_dir:
                with contextlib.suppress(OSError):
                    self.secrets_dir.rmdir()  # only when empty

        try:
            created = change(plan)
            text = dump(yaml, plan.data)
            self._validate(text)
            _atomic_write(path, text.encode("utf-8"), _mode_of(path))
        except BaseException:
            undo_files()
            raise
        outcome = self.live.reload()
        if not outcome.ok:
            # E.g. a listen port that is taken: put everything back as it was.
            _atomic_write(path, original, _mode_of(path))
            undo_files()
            self.live.reload()
            raise ChangeRejected(409, "the sidecar could not apply the change; nothing was "
                                      "changed", list(outcome.problems))
        for stale in named_before - set(self._managed_secrets()):
            stale.unlink(missing_ok=True)
        return created, outcome

    def _validate(self, text: str) -> None:
        file = str(self.live.path)
        try:
            config = parse_config(text, file=file, base_dir=self.base_dir)
        except ConfigError as exc:
            raise ChangeRejected(422, "the change is not valid; nothing was changed",
                                 [str(p) for p in exc.problems]) from None
        self._require_known_destination(config)
        try:
            compile_snapshot(config, file)
        except ConfigError as exc:
            raise ChangeRejected(422, "the change is not valid; nothing was changed",
                                 [str(p) for p in exc.problems]) from None

    def _require_writable(self) -> None:
        reason = self.read_only_reason()
        if reason is not None:
            raise ChangeRejected(403, reason)

    def _file_section(self, kind: Kind) -> dict[str, Any]:
        try:
            data = round_trip().load(self.config_path.read_text(encoding="utf-8")) or {}
        except (OSError, YAMLError, UnicodeDecodeError):
            return dict(getattr(self.config, kind))
        section = data.get(kind) if isinstance(data, dict) else None
        return section if isinstance(section, dict) else {}

    def _write_secret(self, plan: _Plan, stem: str, value: str) -> str:
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.secrets_dir / f"{stem}.{secrets.token_hex(8)}"
        _atomic_write(target, (value + "\n").encode("utf-8"), 0o600)
        plan.new_files.append(target)
        return str(target)

    def _tls_from_api(self, tls: dict[str, Any]) -> dict[str, Any]:
        """``ca_bundle`` names an uploaded bundle (``internal``); the config gets its path."""
        tls = {k: v for k, v in tls.items() if v is not None}
        ref = tls.get("ca_bundle")
        if isinstance(ref, str):
            bundle = self._bundle_files().get(ref)
            if bundle is None:
                raise ChangeRejected(422, f"no CA bundle named {ref!r}; upload it first "
                                          f"(PUT /api/ca-bundles/{ref})")
            tls["ca_bundle"] = str(bundle)
        return tls

    def _via_from_api(self, body: dict[str, Any]) -> dict[str, Any]:
        """``via`` names an egress proxy of the config file; null (or leaving it out: a PUT
        replaces the whole definition) means a direct connection
        (docs/admin-api.md#egress-proxies)."""
        via = body.pop("via", None)
        if via is None:
            return body
        proxies = self.config.egress_proxies
        if not isinstance(via, str) or via not in proxies:
            known = ", ".join(sorted(proxies)) or "none are configured"
            shown = repr(via) if isinstance(via, str) and is_valid_name(via) else "that value"
            raise ChangeRejected(422, "via must name an egress proxy of the config file; "
                                      "nothing was changed",
                                 [f"via: no egress proxy named {shown} (known: {known})"])
        body["via"] = via
        return body

    def _managed_secrets(self) -> Iterator[Path]:
        """The secret files this module wrote that the live config names."""
        for path in _secret_paths(self.config):
            path = Path(os.path.normpath(path))
            if self.is_managed(path) and _MANAGED_SECRET.fullmatch(path.name):
                yield path


def _new_destination_words(key: destinations.Key, new: destinations.Destination,
                           seen: set[destinations.Destination]) -> str:
    kind, name = key
    shown = "; ".join(sorted(d.describe() for d in seen)) or "none"
    if kind == "oauth_endpoint":
        return (f"OAuth definition {name!r} holds a secret from the config file; its token "
                f"endpoint (token_url, discover_from) can only be changed to one it already "
                f"uses, through the same egress proxy and with the same TLS trust ({shown}), "
                f"not {new.describe()}; to use another, edit the config file")
    return (f"{KIND_WORDS[kind]} {name!r} holds a secret from the config file; the API and "
            f"the dashboard assign it only to connections to the upstreams it is already "
            f"used with, through the same egress proxy and with the same TLS trust ({shown}), "
            f"not {new.describe()}; to use it with another server, edit the config file")


def validate_ca_pem(pem: bytes) -> list[CertificateInfo]:
    """A CA bundle upload: PEM, parses, and every certificate in it is a CA certificate."""
    if len(pem) > MAX_UPLOAD_BYTES:
        raise ChangeRejected(413, f"the CA bundle is larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        certs = parse_ca_bundle(pem, "the uploaded CA bundle")
    except TlsMaterialError as exc:
        raise ChangeRejected(422, str(exc)) from None
    not_ca = [c.subject for c in certs if not c.is_ca]
    if not_ca:
        raise ChangeRejected(422, "the uploaded bundle must contain only CA certificates; "
                                  f"these are not CAs: {'; '.join(not_ca)}")
    return certs


def _check_private_key(pem: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if len(pem) > MAX_UPLOAD_BYTES:
        raise ChangeRejected(413, f"the private key is larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError):
        raise ChangeRejected(422, "private_key_pem is not an unencrypted PEM private key") \
            from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ChangeRejected(422, "private_key_pem must be an RSA (RS384) or EC P-384 (ES384) "
                                  "key")


def _pop_secret(body: dict[str, Any], key: str) -> str | None:
    value = body.pop(key, None)
    if value is None:
        return None
    if not isinstance(value, str) or not value or value in ("set", "not set"):
        raise ChangeRejected(422, f"{key} must be a non-empty string (the new secret); leave "
                                  "it out to keep the current one")
    if "\x00" in value:
        raise ChangeRejected(422, f"{key} must not contain NUL characters")
    return value


def secret_state(file: Path | None, env: str | None, inline: str | None) -> SecretState:
    """``"set"`` when the secret can be read now, else ``"not set"``: never the value."""
    if inline:
        return "set"
    if env is not None:
        return "set" if os.environ.get(env) else "not set"
    if file is None:
        return "not set"
    try:
        read_secret_file(file)
    except SecretError:
        return "not set"
    return "set"


def _secret_paths(config: SidecarConfig) -> Iterator[Path]:
    for definition in (*config.basic_auth.values(), *config.oauth.values()):
        for field_name, value in definition:
            if field_name.endswith("_file") and isinstance(value, Path):
                yield value


def _section(data: dict[str, Any], kind: str) -> dict[str, Any]:
    section = data.get(kind)
    if section is None:
        data[kind] = section = {}
    if not isinstance(section, dict):
        raise ChangeRejected(409, f"the config file's {kind} section is not a mapping; fix it "
                                  "first")
    return section


def _writable(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    # Root passes access(2) for any mode; a file nobody may write is meant to stay as it is.
    return os.access(path, os.W_OK) and bool(mode & 0o222)


def _mode_of(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        return 0o600


def _atomic_write(target: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
