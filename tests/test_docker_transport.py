"""The docker:// transport against a real registry, with auth, TLS and faults.

Registries are Debian's ``docker-registry`` started by the fixtures of
tests/registry.py on loopback ports, filled with Debian's ``skopeo copy``.
Expected values come from elsewhere than the code under test: the OCI layout
files (read with ``json`` and ``hashlib``), skopeo's own answers to the same
calls, the registry's storage, containers-policy.json(5) and RFC 7235.

Faults are injected at the socket by tests/faults.py, a forwarding proxy in
front of the registry; every fault ends in a successful retry or a clear
error, and the bounds that make that quick (idle timeout, retries, backoff)
are shortened through the environment the proxy inherits.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from protocol.errors import ClientError, UnsupportedError
from protocol.jsonrpc import RpcError
from proxy.client import ProxyProcess
from proxy.pull import pull
from proxy.transports.base import SystemContext
from proxy.transports.docker import parse_docker_reference, policy_scopes_of
from proxy.transports.docker_auth import credentials_for, parse_challenges
from tests.api_helpers import describe_tree
from tests.faults import FaultProxy, Rule, fault_proxy
from tests.images import DebianImage, ImageSet
from tests.legacy_helpers import (
    SKOPEO,
    Call,
    Finish,
    image_manifest_descriptor,
    read_and_finish,
    record,
)
from tests.registry import (
    BlobStore,
    KeyPair,
    Registry,
    TokenIssuer,
    htpasswd_file,
    issue_certificate,
    make_ca,
    run_registry,
    skopeo_copy,
)

pytestmark = pytest.mark.anyio

USER, PASSWORD = "alice", "wonderland"
INSECURE = "--tls-verify=false"
NO_TLS_PUSH = "--dest-tls-verify=false"


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def quick_registry_bounds(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Short idle timeout and backoff for the proxies these tests spawn, and
    no auth file or certs.d from the machine's user."""
    monkeypatch.setenv("IMAGE_PROXY_REGISTRY_IDLE_TIMEOUT", "1")
    monkeypatch.setenv("IMAGE_PROXY_REGISTRY_RETRIES", "2")
    monkeypatch.setenv("IMAGE_PROXY_REGISTRY_BACKOFF", "0.05")
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("IMAGE_PROXY_CERTS_D", str(home / "certs.d"))
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(home / "registries.conf"))
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)


@pytest.fixture(scope="module")
def plain_registry(
    tmp_path_factory: pytest.TempPathFactory,
    debian_image: DebianImage,
    test_images: ImageSet,
) -> Iterator[Registry]:
    """Plain HTTP, anonymous: the Debian image as pushed (OCI) and as Docker
    schema 2, and the synthetic multi-architecture image."""
    with run_registry(tmp_path_factory.mktemp("plain")) as registry:
        skopeo_copy(
            debian_image.reference, registry.reference("debian:bookworm"), NO_TLS_PUSH
        )
        skopeo_copy(
            debian_image.reference,
            registry.reference("debian-v2s2:bookworm"),
            NO_TLS_PUSH,
            "--format",
            "v2s2",
        )
        skopeo_copy(
            test_images["multiarch"].reference,
            registry.reference("multiarch:latest"),
            NO_TLS_PUSH,
            "--all",
        )
        yield registry


@dataclass(frozen=True)
class TLSRegistry:
    registry: Registry
    ca: KeyPair
    client: KeyPair


@pytest.fixture(scope="module")
def tls_registry(
    tmp_path_factory: pytest.TempPathFactory, test_images: ImageSet
) -> Iterator[TLSRegistry]:
    """HTTPS with a certificate from a CA made here."""
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory / "ca", "image-proxy-test-ca")
    server = issue_certificate(ca, directory / "server", "registry")
    client = issue_certificate(ca, directory / "client", "client", client=True)
    with run_registry(directory / "registry", tls=server) as registry:
        skopeo_copy(
            test_images["basic"].reference,
            registry.reference("basic:latest"),
            NO_TLS_PUSH,
        )
        yield TLSRegistry(registry, ca, client)


@pytest.fixture(scope="module")
def mtls_registry(
    tmp_path_factory: pytest.TempPathFactory, test_images: ImageSet
) -> Iterator[TLSRegistry]:
    """HTTPS that also requires a client certificate signed by the CA."""
    directory = tmp_path_factory.mktemp("mtls")
    ca = make_ca(directory / "ca", "image-proxy-test-ca")
    server = issue_certificate(ca, directory / "server", "registry")
    client = issue_certificate(ca, directory / "client", "client", client=True)
    cert_dir = directory / "push-certs"
    cert_dir.mkdir()
    for source in (ca.cert, client.cert, client.key):
        (cert_dir / source.name).write_bytes(source.read_bytes())
    with run_registry(
        directory / "registry", tls=server, client_ca=ca.cert
    ) as registry:
        skopeo_copy(
            test_images["basic"].reference,
            registry.reference("basic:latest"),
            "--dest-cert-dir",
            str(cert_dir),
        )
        yield TLSRegistry(registry, ca, client)


