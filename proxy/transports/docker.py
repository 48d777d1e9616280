"""``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``: a registry speaking the OCI
distribution API over HTTP/1.1.

One :class:`RegistryClient` (a blocking httpx client) serves one opened
image; every call runs in a worker thread, so the event loop never waits on
the network. The client pings ``/v2/`` once to learn the scheme (HTTPS, then
HTTP only for an insecure host, see docker_tls) and the authentication
challenges, then attaches to each request either nothing, basic credentials,
the ``--registry-token``, or a bearer token fetched from the challenge's
realm for ``repository:REPO:pull`` and cached per scope until it expires.

Failures and their bounds:

* A connection error, a 429 or a 5xx is retried at most ``RETRIES`` times
  with exponential backoff from ``BACKOFF`` seconds (capped at
  ``MAX_BACKOFF``), or after the ``Retry-After`` the registry asked for
  (capped at ``MAX_RETRY_AFTER``); then the request fails with a retryable
  error.
* A blob whose body stops arriving for ``IDLE_TIMEOUT`` seconds, drops, or
  ends short of its ``Content-Length`` is resumed with a ``Range`` request
  from the last byte received, at most ``RETRIES`` times in a row without
  progress; then reading fails with a retryable error. A stall therefore
  costs at most about ``(RETRIES + 1) * IDLE_TIMEOUT`` plus the backoff.
* Any other status is an error that names the registry's answer. Only a
  manifest the registry says is unknown (``MANIFEST_UNKNOWN``, or a 404
  without an error body) makes the image "missing"; an authentication
  failure never does.

The environment variables ``IMAGE_PROXY_REGISTRY_IDLE_TIMEOUT``,
``IMAGE_PROXY_REGISTRY_RETRIES`` and ``IMAGE_PROXY_REGISTRY_BACKOFF`` change
those three bounds (tests shorten them).

Manifests are read whole (at most ``MAX_MANIFEST_SIZE``) and checked against
the digest they were asked by, or against ``Docker-Content-Digest`` when
asked by tag. Blob bodies are not checked here: the callers verify every blob
against its descriptor while streaming it.
"""

from __future__ import annotations

import email.utils
import io
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, cast

import anyio
import httpx

from protocol.errors import (
    ClientError,
    DigestMismatchError,
    ImageProxyError,
    NotFoundError,
    RetryableError,
    SourceError,
)
from protocol.image import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    guess_media_type,
)
from proxy.transports.base import Blob, ImageSource, SystemContext, Transport, register
from proxy.transports.docker_auth import (
    Challenge,
    Credentials,
    basic_authorization,
    credentials_for,
    parse_challenges,
)
from proxy.transports.docker_tls import TLSSettings, tls_settings

DOCKER_HOSTNAME = "docker.io"
#: The host docker.io's API is actually served from.
DOCKER_REGISTRY_HOST = "registry-1.docker.io"

#: Accept list of manifest GETs: every type we can read, and schema 1 so the
#: registry hands it over and we can refuse it with skopeo's message.
MANIFEST_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        DOCKER_SCHEMA1_SIGNED,
        DOCKER_SCHEMA1,
        DOCKER_MANIFEST_LIST,
        OCI_INDEX,
    ]
)
_KNOWN_MANIFEST_TYPES = frozenset(MANIFEST_ACCEPT.split(", "))

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_ERROR_BODY = 64 * 1024
CONNECT_TIMEOUT = 30.0
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 60.0
#: containers/image treats shorter token lifetimes as this.
MIN_TOKEN_LIFETIME = 60.0

IDLE_TIMEOUT_ENV = "IMAGE_PROXY_REGISTRY_IDLE_TIMEOUT"
RETRIES_ENV = "IMAGE_PROXY_REGISTRY_RETRIES"
BACKOFF_ENV = "IMAGE_PROXY_REGISTRY_BACKOFF"
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF = 1.0

