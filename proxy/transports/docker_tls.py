"""TLS settings for one registry host, found as containers/image finds them.

Trust starts from the system store. A certificate directory adds to it: every
``*.crt`` is a CA, every ``*.cert`` is a client certificate whose key is the
``*.key`` of the same stem. The directory is ``--cert-dir`` when given, else
the first of ``CERTS_D_ROOTS/HOST[:PORT]`` that exists, where the roots are
``~/.config/containers/certs.d``, ``/etc/containers/certs.d`` and
``/etc/docker/certs.d`` (``IMAGE_PROXY_CERTS_D``, a colon-separated list,
replaces them so tests never touch ``/etc``).

Whether a host is insecure follows containers/image: ``--tls-verify=false``
says so, else a ``[[registry]]`` entry of registries.conf whose prefix matches
the repository with ``insecure = true``. Only an insecure host may be reached
over plain HTTP, and only after HTTPS failed. ``localhost`` and ``127.0.0.1``
get no special treatment: containers/image gives them none either (Docker's
daemon does, which is why pushing there with Docker needs no flag), so a
local plain-HTTP registry needs ``--tls-verify=false`` with skopeo and here.

Known shortcoming: of registries.conf only ``insecure`` and ``blocked`` are
read, from the main file (``CONTAINERS_REGISTRIES_CONF`` or
``/etc/containers/registries.conf``); drop-in directories, mirrors and
``location`` rewrites are not applied, so such entries do not redirect pulls.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ClientError, SourceError
from proxy.transports.base import SystemContext

CERTS_D_ENV = "IMAGE_PROXY_CERTS_D"
REGISTRIES_CONF_ENV = "CONTAINERS_REGISTRIES_CONF"
DEFAULT_REGISTRIES_CONF = "/etc/containers/registries.conf"


def certs_d_roots() -> list[Path]:
    """Where per-host certificate directories are looked for, in order."""
    configured = os.environ.get(CERTS_D_ENV)
    if configured is not None:
        return [Path(root) for root in configured.split(":") if root]
    return [
        Path.home() / ".config/containers/certs.d",
        Path("/etc/containers/certs.d"),
        Path("/etc/docker/certs.d"),
    ]


def cert_dir_for(host: str, context: SystemContext) -> Path | None:
    """The certificate directory that applies to ``host`` (HOST[:PORT])."""
    if context.cert_dir:
        return Path(context.cert_dir)
    for root in certs_d_roots():
        candidate = root / host
        if candidate.is_dir():
            return candidate
    return None


@dataclass(frozen=True)
class RegistryConfEntry:
    """The part of a registries.conf ``[[registry]]`` entry we apply."""

    prefix: str
    insecure: bool
    blocked: bool


def _registries_conf_path() -> str:
    return os.environ.get(REGISTRIES_CONF_ENV) or DEFAULT_REGISTRIES_CONF


def find_registry_entry(repository: str) -> RegistryConfEntry | None:
    """The registries.conf entry with the longest prefix matching ``repository``
    (``HOST[:PORT]/PATH``), as containers/image picks one."""
    path = _registries_conf_path()
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClientError(f"loading registries configuration {path}: {exc}") from None
    try:
        document = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ClientError(f"loading registries configuration {path}: {exc}") from None
    best: RegistryConfEntry | None = None
    for entry in document.get("registry", []):
        if not isinstance(entry, dict):
            continue
        prefix = str(entry.get("prefix") or entry.get("location") or "")
        if not prefix or not _prefix_matches(prefix, repository):
            continue
        if best is None or len(prefix) > len(best.prefix):
            best = RegistryConfEntry(
                prefix, bool(entry.get("insecure")), bool(entry.get("blocked"))
            )
    return best


def _prefix_matches(prefix: str, repository: str) -> bool:
    if prefix.startswith("*."):
        host = repository.split("/", 1)[0]
        return host.endswith(prefix[1:])
    return repository == prefix or repository.startswith(prefix.rstrip("/") + "/")


@dataclass(frozen=True)
class TLSSettings:
    """How to reach one registry: the SSL context and whether HTTP may follow."""

    ssl_context: ssl.SSLContext
    #: TLS certificates are not verified and plain HTTP is tried when HTTPS fails.
    insecure: bool


def tls_settings(host: str, repository: str, context: SystemContext) -> TLSSettings:
    """Build the TLS settings for ``host`` serving ``repository``."""
    entry = find_registry_entry(repository)
    if entry is not None and entry.blocked:
        raise ClientError(
            f"registry {entry.prefix} is blocked in {_registries_conf_path()}"
        )
    if context.tls_verify is not None:
        insecure = not context.tls_verify
    else:
        insecure = entry is not None and entry.insecure

    ssl_context = ssl.create_default_context()
    cert_dir = cert_dir_for(host, context)
    if cert_dir is not None:
        _load_cert_dir(ssl_context, cert_dir)
    if insecure:
        ssl_context.check_hostname = False
        ssl_context.verify_mode = ssl.CERT_NONE
    return TLSSettings(ssl_context, insecure)


def _load_cert_dir(ssl_context: ssl.SSLContext, cert_dir: Path) -> None:
    """Add the CAs and the client certificate pairs of ``cert_dir``."""
    try:
        names = sorted(os.listdir(cert_dir))
    except FileNotFoundError:
        # A named --cert-dir that does not exist adds nothing, as in
        # containers/image.
        return
    except OSError as exc:
        raise ClientError(f"reading certificate directory {cert_dir}: {exc}") from None
    for name in names:
        path = cert_dir / name
        try:
            if name.endswith(".crt"):
                ssl_context.load_verify_locations(cafile=str(path))
            elif name.endswith(".cert"):
                key = name.removesuffix(".cert") + ".key"
                if key not in names:
                    raise ClientError(
                        f"missing key {key} for client certificate {name}. "
                        "Note that CA certificates should use the extension .crt"
                    )
                ssl_context.load_cert_chain(str(path), str(cert_dir / key))
            elif name.endswith(".key"):
                cert = name.removesuffix(".key") + ".cert"
                if cert not in names:
                    raise ClientError(
                        f"missing client certificate {cert} for key {name}"
                    )
        except (ssl.SSLError, OSError) as exc:
            raise SourceError(f"loading certificate {path}: {exc}") from None