@pytest.fixture(scope="module")
def basic_auth_registry(
    tmp_path_factory: pytest.TempPathFactory, test_images: ImageSet
) -> Iterator[Registry]:
    """Plain HTTP with htpasswd (bcrypt) basic authentication."""
    directory = tmp_path_factory.mktemp("basic-auth")
    users = htpasswd_file(directory / "htpasswd", {USER: PASSWORD})
    with run_registry(directory / "registry", htpasswd=users) as registry:
        skopeo_copy(
            test_images["basic"].reference,
            registry.reference("team/basic:latest"),
            NO_TLS_PUSH,
            "--dest-creds",
            f"{USER}:{PASSWORD}",
        )
        yield registry


@dataclass(frozen=True)
class TokenRegistry:
    registry: Registry
    issuer: TokenIssuer


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, test_images: ImageSet
) -> Iterator[TokenRegistry]:
    """Plain HTTP with bearer tokens from a token issuer run by the test."""
    directory = tmp_path_factory.mktemp("token")
    issuer = TokenIssuer(directory / "issuer", {USER: PASSWORD})
    try:
        with run_registry(directory / "registry", token=issuer) as registry:
            skopeo_copy(
                test_images["basic"].reference,
                registry.reference("basic:latest"),
                NO_TLS_PUSH,
                "--dest-creds",
                f"{USER}:{PASSWORD}",
            )
            yield TokenRegistry(registry, issuer)
    finally:
        issuer.close()


@asynccontextmanager
async def proxy(*args: str, command: list[str] | None = None) -> AsyncIterator[Any]:
    async with ProxyProcess.spawn(
        ["--insecure-policy", *args], command=command
    ) as spawned:
        await spawned.legacy.initialize()
        yield spawned


def layer_digests(layout: Path) -> list[str]:
    descriptor = image_manifest_descriptor(layout)
    manifest = json.loads(
        (layout / "blobs" / descriptor["digest"].replace(":", "/")).read_bytes()
    )
    return [layer["digest"] for layer in manifest["layers"]]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def open_and_fetch_layer(
    client: Any, image: str, digest: str, size: int
) -> tuple[Call, Call]:
    """OpenImage then GetBlob of one layer, both recorded."""
    opened = await record(client, "OpenImage", image)
    fetched = await record(client, "GetBlob", opened.value, digest, size)
    return opened, fetched


# --- references, scopes, challenges, credentials (no network) -----------------


def test_reference_must_start_with_two_slashes() -> None:
    with pytest.raises(ClientError, match="does not start with //"):
        parse_docker_reference("127.0.0.1:5000/debian:bookworm")


def test_reference_without_tag_means_latest_and_docker_io_gains_library() -> None:
    reference = parse_docker_reference("//debian")
    assert (reference.host, reference.repository, reference.tag) == (
        "docker.io",
        "library/debian",
        "latest",
    )
    assert reference.endpoint == "registry-1.docker.io"


def test_reference_keeps_host_port_and_digest() -> None:
    digest = "sha256:" + "a" * 64
    reference = parse_docker_reference(f"//localhost:5000/ns/app@{digest}")
    assert (reference.host, reference.repository, reference.tag_or_digest) == (
        "localhost:5000",
        "ns/app",
        digest,
    )