USER_AGENT = "image-proxy/0.1 (containers/image compatible)"


# -- references ---------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])"
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}(?::[0-9]+)?$")
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


@dataclass(frozen=True)
class DockerReference:
    """A normalised registry reference: ``host/repository`` plus tag or digest."""

    host: str
    repository: str
    tag: str = ""
    digest: Digest | None = None

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"

    @property
    def tag_or_digest(self) -> str:
        return str(self.digest) if self.digest is not None else self.tag

    @property
    def identity(self) -> str:
        """The reference as policy scopes name it: ``NAME:TAG`` or ``NAME@DIGEST``."""
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"

    @property
    def endpoint(self) -> str:
        return DOCKER_REGISTRY_HOST if self.host == DOCKER_HOSTNAME else self.host


def parse_docker_reference(reference: str) -> DockerReference:
    """Parse the part after ``docker:``; a missing tag means ``latest``."""
    if not reference.startswith("//"):
        raise ClientError(
            f'Invalid image name "docker:{reference}": docker: image reference '
            f"{reference} does not start with //"
        )
    text = reference[2:]
    invalid = f'Invalid image name "docker:{reference}": invalid reference format'

    name, at, digest_text = text.partition("@")
    digest: Digest | None = None
    if at:
        try:
            digest = Digest(digest_text)
        except ClientError as exc:
            raise ClientError(f"{invalid}: {exc}") from None
    tag = ""
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise ClientError(invalid)
    if tag and digest is not None:
        # containers/image refuses these too: which one would win is unclear.
        raise ClientError(
            f'Invalid image name "docker:{reference}": Docker references with '
            "both a tag and digest are currently not supported"
        )

    host, slash, path = name.partition("/")
    if not slash or not (
        "." in host or ":" in host or host == "localhost" or host != host.lower()
    ):
        host, path = DOCKER_HOSTNAME, name
    if host == DOCKER_HOSTNAME and "/" not in path:
        path = f"library/{path}"
    if not _DOMAIN_RE.match(host) or not _PATH_RE.match(path) or len(name) > 255:
        raise ClientError(invalid)
    return DockerReference(host, path, tag or ("" if digest else "latest"), digest)


def policy_scopes_of(reference: DockerReference) -> list[str]:
    """Scopes from most to least specific, as containers-policy.json(5) lists
    them for the docker transport: the identity, the repository and its
    namespaces up to the host, then ``*.DOMAIN`` wildcards of the host."""
    scopes = [reference.identity]
    name = reference.name
    while True:
        scopes.append(name)
        if "/" not in name:
            break
        name = name.rsplit("/", 1)[0]
    domain = name.split(":", 1)[0]
    while "." in domain:
        domain = domain.split(".", 1)[1]
        scopes.append(f"*.{domain}")
    return scopes


# -- settings -----------------------------------------------------------------


def _float_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ClientError(f"{name}={text!r} is not a number of seconds") from None
    if value < 0:
        raise ClientError(f"{name}={text!r} must not be negative")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for a registry and how often to try again."""

    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF

    @classmethod
    def from_environment(cls) -> RetryPolicy:
        return cls(
            idle_timeout=_float_env(IDLE_TIMEOUT_ENV, DEFAULT_IDLE_TIMEOUT),
            retries=int(_float_env(RETRIES_ENV, DEFAULT_RETRIES)),
            backoff=_float_env(BACKOFF_ENV, DEFAULT_BACKOFF),
        )

    def delay(self, attempt: int) -> float:
        return float(min(self.backoff * (2**attempt), MAX_BACKOFF))


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds the registry asked us to wait, from ``Retry-After``."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        seconds = float(value.strip())
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, MAX_RETRY_AFTER))


def _is_transient_status(status: int) -> bool:
    return status == 429 or status in (500, 502, 503, 504)


def _certificate_problem(exc: BaseException) -> ssl.SSLError | None:
    """The TLS verification failure behind ``exc``: retrying cannot fix it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


