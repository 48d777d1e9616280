"""Registry credentials and authentication challenges, as containers tools use them.

Credentials come from the first source that has any, in skopeo's order:
``--no-creds`` (anonymous), ``--creds USER[:PASSWORD]``,
``--username``/``--password``, then auth files. ``--authfile`` (or
``REGISTRY_AUTH_FILE``, which skopeo makes its default) names the only file
read; otherwise ``$XDG_RUNTIME_DIR/containers/auth.json`` (or
``/run/containers/UID/auth.json``), ``$XDG_CONFIG_HOME/containers/auth.json``,
``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, and the legacy
``~/.dockercfg`` are read in that order. In each file the most specific key
wins: ``HOST/NAMESPACE/REPO``, then its parent namespaces, then ``HOST``
(Docker's ``https://HOST/v1/`` spelling counts as ``HOST``).
``--registry-token`` is a bearer token sent as it is, with no exchange.

Known shortcomings: credential helpers (``credHelpers``, ``credsStore``) and
OAuth identity tokens are refused with an error naming the file and the
entry, because running helper programs is not implemented; pass ``--creds``
or an auth file entry instead.

``parse_challenges`` reads ``WWW-Authenticate`` (RFC 7235: several
challenges, quoted-string parameters with backslash escapes) in one pass over
the header, O(n).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import ClientError, UnsupportedError
from proxy.transports.base import SystemContext


@dataclass(frozen=True)
class Credentials:
    """What a request may authenticate with; all empty means anonymous."""

    username: str = ""
    password: str = ""
    #: A bearer token given with --registry-token, used without any exchange.
    registry_token: str = ""

    @property
    def has_password(self) -> bool:
        return bool(self.username or self.password)


@dataclass(frozen=True)
class AuthFile:
    path: Path
    #: ~/.dockercfg: the ``auths`` map is the whole document.
    legacy_format: bool = False


def auth_file_paths(context: SystemContext) -> list[AuthFile]:
    """The auth files to read, in order."""
    explicit = context.authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if explicit:
        return [AuthFile(Path(explicit))]
    home = Path.home()
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    primary = (
        Path(runtime_dir) / "containers/auth.json"
        if runtime_dir
        else Path(f"/run/containers/{os.getuid()}/auth.json")
    )
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    docker_config = os.environ.get("DOCKER_CONFIG")
    docker_file = (
        Path(docker_config) / "config.json"
        if docker_config
        else home / ".docker/config.json"
    )
    return [
        AuthFile(primary),
        AuthFile(config_home / "containers/auth.json"),
        AuthFile(docker_file),
        AuthFile(home / ".dockercfg", legacy_format=True),
    ]


def lookup_keys(repository: str) -> list[str]:
    """Auth file keys for ``HOST/PATH``, most specific first."""
    keys = [repository]
    while "/" in repository:
        repository = repository.rsplit("/", 1)[0]
        keys.append(repository)
    return keys


def _normalise_key(key: str) -> str:
    """Docker writes ``https://HOST/v1/``; containers/image reads it as HOST."""
    for scheme in ("http://", "https://"):
        if key.startswith(scheme):
            return key.removeprefix(scheme).split("/", 1)[0]
    return key


def _decode_auth(value: str, path: Path, key: str) -> Credentials:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ClientError(f'invalid "auth" value for {key} in {path}') from None
    username, separator, password = decoded.partition(":")
    if not separator:
        raise ClientError(f'invalid "auth" value for {key} in {path}: no colon')
    return Credentials(username, password.strip())


@dataclass
class _ParsedFile:
    auths: dict[str, dict[str, object]] = field(default_factory=dict)
    cred_helpers: dict[str, str] = field(default_factory=dict)
    creds_store: str = ""


def _read_auth_file(auth_file: AuthFile) -> _ParsedFile | None:
    try:
        raw = auth_file.path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClientError(f"reading JSON file {auth_file.path}: {exc}") from None
    try:
        document = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise ClientError(f"unmarshaling JSON at {auth_file.path}: {exc}") from None
    if not isinstance(document, dict):
        raise ClientError(f"unmarshaling JSON at {auth_file.path}: not an object")
    if auth_file.legacy_format:
        return _ParsedFile(auths=_string_keyed(document))
    helpers = document.get("credHelpers") or {}
    return _ParsedFile(
        auths=_string_keyed(document.get("auths") or {}),
        cred_helpers={str(k): str(v) for k, v in dict(helpers).items()},
        creds_store=str(document.get("credsStore") or ""),
    )