@pytest.mark.parametrize(
    "text",
    ["//Host.example/UPPER", "//host.example/app:bad tag", "//host.example/app:"],
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(ClientError, match="invalid reference format"):
        parse_docker_reference(text)


def test_reference_with_tag_and_digest_is_refused_as_containers_image_does() -> None:
    with pytest.raises(ClientError, match="both a tag and digest"):
        parse_docker_reference("//host.example/app:1@sha256:" + "b" * 64)


def test_policy_scopes_go_from_identity_to_wildcard_domains() -> None:
    # The order containers-policy.json(5) describes for the docker transport.
    reference = parse_docker_reference("//registry.example.com:5000/ns/app:v1")
    assert policy_scopes_of(reference) == [
        "registry.example.com:5000/ns/app:v1",
        "registry.example.com:5000/ns/app",
        "registry.example.com:5000/ns",
        "registry.example.com:5000",
        "*.example.com",
        "*.com",
    ]


def test_policy_scope_of_a_digest_reference_names_the_digest() -> None:
    digest = "sha256:" + "c" * 64
    reference = parse_docker_reference(f"//quay.example/app@{digest}")
    assert policy_scopes_of(reference)[0] == f"quay.example/app@{digest}"


def test_challenges_with_quoted_commas_and_several_schemes_are_split() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="reg, 1",'
        'scope="repository:a/b:pull,push", Basic realm="x\\"y"'
    )
    challenges = parse_challenges(header)
    assert [(c.scheme, c.params) for c in challenges] == [
        (
            "bearer",
            {
                "realm": "https://auth.example/token",
                "service": "reg, 1",
                "scope": "repository:a/b:pull,push",
            },
        ),
        ("basic", {"realm": 'x"y'}),
    ]