# -- errors -------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryErrorBody:
    """The first entry of a distribution API error body, if it had one."""

    code: str
    message: str


def _error_body(response: httpx.Response) -> RegistryErrorBody | None:
    try:
        document = json.loads(response.content[:MAX_ERROR_BODY])
        first = document["errors"][0]
        return RegistryErrorBody(str(first.get("code", "")), str(first["message"]))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def describe_response(response: httpx.Response) -> str:
    """A failed response in containers/image's words: ``code words: message``."""
    body = _error_body(response)
    if body is not None and body.code:
        return f"{body.code.lower().replace('_', ' ')}: {body.message}"
    return (
        f"received unexpected HTTP status: {response.status_code} "
        f"{response.reason_phrase}"
    )


def _read_limited(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > limit:
            raise SourceError(
                f"{response.request.url} sent more than {limit} bytes: refused"
            )
        chunks.append(chunk)
    return b"".join(chunks)


# -- the client ---------------------------------------------------------------


@dataclass
class _Token:
    value: str
    expires: float


class RegistryClient:
    """HTTP access to one repository of one registry; thread-safe, blocking."""

    def __init__(
        self,
        reference: DockerReference,
        credentials: Credentials,
        tls: TLSSettings,
        retry: RetryPolicy,
        user_agent: str,
    ) -> None:
        self._reference = reference
        self._credentials = credentials
        self._tls = tls
        self._retry = retry
        self._http = httpx.Client(
            verify=tls.ssl_context,
            timeout=httpx.Timeout(
                connect=CONNECT_TIMEOUT,
                read=retry.idle_timeout or None,
                write=CONNECT_TIMEOUT,
                pool=None,
            ),
            headers={"User-Agent": user_agent},
            trust_env=False,
        )
        self._lock = threading.Lock()
        self._base_url: str | None = None
        self._challenges: list[Challenge] = []
        self._tokens: dict[str, _Token] = {}

    @property
    def retry(self) -> RetryPolicy:
        return self._retry

    def close(self) -> None:
        self._http.close()

    # -- ping and authentication ----------------------------------------------

    def _ensure_pinged(self) -> str:
        with self._lock:
            if self._base_url is None:
                self._base_url = self._ping()
            return self._base_url

    def _ping(self) -> str:
        host = self._reference.endpoint
        schemes = ["https", "http"] if self._tls.insecure else ["https"]
        failure = ""
        for position, scheme in enumerate(schemes):
            last = position == len(schemes) - 1
            try:
                # Trying HTTPS first must not cost the retry budget when HTTP
                # may follow, so only the last scheme is retried.
                response = self._send(
                    "GET", f"{scheme}://{host}/v2/", {}, retry=last, stream=False
                )
            except ImageProxyError as exc:
                failure = str(exc)
                if last:
                    raise type(exc)(
                        f"pinging container registry {host}: {failure}"
                    ) from None
                continue
            if response.status_code not in (200, 401):
                failure = describe_response(response)
                if last:
                    raise SourceError(f"pinging container registry {host}: {failure}")
                continue
            self._challenges = [
                challenge
                for header in response.headers.get_list("www-authenticate")
                for challenge in parse_challenges(header)
            ]
            return f"{scheme}://{host}"
        raise SourceError(f"pinging container registry {host}: {failure}")

    def _authorization(self, scope: str) -> str | None:
        credentials = self._credentials
        if credentials.registry_token:
            return f"Bearer {credentials.registry_token}"
        for challenge in self._challenges:
            if challenge.scheme == "bearer":
                return f"Bearer {self._bearer_token(challenge, scope)}"
            if challenge.scheme == "basic" and credentials.has_password:
                return basic_authorization(credentials)
        return None

    def _bearer_token(self, challenge: Challenge, scope: str) -> str:
        with self._lock:
            cached = self._tokens.get(scope)
            if cached is not None and cached.expires > time.monotonic():
                return cached.value
        token = self._fetch_token(challenge, scope)
        with self._lock:
            self._tokens[scope] = token
        return token.value

    def _fetch_token(self, challenge: Challenge, scope: str) -> _Token:
        realm = challenge.params.get("realm")
        if not realm:
            raise SourceError(
                f"registry {self._reference.endpoint} asked for a bearer token "
                "without naming a realm"
            )
        params = {"scope": scope}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = {}
        if self._credentials.has_password:
            headers["Authorization"] = basic_authorization(self._credentials)
        url = str(httpx.URL(realm, params=params))
        response = self._send("GET", url, headers, stream=False)
        if response.status_code == 401:
            raise SourceError(
                "unable to retrieve auth token: invalid username/password: "
                f"{describe_response(response)}"
            )
        if response.status_code != 200:
            raise SourceError(
                f"requesting bearer token from {realm}: {describe_response(response)}"
            )
        try:
            document = json.loads(response.content)
            value = str(document.get("token") or document.get("access_token") or "")
            lifetime = float(document.get("expires_in") or 0)
        except (ValueError, AttributeError, TypeError):
            value, lifetime = "", 0.0
        if not value:
            raise SourceError(f"the token server at {realm} sent no token")
        # Refresh a little early so a token does not expire mid-request.
        lifetime = max(lifetime, MIN_TOKEN_LIFETIME) * 0.9
        return _Token(value, time.monotonic() + lifetime)

    # -- requests ---------------------------------------------------------------

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        *,
        retry: bool = True,
        stream: bool = True,
        follow_redirects: bool = False,
        scope: str | None = None,
    ) -> httpx.Response:
        """One request, retried on connection errors, 429 and 5xx.

        With ``scope`` the request is authorised for it, afresh on each
        attempt. The response is returned open when ``stream`` is set.
        """
        attempt = 0
        while True:
            request_headers = dict(headers)
            if scope is not None:
                authorization = self._authorization(scope)
                if authorization:
                    request_headers["Authorization"] = authorization
            request = self._http.build_request(method, url, headers=request_headers)
            try:
                response = self._http.send(
                    request, stream=True, follow_redirects=follow_redirects
                )
            except httpx.TransportError as exc:
                problem = _certificate_problem(exc)
                if problem is not None:
                    raise SourceError(f"{method} {url}: {problem}") from None
                reason = _describe_transport_error(exc)
                if not retry or attempt >= self._retry.retries:
                    raise RetryableError(
                        f"{method} {url}: {reason} (after {attempt + 1} attempts)"
                    ) from None
                time.sleep(self._retry.delay(attempt))
                attempt += 1
                continue
            if _is_transient_status(response.status_code):
                described = describe_response_closing(response)
                if not retry or attempt >= self._retry.retries:
                    raise RetryableError(
                        f"{method} {url}: status {response.status_code}: {described} "
                        f"(after {attempt + 1} attempts)"
                    )
                wait = _retry_after(response)
                time.sleep(self._retry.delay(attempt) if wait is None else wait)
                attempt += 1
                continue
            if not stream or response.status_code >= 300:
                try:
                    response.read()
                except httpx.TransportError as exc:
                    response.close()
                    if not retry or attempt >= self._retry.retries:
                        raise RetryableError(
                            f"{method} {url}: {_describe_transport_error(exc)}"
                        ) from None
                    time.sleep(self._retry.delay(attempt))
                    attempt += 1
                    continue
                finally:
                    if not stream:
                        response.close()
            return response

    def _repository_request(
        self, path: str, headers: dict[str, str], *, follow_redirects: bool
    ) -> httpx.Response:
        base = self._ensure_pinged()
        scope = f"repository:{self._reference.repository}:pull"
        return self._send(
            "GET",
            f"{base}/v2/{self._reference.repository}/{path}",
            headers,
            follow_redirects=follow_redirects,
            scope=scope,
        )

    # -- manifests and blobs ----------------------------------------------------

    def fetch_manifest(self, tag_or_digest: str) -> tuple[bytes, str]:
        """The manifest bytes and media type, checked against their digest."""
        name = self._reference.name
        response = self._repository_request(
            f"manifests/{tag_or_digest}",
            {"Accept": MANIFEST_ACCEPT},
            follow_redirects=True,
        )
        try:
            if response.status_code != 200:
                self._raise_manifest_error(response, tag_or_digest)
            try:
                raw = _read_limited(response, MAX_MANIFEST_SIZE)
            except httpx.TransportError as exc:
                raise RetryableError(
                    f"reading manifest {tag_or_digest} in {name}: "
                    f"{_describe_transport_error(exc)}"
                ) from None
        finally:
            response.close()

        # Tags cannot hold a colon, digests always do.
        expected = (
            tag_or_digest
            if ":" in tag_or_digest
            else response.headers.get("docker-content-digest", "")
        )
        if expected:
            self._check_manifest_digest(raw, expected, tag_or_digest)
        content_type = response.headers.get("content-type", "").split(";")[0].strip()
        if content_type not in _KNOWN_MANIFEST_TYPES:
            content_type = guess_media_type(raw)
        return raw, content_type

    def _check_manifest_digest(self, raw: bytes, expected: str, asked: str) -> None:
        try:
            digest = Digest(expected)
        except ClientError:
            raise SourceError(
                f"registry {self._reference.endpoint} sent an invalid "
                f"Docker-Content-Digest {expected!r} for {asked}"
            ) from None
        if not digest.matches(raw):
            actual = Digest.of(raw)
            raise DigestMismatchError(
                f"manifest {asked} in {self._reference.name} does not match its "
                f"digest: expected {digest}, got {actual}",
                expected=str(digest),
                actual=str(actual),
            )

    def _raise_manifest_error(self, response: httpx.Response, asked: str) -> None:
        text = f"reading manifest {asked} in {self._reference.name}: "
        body = _error_body(response)
        described = describe_response(response)
        if response.status_code == 404 and (
            body is None
            or body.code == "MANIFEST_UNKNOWN"
            or (body.code == "UNKNOWN" and "not found" in body.message.lower())
        ):
            raise NotFoundError(text + described)
        raise SourceError(text + described)

    def open_blob(self, digest: Digest, start: int = 0) -> httpx.Response:
        """An open response for the blob from byte ``start`` (200 or 206)."""
        headers = {"Range": f"bytes={start}-"} if start else {}
        response = self._repository_request(
            f"blobs/{digest}", headers, follow_redirects=True
        )
        if response.status_code in (200, 206):
            return response
        response.close()
        text = f"fetching blob {digest} from {self._reference.name}: "
        described = describe_response(response)
        if response.status_code == 404:
            raise NotFoundError(text + described)
        raise SourceError(text + described)