def _string_keyed(entries: object) -> dict[str, dict[str, object]]:
    if not isinstance(entries, dict):
        return {}
    return {
        _normalise_key(str(key)): value
        for key, value in entries.items()
        if isinstance(value, dict)
    }


def _from_file(
    auth_file: AuthFile, parsed: _ParsedFile, repository: str
) -> Credentials | None:
    host = repository.split("/", 1)[0]
    helper = parsed.cred_helpers.get(host)
    if helper:
        raise UnsupportedError(
            f'{auth_file.path} names credential helper "docker-credential-{helper}" '
            f"for {host}: image-proxy does not run credential helpers; "
            "pass --creds or add an auths entry instead"
        )
    for key in lookup_keys(repository):
        entry = parsed.auths.get(key)
        if entry is None:
            continue
        if entry.get("identitytoken"):
            raise UnsupportedError(
                f"{auth_file.path} holds an OAuth identity token for {key}: "
                "image-proxy cannot exchange it; pass --creds instead"
            )
        value = entry.get("auth")
        if isinstance(value, str) and value:
            return _decode_auth(value, auth_file.path, key)
    if parsed.creds_store:
        raise UnsupportedError(
            f'{auth_file.path} sets credsStore "{parsed.creds_store}" and has no '
            f"auths entry for {repository}: image-proxy does not run credential "
            "helpers; pass --creds or add an auths entry instead"
        )
    return None


def credentials_for(repository: str, context: SystemContext) -> Credentials:
    """The credentials to use for ``HOST/PATH`` under ``context``."""
    if context.no_creds:
        return Credentials()
    if context.registry_token:
        return Credentials(registry_token=context.registry_token)
    if context.creds is not None:
        username, _, password = context.creds.partition(":")
        if not username:
            raise ClientError("--creds: username can't be empty")
        return Credentials(username, password)
    if context.username is not None or context.password is not None:
        if not context.username or context.password is None:
            raise ClientError("--username and --password must be given together")
        return Credentials(context.username, context.password)
    for auth_file in auth_file_paths(context):
        parsed = _read_auth_file(auth_file)
        if parsed is None:
            continue
        found = _from_file(auth_file, parsed, repository)
        if found is not None:
            return found
    return Credentials()


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: its scheme (lower case) and params."""

    scheme: str
    params: dict[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Every challenge in one ``WWW-Authenticate`` header value."""
    challenges: list[Challenge] = []
    position = 0
    length = len(header)
    while position < length:
        while position < length and header[position] in " \t,":
            position += 1
        start = position
        while position < length and header[position] not in " \t,=":
            position += 1
        if start == position:
            break
        scheme = header[start:position]
        params, position = _parse_params(header, position)
        challenges.append(Challenge(scheme.lower(), params))
    return challenges


def _parse_params(header: str, position: int) -> tuple[dict[str, str], int]:
    """Parameters after a scheme, up to the next scheme or the end."""
    params: dict[str, str] = {}
    length = len(header)
    while position < length:
        probe = position
        while probe < length and header[probe] in " \t,":
            probe += 1
        start = probe
        while probe < length and header[probe] not in " \t,=":
            probe += 1
        name = header[start:probe]
        while probe < length and header[probe] in " \t":
            probe += 1
        if not name or probe >= length or header[probe] != "=":
            # Not ``name=``: a new challenge starts at ``start``.
            return params, start
        probe += 1
        while probe < length and header[probe] in " \t":
            probe += 1
        value, probe = _parse_value(header, probe)
        params[name.lower()] = value
        position = probe
    return params, position


def _parse_value(header: str, position: int) -> tuple[str, int]:
    length = len(header)
    if position < length and header[position] == '"':
        characters: list[str] = []
        position += 1
        while position < length and header[position] != '"':
            if header[position] == "\\" and position + 1 < length:
                position += 1
            characters.append(header[position])
            position += 1
        return "".join(characters), position + 1
    start = position
    while position < length and header[position] not in " \t,":
        position += 1
    return header[start:position], position


def basic_authorization(credentials: Credentials) -> str:
    """The ``Authorization`` header value for HTTP basic authentication."""
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()