def write_auth_file(path: Path, entries: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


def auth_entry(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_most_specific_auth_file_key_wins(tmp_path: Path) -> None:
    authfile = write_auth_file(
        tmp_path / "auth.json",
        {
            "auths": {
                "reg.example": auth_entry("host", "1"),
                "reg.example/team": auth_entry("team", "2"),
                "reg.example/team/app": auth_entry("app", "3"),
            }
        },
    )
    context = SystemContext(authfile=str(authfile))
    assert credentials_for("reg.example/team/app", context).username == "app"
    assert credentials_for("reg.example/team/other", context).username == "team"
    assert credentials_for("reg.example/solo", context).username == "host"


def test_auth_files_are_read_in_containers_order(tmp_path: Path) -> None:
    home = Path(os.environ["HOME"])
    write_auth_file(
        home / ".docker/config.json",
        {"auths": {"https://reg.example/v1/": auth_entry("docker", "1")}},
    )
    context = SystemContext()
    assert credentials_for("reg.example/app", context).username == "docker"
    write_auth_file(
        home / ".config/containers/auth.json",
        {"auths": {"reg.example": auth_entry("containers", "2")}},
    )
    assert credentials_for("reg.example/app", context).username == "containers"


def test_flags_override_auth_files_and_no_creds_overrides_all(tmp_path: Path) -> None:
    authfile = write_auth_file(
        tmp_path / "auth.json", {"auths": {"reg.example": auth_entry("file", "1")}}
    )
    with_creds = SystemContext(authfile=str(authfile), creds="flag:2")
    assert credentials_for("reg.example/app", with_creds).username == "flag"
    anonymous = SystemContext(authfile=str(authfile), creds="flag:2", no_creds=True)
    assert not credentials_for("reg.example/app", anonymous).has_password


@pytest.mark.parametrize(
    "document",
    [
        {"credHelpers": {"reg.example": "secretservice"}},
        {"credsStore": "desktop"},
        {"auths": {"reg.example": {"identitytoken": "opaque"}}},
    ],
)
def test_credential_helpers_are_refused_with_the_file_named(
    tmp_path: Path, document: dict[str, object]
) -> None:
    authfile = write_auth_file(tmp_path / "config.json", document)
    with pytest.raises(UnsupportedError, match=str(authfile)):
        credentials_for("reg.example/app", SystemContext(authfile=str(authfile)))


# --- plain HTTP: the Debian image, against skopeo -----------------------------


@pytest.mark.parametrize("repository", ["debian", "debian-v2s2"])
async def test_legacy_transcript_matches_skopeo(
    plain_registry: Registry, debian_image: DebianImage, repository: str
) -> None:
    image = plain_registry.reference(f"{repository}:bookworm")

    async def transcript(command: list[str] | None) -> list[Call]:
        async with proxy(INSECURE, command=command) as spawned:
            client = spawned.legacy
            opened = await record(client, "OpenImage", image)
            calls = [opened]
            for method in ("GetManifest", "GetConfig"):
                calls.append(await record(client, method, opened.value))
            calls.append(
                await record(
                    client,
                    "GetBlob",
                    opened.value,
                    debian_image.layer_digest,
                    debian_image.path.joinpath(
                        "blobs", *debian_image.layer_digest.split(":")
                    )
                    .stat()
                    .st_size,
                )
            )
            return [call.normalised() for call in calls]

    ours = await transcript(None)
    theirs = await transcript(SKOPEO)
    assert ours == theirs
    assert ours[-1].finish is not None and ours[-1].finish.success
    assert ours[-1].payload is not None
    assert sha256(ours[-1].payload) == debian_image.layer_digest


async def test_pull_from_registry_gives_the_tree_pull_from_oci_gives(
    plain_registry: Registry, debian_image: DebianImage, tmp_path: Path
) -> None:
    from_registry = tmp_path / "registry"
    from_layout = tmp_path / "layout"
    await pull(
        plain_registry.reference("debian:bookworm"),
        from_registry,
        cache_dir=tmp_path / "cache-registry",
        proxy_args=["--insecure-policy", INSECURE],
    )
    await pull(
        debian_image.reference,
        from_layout,
        cache_dir=tmp_path / "cache-layout",
        proxy_args=["--insecure-policy"],
    )
    assert describe_tree(from_registry) == describe_tree(from_layout)


async def test_manifest_list_resolves_to_this_machines_instance(
    plain_registry: Registry, test_images: ImageSet
) -> None:
    layout = test_images["multiarch"].path
    expected = image_manifest_descriptor(layout)["digest"]
    async with proxy(INSECURE) as spawned:
        opened = await record(
            spawned.legacy, "OpenImage", plain_registry.reference("multiarch:latest")
        )
        manifest = await record(spawned.legacy, "GetManifest", opened.value)
    assert manifest.value == expected
    assert manifest.payload is not None and sha256(manifest.payload) == expected


async def test_unknown_tag_and_repository_are_missing_for_optional_open(
    plain_registry: Registry,
) -> None:
    async with proxy(INSECURE) as spawned:
        for name in ("debian:no-such-tag", "no-such-repository:latest"):
            image_id = await spawned.legacy.open_image(
                plain_registry.reference(name), optional=True
            )
            assert image_id == 0
        failed = await record(
            spawned.legacy, "OpenImage", plain_registry.reference("debian:nope")
        )
    assert not failed.success
    assert failed.error == (
        f"reading manifest nope in {plain_registry.host}/debian: "
        "manifest unknown: manifest unknown"
    )


async def test_plain_http_registry_needs_tls_verify_false_as_with_skopeo(
    plain_registry: Registry,
) -> None:
    image = plain_registry.reference("debian:bookworm")
    for command in (None, SKOPEO):
        async with proxy(command=command) as spawned:
            opened = await record(spawned.legacy, "OpenImage", image)
        assert not opened.success
        assert f"pinging container registry {plain_registry.host}" in opened.error


# --- TLS ------------------------------------------------------------------------


async def test_tls_registry_is_trusted_through_cert_dir(
    tls_registry: TLSRegistry, tmp_path: Path
) -> None:
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(tls_registry.ca.cert.read_bytes())
    image = tls_registry.registry.reference("basic:latest")
    async with proxy("--cert-dir", str(cert_dir)) as spawned:
        opened = await record(spawned.legacy, "OpenImage", image)
        manifest = await record(spawned.legacy, "GetManifest", opened.value)
    assert manifest.finish is not None and manifest.finish.success, manifest


async def test_tls_registry_is_trusted_through_certs_d_host_directory(
    tls_registry: TLSRegistry,
) -> None:
    host_dir = Path(os.environ["IMAGE_PROXY_CERTS_D"]) / tls_registry.registry.host
    host_dir.mkdir(parents=True)
    (host_dir / "ca.crt").write_bytes(tls_registry.ca.cert.read_bytes())
    async with proxy() as spawned:
        opened = await record(
            spawned.legacy, "OpenImage", tls_registry.registry.reference("basic:latest")
        )
    assert opened.success, opened.error


async def test_unknown_ca_is_a_non_retryable_error_and_tls_verify_false_skips_it(
    tls_registry: TLSRegistry,
) -> None:
    image = tls_registry.registry.reference("basic:latest")
    async with proxy() as spawned:
        refused = await record(spawned.legacy, "OpenImage", image)
    assert not refused.success
    assert "certificate verify failed" in refused.error
    assert refused.error_code == "other"
    async with proxy(INSECURE) as spawned:
        accepted = await record(spawned.legacy, "OpenImage", image)
    assert accepted.success, accepted.error


async def test_client_certificate_from_cert_dir_is_presented(
    mtls_registry: TLSRegistry, tmp_path: Path
) -> None:
    image = mtls_registry.registry.reference("basic:latest")
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(mtls_registry.ca.cert.read_bytes())
    async with proxy("--cert-dir", str(cert_dir)) as spawned:
        without = await record(spawned.legacy, "OpenImage", image)
    assert not without.success
    for source in (mtls_registry.client.cert, mtls_registry.client.key):
        (cert_dir / source.name).write_bytes(source.read_bytes())
    async with proxy("--cert-dir", str(cert_dir)) as spawned:
        with_client = await record(spawned.legacy, "OpenImage", image)
    assert with_client.success, with_client.error


# --- basic authentication ---------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["creds", "username-password", "authfile", "env", "xdg-runtime", "docker"]
)
async def test_basic_auth_credentials_from_each_source(
    basic_auth_registry: Registry, tmp_path: Path, how: str, monkeypatch: Any
) -> None:
    host = basic_auth_registry.host
    entry = {"auths": {host: auth_entry(USER, PASSWORD)}}
    args: list[str] = [INSECURE]
    if how == "creds":
        args += ["--creds", f"{USER}:{PASSWORD}"]
    elif how == "username-password":
        args += ["--username", USER, "--password", PASSWORD]
    elif how == "authfile":
        args += ["--authfile", str(write_auth_file(tmp_path / "a.json", entry))]
    elif how == "env":
        monkeypatch.setenv(
            "REGISTRY_AUTH_FILE", str(write_auth_file(tmp_path / "e.json", entry))
        )
    elif how == "xdg-runtime":
        write_auth_file(tmp_path / "run/containers/auth.json", entry)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    else:
        write_auth_file(Path(os.environ["HOME"]) / ".docker/config.json", entry)
    async with proxy(*args) as spawned:
        opened = await record(
            spawned.legacy, "OpenImage", basic_auth_registry.reference("team/basic")
        )
    assert opened.success, opened.error


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--creds", f"{USER}:wrong"],
        ["--no-creds"],
    ],
    ids=["anonymous", "wrong-password", "no-creds"],
)
async def test_refused_credentials_are_an_error_not_a_missing_image(
    basic_auth_registry: Registry, tmp_path: Path, args: list[str]
) -> None:
    authfile = write_auth_file(
        tmp_path / "auth.json",
        {"auths": {basic_auth_registry.host: auth_entry(USER, PASSWORD)}},
    )
    if "--no-creds" in args:
        args = [*args, "--authfile", str(authfile)]
    image = basic_auth_registry.reference("team/basic")
    async with proxy(INSECURE, *args) as spawned:
        optional = await record(spawned.legacy, "OpenImageOptional", image)
    async with proxy(INSECURE, *args, command=SKOPEO) as spawned:
        # skopeo 1.9 has no OpenImageOptional; its OpenImage words the error.
        theirs = await record(spawned.legacy, "OpenImage", image)
    assert not optional.success
    assert optional.error == theirs.error
    assert optional.error == (
        f"reading manifest latest in {basic_auth_registry.host}/team/basic: "
        "unauthorized: authentication required"
    )