def describe_response_closing(response: httpx.Response) -> str:
    """Describe a failed response, reading at most a small body, and close it."""
    try:
        response.read()
    except httpx.TransportError:
        pass
    finally:
        response.close()
    return describe_response(response)


# -- blobs ----------------------------------------------------------------------


class ResumingBlobReader(io.RawIOBase):
    """A blob body that resumes with ``Range`` after a stall, drop or short end.

    Consecutive failures without a byte of progress are bounded by the retry
    policy; any progress resets the count.
    """

    def __init__(
        self,
        client: RegistryClient,
        digest: Digest,
        response: httpx.Response,
        size: int,
        name: str,
    ) -> None:
        super().__init__()
        self._client = client
        self._digest = digest
        self._response: httpx.Response | None = response
        self._chunks: Iterator[bytes] | None = response.iter_raw()
        self._size = size
        self._name = name
        self._offset = 0
        self._pending = memoryview(b"")
        self._failures = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            if self._chunks is None:
                return 0
            try:
                self._pending = memoryview(next(self._chunks))
                self._failures = 0
            except StopIteration:
                if 0 <= self._size and self._offset < self._size:
                    self._resume("the body ended early")
                    continue
                self._finish()
                return 0
            except httpx.TimeoutException:
                self._resume(f"no data for {self._client.retry.idle_timeout:g} seconds")
            except httpx.TransportError as exc:
                self._resume(_describe_transport_error(exc))
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        self._offset += count
        return count

    def _finish(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response = None
        self._chunks = None

    def _resume(self, reason: str) -> None:
        self._finish()
        policy = self._client.retry
        where = f"at byte {self._offset}" + (
            f" of {self._size}" if self._size >= 0 else ""
        )
        if self._failures >= policy.retries:
            raise RetryableError(
                f"reading blob {self._digest} from {self._name}: {reason} {where}; "
                f"gave up after {self._failures + 1} attempts"
            )
        time.sleep(policy.delay(self._failures))
        self._failures += 1
        response = self._client.open_blob(self._digest, self._offset)
        chunks = response.iter_raw()
        if response.status_code == 206:
            content_range = response.headers.get("content-range", "")
            if not content_range.startswith(f"bytes {self._offset}-"):
                response.close()
                raise SourceError(
                    f"reading blob {self._digest} from {self._name}: asked for "
                    f"bytes from {self._offset}, got range {content_range!r}"
                )
        else:
            chunks = _skip(chunks, self._offset)
        self._response = response
        self._chunks = chunks

    def close(self) -> None:
        self._finish()
        super().close()


def _skip(chunks: Iterator[bytes], count: int) -> Iterator[bytes]:
    """The chunks after the first ``count`` bytes (a server that ignored Range)."""
    for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:]
        count = 0


