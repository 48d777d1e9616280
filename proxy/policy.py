"""Signature policy (containers-policy.json) checked when an image is opened.

Requirements are looked up as containers/image does: the transport's scopes
from most to least specific (the image's identity, then its namespaces), then
the transport's ``""`` default, then the global ``default``. Every requirement
in the chosen list must pass.

Known shortcoming: we do not verify signatures yet, so ``signedBy``,
``sigstoreSigned`` and ``signedBaseLayer`` requirements fail the open with a
message that says so, rather than passing an image nobody verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from protocol.errors import ClientError, PolicyError, UnsupportedError

DEFAULT_POLICY_PATH = "/etc/containers/policy.json"

_UNVERIFIABLE = {"signedBy", "sigstoreSigned", "signedBaseLayer"}


class Policy:
    """A parsed policy, or the absence of one under ``--insecure-policy``."""

    def __init__(self, document: dict[str, Any] | None) -> None:
        self._document = document

    @classmethod
    def insecure(cls) -> Policy:
        return cls(None)

    @classmethod
    def load(cls, path: str | None) -> Policy:
        """Read ``path``, or the user's then the system's default policy."""
        if path is None:
            user = (
                Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
                / "containers"
                / "policy.json"
            )
            path = str(user) if user.exists() else DEFAULT_POLICY_PATH
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ClientError(
                f"reading policy file {path}: {exc.strerror or exc}"
            ) from None
        try:
            document = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise ClientError(f"invalid policy in {path}: {exc}") from None
        if not isinstance(document, dict) or not isinstance(
            document.get("default"), list
        ):
            raise ClientError(f'invalid policy in {path}: "default" field is missing')
        return cls(document)

    def requirements_for(self, transport: str, scopes: list[str]) -> list[Any]:
        assert self._document is not None
        transports = self._document.get("transports") or {}
        scoped = transports.get(transport) or {}
        for scope in [*scopes, ""]:
            if scope in scoped:
                return list(scoped[scope])
        return list(self._document["default"])

    def check(self, image_name: str, transport: str, scopes: list[str]) -> None:
        """Raise unless the policy lets ``image_name`` run."""
        if self._document is None:
            return
        requirements = self.requirements_for(transport, scopes)
        if not requirements:
            raise PolicyError(
                f"Running image {image_name} is rejected by policy: no requirements"
            )
        for requirement in requirements:
            kind = requirement.get("type") if isinstance(requirement, dict) else None
            if kind == "insecureAcceptAnything":
                continue
            if kind == "reject":
                raise PolicyError(f"Running image {image_name} is rejected by policy.")
            if kind in _UNVERIFIABLE:
                raise UnsupportedError(
                    f"Running image {image_name} needs a {kind} signature check, "
                    "which image-proxy cannot do yet: refused"
                )
            raise ClientError(f"policy requirement type {kind!r} is unknown")


def path_scopes(path: str) -> list[str]:
    """Scopes for a path-based transport: the path, then its parents."""
    resolved = os.path.realpath(path)
    scopes = [resolved]
    while resolved != "/":
        resolved = os.path.dirname(resolved)
        scopes.append(resolved)
    return scopes