# --- bearer tokens ---------------------------------------------------------------


async def test_bearer_token_is_fetched_once_per_scope_with_credentials(
    token_registry: TokenRegistry, test_images: ImageSet
) -> None:
    issuer = token_registry.issuer
    before = len(issuer.scopes_requested())
    layout = test_images["basic"].path
    (layer,) = layer_digests(layout)
    size = (layout / "blobs" / layer.replace(":", "/")).stat().st_size
    async with proxy(INSECURE, "--creds", f"{USER}:{PASSWORD}") as spawned:
        opened, fetched = await open_and_fetch_layer(
            spawned.legacy, token_registry.registry.reference("basic"), layer, size
        )
        config = await record(spawned.legacy, "GetConfig", opened.value)
    assert opened.success and fetched.success and config.success
    assert fetched.payload is not None and sha256(fetched.payload) == layer
    assert issuer.scopes_requested()[before:] == ["repository:basic:pull"]


async def test_bearer_token_denied_to_anonymous_is_an_error(
    token_registry: TokenRegistry,
) -> None:
    async with proxy(INSECURE) as spawned:
        optional = await record(
            spawned.legacy,
            "OpenImageOptional",
            token_registry.registry.reference("basic"),
        )
    assert not optional.success
    assert "unauthorized" in optional.error


async def test_wrong_password_at_the_token_server_says_so(
    token_registry: TokenRegistry,
) -> None:
    async with proxy(INSECURE, "--creds", f"{USER}:wrong") as spawned:
        opened = await record(
            spawned.legacy, "OpenImage", token_registry.registry.reference("basic")
        )
    assert not opened.success
    assert "unable to retrieve auth token: invalid username/password" in opened.error


async def test_registry_token_is_sent_without_asking_the_issuer(
    token_registry: TokenRegistry,
) -> None:
    issuer = token_registry.issuer
    token = issuer.pull_token("basic")
    before = len(issuer.scopes_requested())
    async with proxy(INSECURE, "--registry-token", token) as spawned:
        opened = await record(
            spawned.legacy, "OpenImage", token_registry.registry.reference("basic")
        )
    assert opened.success, opened.error
    assert issuer.scopes_requested()[before:] == []