# -- source and transport -------------------------------------------------------


class DockerSource(ImageSource):
    """An image in a registry; the manifest the reference names is fetched at
    open, as containers/image does, so a missing image fails the open."""

    def __init__(
        self,
        name: str,
        reference: DockerReference,
        client: RegistryClient,
        top: tuple[bytes, str],
    ) -> None:
        self.name = name
        self._reference = reference
        self._client = client
        self._top = top

    def policy_scopes(self) -> list[str]:
        return policy_scopes_of(self._reference)

    async def get_manifest(self, instance: Digest | None = None) -> tuple[bytes, str]:
        if instance is None:
            return self._top
        return await anyio.to_thread.run_sync(
            self._client.fetch_manifest, str(instance)
        )

    def open_blob(self, digest: Digest) -> Blob:
        response = self._client.open_blob(digest)
        length = response.headers.get("content-length", "")
        size = int(length) if length.isdigit() else -1
        raw = ResumingBlobReader(
            self._client, digest, response, size, self._reference.name
        )
        reader = cast(BinaryIO, io.BufferedReader(raw, buffer_size=1 << 16))
        return Blob(reader=reader, size=size)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._client.close)


class DockerTransport(Transport):
    name = "docker"

    async def open(self, reference: str, context: SystemContext) -> ImageSource:
        parsed = parse_docker_reference(reference)
        credentials = credentials_for(parsed.name, context)
        tls = tls_settings(parsed.host, parsed.name, context)
        user_agent = USER_AGENT
        if context.user_agent_prefix:
            user_agent = f"{context.user_agent_prefix} {USER_AGENT}"
        client = RegistryClient(
            parsed, credentials, tls, RetryPolicy.from_environment(), user_agent
        )
        try:
            top = await anyio.to_thread.run_sync(
                client.fetch_manifest, parsed.tag_or_digest
            )
        except BaseException:
            client.close()
            raise
        return DockerSource(f"docker:{reference}", parsed, client, top)


register("docker", DockerTransport)
