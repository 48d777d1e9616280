"""A real registry for the docker:// tests, and what it needs around it.

:func:`run_registry` starts Debian's ``docker-registry`` (distribution 2.8)
on a free loopback port with a configuration written for the test: plain
HTTP, TLS with a certificate from a CA the test made (optionally requiring
client certificates), basic authentication from an ``htpasswd`` file, or
bearer tokens from :class:`TokenIssuer`, a small token server the test runs.
Images get in with Debian's ``skopeo copy``. :class:`BlobStore` serves the
registry's blob files from a second loopback port, for registries that
redirect blob downloads elsewhere.

Certificates and keys come from the ``openssl`` command; tokens are JWTs
signed RS256 with ``openssl dgst``, with the signing certificate in the
``x5c`` header so the registry checks it against its root bundle.
Nothing here listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

STARTUP_DEADLINE = 20.0


def require_tool(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs the {tool} command (Debian package in scripts/test)")


def run(*command: str, stdin: bytes | None = None) -> bytes:
    """Run ``command``; a failure fails the test with its output."""
    result = subprocess.run(command, input=stdin, capture_output=True)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed with status {result.returncode}:\n"
            f"{result.stdout.decode(errors='replace')}"
            f"{result.stderr.decode(errors='replace')}",
            pytrace=False,
        )
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# --- certificates -------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str) -> KeyPair:
    """A self-signed CA certificate and its key."""
    require_tool("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    run(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", str(pair.key), "-out", str(pair.cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def issue_certificate(
    ca: KeyPair, directory: Path, stem: str, *, client: bool = False
) -> KeyPair:
    """A certificate for 127.0.0.1 and localhost (server), or a client one."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / f"{stem}.key"
    request = directory / f"{stem}.csr"
    cert = directory / f"{stem}.{'cert' if client else 'crt'}"
    extensions = directory / f"{stem}.ext"
    usage = "clientAuth" if client else "serverAuth"
    extensions.write_text(
        f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"
    )
    run(
        "openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes",
        "-subj", f"/CN={stem}", "-keyout", str(key), "-out", str(request),
    )  # fmt: skip
    run(
        "openssl", "x509", "-req", "-in", str(request), "-CA", str(ca.cert),
        "-CAkey", str(ca.key), "-CAcreateserial", "-days", "2",
        "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    request.unlink()
    extensions.unlink()
    return KeyPair(cert, key)


def htpasswd_file(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file with bcrypt hashes, as docker-registry requires."""
    require_tool("htpasswd")
    lines = [
        run("htpasswd", "-Bbn", user, password).decode().strip()
        for user, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the token issuer ---------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class TokenRequest:
    scope: str
    user: str | None


class TokenIssuer:
    """Issues registry bearer tokens: every action asked for to a known user
    with the right password, none to anonymous clients, 401 to a wrong
    password. Each request is logged."""

    service = "image-proxy-tests"
    issuer = "image-proxy-test-issuer"

    def __init__(self, directory: Path, users: dict[str, str]) -> None:
        require_tool("openssl")
        directory.mkdir(parents=True, exist_ok=True)
        self.signing = make_ca(directory, "token-signer")
        der = run("openssl", "x509", "-in", str(self.signing.cert), "-outform", "DER")
        self._x5c = base64.b64encode(der).decode()
        self.users = users
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                issuer._answer(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def sign(self, access: list[dict[str, Any]], subject: str = "") -> str:
        """A JWT the registry accepts, granting ``access``."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = ".".join(
            _b64url(json.dumps(part).encode()) for part in (header, claims)
        )
        signature = run(
            "openssl", "dgst", "-sha256", "-sign", str(self.signing.key),
            stdin=signing_input.encode(),
        )  # fmt: skip
        return f"{signing_input}.{_b64url(signature)}"

    def pull_token(self, repository: str) -> str:
        return self.sign(
            [{"type": "repository", "name": repository, "actions": ["pull"]}]
        )

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        scopes = query.get("scope", [])
        user = self._user(handler.headers.get("Authorization"))
        with self._lock:
            self.requests.extend(TokenRequest(scope, user or None) for scope in scopes)
        if user is None:
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"bad password"}]}'
            handler.send_response(401)
        else:
            access = [] if not user else [_access(scope) for scope in scopes]
            token = self.sign(access, user)
            body = json.dumps({"token": token, "expires_in": 600}).encode()
            handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _user(self, authorization: str | None) -> str | None:
        """The user name, ``""`` for anonymous, ``None`` for a wrong password."""
        if not authorization:
            return ""
        if not authorization.startswith("Basic "):
            return None
        decoded = base64.b64decode(authorization[6:]).decode()
        user, _, password = decoded.partition(":")
        return user if self.users.get(user) == password else None

    def scopes_requested(self) -> list[str]:
        with self._lock:
            return [request.scope for request in self.requests]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _access(scope: str) -> dict[str, Any]:
    kind, name, actions = scope.split(":")
    return {"type": kind, "name": name, "actions": actions.split(",")}


# --- the registry -------------------------------------------------------------


@dataclass
class Registry:
    """A running docker-registry."""

    host: str
    storage: Path
    log: Path
    scheme: str
    process: subprocess.Popen[bytes] = field(repr=False)

    def reference(self, name: str) -> str:
        return f"docker://{self.host}/{name}"

    def blob_file(self, digest: str) -> Path:
        algorithm, hex_part = digest.split(":", 1)
        return (
            self.storage
            / "docker/registry/v2/blobs"
            / algorithm
            / hex_part[:2]
            / hex_part
            / "data"
        )


@contextmanager
def run_registry(
    directory: Path,
    *,
    tls: KeyPair | None = None,
    client_ca: Path | None = None,
    htpasswd: Path | None = None,
    token: TokenIssuer | None = None,
) -> Iterator[Registry]:
    """Start docker-registry with the given features; stopped on exit."""
    require_tool("docker-registry")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    http: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": "image-proxy"}
    if tls is not None:
        http["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
        if client_ca is not None:
            http["tls"]["clientcas"] = [str(client_ca)]
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(directory / "storage")}},
        "http": http,
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "tests", "path": str(htpasswd)}}
    if token is not None:
        config["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.signing.cert),
            }
        }
    # JSON is YAML, which is what docker-registry reads.
    config_path = directory / "config.yml"
    config_path.write_text(json.dumps(config))
    log_path = directory / "registry.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["docker-registry", "serve", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    registry = Registry(
        f"127.0.0.1:{port}",
        directory / "storage",
        log_path,
        "https" if tls else "http",
        process,
    )
    try:
        _wait_until_listening(registry)
        yield registry
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_listening(registry: Registry) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE
    host, port = registry.host.split(":")
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            break
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail(
        f"docker-registry did not start on {registry.host}:\n"
        f"{registry.log.read_text(errors='replace')}",
        pytrace=False,
    )


def skopeo_copy(source: str, destination: str, *options: str) -> None:
    """``skopeo copy`` with Debian's skopeo; policy checks off."""
    require_tool("skopeo")
    run("skopeo", "--insecure-policy", "copy", "-q", *options, source, destination)


# --- a second server that blobs are redirected to ------------------------------


class BlobStore:
    """Serves ``GET /blobs/DIGEST`` from a registry's storage on another port,
    logging each request's path and ``Authorization`` header."""

    def __init__(self, registry: Registry) -> None:
        self.requests: list[tuple[str, str | None]] = []
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                store.requests.append((self.path, self.headers.get("Authorization")))
                digest = self.path.rsplit("/", 1)[-1]
                path = registry.blob_file(digest)
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                content = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/blobs/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