# --- redirects ---------------------------------------------------------------------


async def test_blobs_are_fetched_from_where_the_registry_redirects(
    plain_registry: Registry, debian_image: DebianImage
) -> None:
    store = BlobStore(plain_registry)
    try:
        with fault_proxy(plain_registry.host) as front:
            front.add(
                Rule(r"/blobs/sha256:", "redirect", times=None, location=store.base_url)
            )
            image = f"docker://{front.host}/debian:bookworm"
            async with proxy(INSECURE) as spawned:
                opened = await record(spawned.legacy, "OpenImage", image)
                config = await record(spawned.legacy, "GetConfig", opened.value)
                size = (
                    debian_image.path.joinpath(
                        "blobs", *debian_image.layer_digest.split(":")
                    )
                    .stat()
                    .st_size
                )
                blob = await record(
                    spawned.legacy,
                    "GetBlob",
                    opened.value,
                    debian_image.layer_digest,
                    size,
                )
    finally:
        store.close()
    assert config.success and blob.success
    assert blob.payload is not None
    assert sha256(blob.payload) == debian_image.layer_digest
    served = [path.rsplit("/", 1)[-1] for path, _ in store.requests]
    assert debian_image.layer_digest in served


async def test_credentials_are_not_sent_to_the_redirect_target(
    basic_auth_registry: Registry, test_images: ImageSet
) -> None:
    layout = test_images["basic"].path
    (layer,) = layer_digests(layout)
    size = (layout / "blobs" / layer.replace(":", "/")).stat().st_size
    store = BlobStore(basic_auth_registry)
    try:
        with fault_proxy(basic_auth_registry.host) as front:
            front.add(
                Rule(r"/blobs/sha256:", "redirect", times=None, location=store.base_url)
            )
            async with proxy(INSECURE, "--creds", f"{USER}:{PASSWORD}") as spawned:
                _, fetched = await open_and_fetch_layer(
                    spawned.legacy, f"docker://{front.host}/team/basic", layer, size
                )
            asked = front.requests_to(r"/blobs/" + layer)
    finally:
        store.close()
    assert fetched.payload is not None and sha256(fetched.payload) == layer
    assert asked and all(entry.authorization for entry in asked)
    assert store.requests and all(auth is None for _, auth in store.requests)


# --- faults ------------------------------------------------------------------------


def layer_size(debian_image: DebianImage) -> int:
    return (
        debian_image.path.joinpath("blobs", *debian_image.layer_digest.split(":"))
        .stat()
        .st_size
    )


async def fetch_layer_through(
    front: FaultProxy, debian_image: DebianImage
) -> tuple[Call, Call]:
    async with proxy(INSECURE) as spawned:
        return await open_and_fetch_layer(
            spawned.legacy,
            f"docker://{front.host}/debian:bookworm",
            debian_image.layer_digest,
            layer_size(debian_image),
        )


async def test_429_with_retry_after_is_retried_after_the_wait(
    plain_registry: Registry, debian_image: DebianImage
) -> None:
    with fault_proxy(plain_registry.host) as front:
        front.add(
            Rule(r"/manifests/", "status", status=429, headers={"Retry-After": "1"})
        )
        opened, fetched = await fetch_layer_through(front, debian_image)
        first, second = front.requests_to(r"/manifests/bookworm")[:2]
    assert opened.success and fetched.success
    assert first.fault == "status" and second.fault is None
    # Retry-After: 1 means not before a second has passed.
    assert second.arrived - first.arrived >= 1.0


async def test_5xx_twice_then_success_is_retried(
    plain_registry: Registry, debian_image: DebianImage
) -> None:
    with fault_proxy(plain_registry.host) as front:
        front.add(Rule(r"/blobs/", "status", status=503, times=2))
        opened, fetched = await fetch_layer_through(front, debian_image)
    assert fetched.finish is not None and fetched.finish.success
    assert fetched.payload is not None
    assert sha256(fetched.payload) == debian_image.layer_digest


async def test_persistent_5xx_is_a_retryable_error(
    plain_registry: Registry,
) -> None:
    with fault_proxy(plain_registry.host) as front:
        front.add(Rule(r"/manifests/", "status", status=500, times=None))
        async with proxy(INSECURE) as spawned:
            opened = await record(
                spawned.legacy, "OpenImage", f"docker://{front.host}/debian:bookworm"
            )
        attempts = len(front.requests_to(r"/manifests/"))
    assert not opened.success
    assert opened.error_code == "retryable"
    assert "500" in opened.error
    # IMAGE_PROXY_REGISTRY_RETRIES=2: the first try and two more.
    assert attempts == 3


@pytest.mark.parametrize("action", ["drop", "truncate", "stall"])
async def test_blob_interrupted_once_is_resumed_with_range(
    plain_registry: Registry, debian_image: DebianImage, action: str
) -> None:
    cut = 5_000_000
    with fault_proxy(plain_registry.host) as front:
        front.add(Rule(r"/blobs/" + debian_image.layer_digest, action, after_bytes=cut))
        opened, fetched = await fetch_layer_through(front, debian_image)
        ranges = [entry.range for entry in front.requests_to(r"/blobs/sha256:defb")]
    assert fetched.finish is not None and fetched.finish.success, fetched.finish
    assert fetched.payload is not None
    assert sha256(fetched.payload) == debian_image.layer_digest
    assert ranges[0] is None and ranges[1] is not None
    resumed_from = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= cut


@pytest.mark.parametrize("action", ["drop", "truncate", "stall"])
async def test_blob_interrupted_every_time_fails_retryable_while_proxy_serves_others(
    plain_registry: Registry, debian_image: DebianImage, action: str
) -> None:
    with fault_proxy(plain_registry.host) as front:
        front.add(
            Rule(
                r"/blobs/" + debian_image.layer_digest,
                action,
                times=None,
                after_bytes=1_000_000,
            )
        )
        async with proxy(INSECURE) as spawned:
            client = spawned.legacy
            image = await client.open_image(f"docker://{front.host}/debian:bookworm")
            value, fds, pipeid = await client.call(
                "GetBlob", image, debian_image.layer_digest, layer_size(debian_image)
            )
            async with anyio.create_task_group() as tg:
                outcome: list[tuple[bytes, Finish]] = []

                async def finish() -> None:
                    outcome.append(await read_and_finish(client, fds[0], pipeid))

                tg.start_soon(finish)
                # While the blob is failing, other requests are answered.
                other = await record(
                    client,
                    "OpenImage",
                    plain_registry.reference("debian-v2s2:bookworm"),
                )
                manifest = await record(client, "GetManifest", other.value)
    assert manifest.success and manifest.payload
    ((_, done),) = outcome
    assert not done.success
    assert done.error_code == "retryable"
    assert "gave up after 3 attempts" in done.error


async def test_registry_that_refuses_connections_is_a_retryable_error() -> None:
    from tests.registry import free_port

    async with proxy(INSECURE) as spawned:
        opened = await record(
            spawned.legacy, "OpenImage", f"docker://127.0.0.1:{free_port()}/x:y"
        )
    assert not opened.success
    assert opened.error_code == "retryable"
    assert "pinging container registry" in opened.error


async def test_manifest_not_matching_docker_content_digest_is_refused(
    plain_registry: Registry,
) -> None:
    wrong = "sha256:" + "0" * 64
    with fault_proxy(plain_registry.host) as front:
        front.add(
            Rule(r"/manifests/", "headers", headers={"Docker-Content-Digest": wrong})
        )
        async with proxy(INSECURE) as spawned:
            opened = await record(
                spawned.legacy, "OpenImage", f"docker://{front.host}/debian:bookworm"
            )
    assert not opened.success
    assert wrong in opened.error


async def test_schema1_manifest_is_refused_with_skopeos_message(
    plain_registry: Registry,
) -> None:
    schema1 = json.dumps(
        {
            "schemaVersion": 1,
            "name": "debian",
            "tag": "bookworm",
            "architecture": "amd64",
            "fsLayers": [{"blobSum": "sha256:" + "1" * 64}],
            "history": [
                {
                    "v1Compatibility": json.dumps(
                        {"id": "2" * 64, "created": "2024-01-01T00:00:00Z"}
                    )
                }
            ],
        }
    ).encode()
    media_type = "application/vnd.docker.distribution.manifest.v1+json"
    outcomes = []
    for command in (None, SKOPEO):
        with fault_proxy(plain_registry.host) as front:
            front.add(
                Rule(
                    r"/manifests/",
                    "body",
                    times=None,
                    body=schema1,
                    headers={"Content-Type": media_type, "Docker-Content-Digest": ""},
                )
            )
            async with proxy(INSECURE, command=command) as spawned:
                opened = await record(
                    spawned.legacy,
                    "OpenImage",
                    f"docker://{front.host}/debian:bookworm",
                )
                manifest = await record(spawned.legacy, "GetManifest", opened.value)
        outcomes.append(manifest.normalised())
    ours, theirs = outcomes
    assert ours == theirs
    assert ours.error == f"unsupported legacy manifest MIME type: {media_type}"


# --- the jsonrpc-fdpass API and registries.conf ------------------------------------


async def test_api_optional_open_is_null_for_unknown_tag_and_error_for_auth(
    plain_registry: Registry, basic_auth_registry: Registry
) -> None:
    async with proxy(INSECURE) as spawned:
        rpc = await spawned.legacy.open_rpc()
        try:
            await rpc.initialize()
            missing = await rpc.open_image(
                plain_registry.reference("debian:no-such-tag"), optional=True
            )
            with pytest.raises(RpcError) as refused:
                await rpc.open_image(
                    basic_auth_registry.reference("team/basic"), optional=True
                )
        finally:
            await rpc.aclose()
    assert missing is None
    assert refused.value.data["kind"] == "source-error"
    assert "unauthorized" in refused.value.message


async def test_api_reports_a_failing_registry_as_retryable(
    plain_registry: Registry,
) -> None:
    with fault_proxy(plain_registry.host) as front:
        front.add(Rule(r"/manifests/", "status", status=503, times=None))
        async with proxy(INSECURE) as spawned:
            rpc = await spawned.legacy.open_rpc()
            try:
                await rpc.initialize()
                with pytest.raises(RpcError) as failed:
                    await rpc.open_image(f"docker://{front.host}/debian:bookworm")
            finally:
                await rpc.aclose()
    assert failed.value.data["kind"] == "retryable"


async def test_insecure_registry_in_registries_conf_allows_http_as_for_skopeo(
    plain_registry: Registry,
) -> None:
    # We read CONTAINERS_REGISTRIES_CONF as current containers/image does;
    # skopeo 1.9 only takes its --registries-conf flag.
    conf = Path(os.environ["CONTAINERS_REGISTRIES_CONF"])
    conf.write_text(
        f'[[registry]]\nlocation = "{plain_registry.host}"\ninsecure = true\n'
    )
    image = plain_registry.reference("debian:bookworm")
    async with proxy() as spawned:
        ours = await record(spawned.legacy, "OpenImage", image)
    async with proxy("--registries-conf", str(conf), command=SKOPEO) as spawned:
        theirs = await record(spawned.legacy, "OpenImage", image)
    assert ours.success and theirs.success, (ours.error, theirs.error)


async def test_a_registry_failing_mid_layer_unpack_is_retryable_not_a_mismatch(
    plain_registry: Registry, debian_image: DebianImage, tmp_path: Path
) -> None:
    # The splitfdstream path unpacks the blob into the cache; a failed read
    # there once came out as "the source holds a corrupt blob".
    with fault_proxy(plain_registry.host) as front:
        front.add(
            Rule(
                r"/blobs/" + debian_image.layer_digest,
                "drop",
                times=None,
                after_bytes=1_000_000,
            )
        )
        async with proxy(INSECURE, "--cache-dir", str(tmp_path / "cache")) as spawned:
            rpc = await spawned.legacy.open_rpc()
            try:
                await rpc.initialize()
                image_id = await rpc.open_image(
                    f"docker://{front.host}/debian:bookworm"
                )
                assert image_id is not None
                with pytest.raises(RpcError) as caught:
                    await rpc.get_splitfdstream(image_id, debian_image.layer_digest)
            finally:
                await rpc.aclose()
    assert caught.value.data["kind"] == "retryable", caught.value.message
    assert not list((tmp_path / "cache" / "layers" / "sha256").iterdir())


async def test_a_stalled_registry_gives_the_reader_eof_once_finish_pipe_fails(
    plain_registry: Registry, debian_image: DebianImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker stays stuck in the registry read far longer than the pipe's
    # stall timeout; the client must still see EOF when FinishPipe fails.
    monkeypatch.setenv("IMAGE_PROXY_REGISTRY_IDLE_TIMEOUT", "120")
    with fault_proxy(plain_registry.host) as front:
        front.add(
            Rule(
                r"/blobs/" + debian_image.layer_digest,
                "stall",
                times=None,
                after_bytes=1_000_000,
            )
        )
        async with proxy(INSECURE, "--stall-timeout", "2") as spawned:
            client = spawned.legacy
            image = await client.open_image(f"docker://{front.host}/debian:bookworm")
            _, fds, pipeid = await client.call(
                "GetBlob", image, debian_image.layer_digest, layer_size(debian_image)
            )
            with anyio.fail_after(60):
                payload, done = await read_and_finish(client, fds[0], pipeid)
    assert not done.success
    assert done.error_code == "retryable"
    assert "no progress" in done.error
    assert len(payload) < layer_size(debian_image)
