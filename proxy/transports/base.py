"""The interface every transport implements, and the name registry.

An image name is ``transport:reference`` as ``skopeo copy`` takes it. Each
transport lives in its own module and registers a parser here; the rest of the
proxy only sees :class:`ImageSource`. Blob readers are plain blocking file
objects because blob bodies are always moved by worker threads, which keeps
the event loop free and lets local files use ``sendfile``/``splice``.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from protocol.errors import ClientError
from protocol.image import Digest


@dataclass
class SystemContext:
    """What the command line says about reaching sources (skopeo's flags)."""

    authfile: str | None = None
    creds: str | None = None
    username: str | None = None
    password: str | None = None
    registry_token: str | None = None
    no_creds: bool = False
    cert_dir: str | None = None
    tls_verify: bool | None = None
    user_agent_prefix: str | None = None
    shared_blob_dir: str | None = None
    daemon_host: str | None = None
    decryption_keys: list[str] = field(default_factory=list)
    override_os: str | None = None
    override_arch: str | None = None
    override_variant: str | None = None


@dataclass(frozen=True)
class LayerInfo:
    """A layer as a copy would fetch it: what GetLayerInfo reports."""

    digest: str
    size: int
    media_type: str


@dataclass
class Blob:
    """An open blob: a blocking reader and its size (-1 when unknown).

    ``fileno`` is set when the blob is a whole local file, so workers may use
    zero-copy system calls on it.
    """

    reader: BinaryIO
    size: int
    fileno: int | None = None

    def close(self) -> None:
        self.reader.close()


class LayerStream(abc.ABC):
    """A layer as a splitfdstream whose external files are opened on demand.

    Holders keep one of these per open stream; only ``open_files`` opens
    content fds, a window at a time, so a layer of any size costs a bounded
    number of descriptors. ``close`` releases whatever the stream holds
    (a store lock, say); it is called exactly once.
    """

    diff_id: str
    #: Bytes of the uncompressed tar the stream rebuilds.
    size: int
    #: External files the stream refers to.
    file_count: int

    @abc.abstractmethod
    def open_stream(self) -> int:
        """A new read-only fd positioned at the start of the stream."""

    @abc.abstractmethod
    def open_files(self, start: int, count: int) -> list[int]:
        """Read-only fds for external files ``start .. start+count-1``."""

    def close(self) -> None:  # noqa: B027 - most streams hold nothing
        """Release the stream's resources."""


class ImageSource(abc.ABC):
    """One opened image reference in one transport."""

    #: The image name as the client gave it, for error messages.
    name: str

    @abc.abstractmethod
    async def get_manifest(self, instance: Digest | None = None) -> tuple[bytes, str]:
        """The stored manifest bytes and media type.

        ``instance`` picks a manifest by digest out of a list; ``None`` is the
        manifest the reference names (possibly an index).
        """

    @abc.abstractmethod
    def open_blob(self, digest: Digest) -> Blob:
        """Open a blob for reading; blocking, called from worker threads."""

    def policy_scopes(self) -> list[str]:
        """Policy scopes for this image, most specific first.

        Sources without a meaningful identity use only the transport default.
        """
        return []

    def blob_media_type(self, digest: Digest, media_type: str) -> str:
        """The media type of what ``open_blob(digest)`` serves.

        The manifest's ``media_type`` unless the source serves the blob in
        another form: docker-archive names its layers gzip but serves them
        uncompressed, so the layer cache must not try to inflate them.
        """
        return media_type

    def layer_infos_for_copy(self) -> list[LayerInfo] | None:
        """Layers as a copy would use them, when they differ from the manifest.

        Only stores that keep layers uncompressed (containers-storage) say
        anything here; the default defers to the manifest.
        """
        return None

    def layer_stream(self, digest: str, diff_id: str) -> LayerStream | None:
        """The layer as a splitfdstream straight from the source, if it can.

        Sources that keep layers unpacked (containers-storage) answer here
        without copying content; the default None makes the caller unpack
        the compressed blob into the layer cache. Blocking: worker threads
        call it.
        """
        return None

    async def close(self) -> None:  # noqa: B027 - most sources hold nothing
        """Release what the source holds (files, connections)."""


class Transport(abc.ABC):
    """Parses a reference and opens it."""

    name: str

    @abc.abstractmethod
    async def open(self, reference: str, context: SystemContext) -> ImageSource:
        """Open ``reference`` (the part after ``name:``)."""


_transports: dict[str, Callable[[], Transport]] = {}


def register(name: str, factory: Callable[[], Transport]) -> None:
    _transports[name] = factory


def split_image_name(image_name: str) -> tuple[Transport, str]:
    """Find the transport of ``transport:reference``; errors read as skopeo's."""
    if "\x00" in image_name:
        # No path or registry name can hold one; the OS would refuse it later
        # with a less helpful error.
        raise ClientError(f"Invalid image name {image_name!r}: it contains a NUL byte")
    transport_name, separator, reference = image_name.partition(":")
    if not separator:
        raise ClientError(
            f'Invalid image name "{image_name}", expected colon-separated '
            "transport:reference"
        )
    factory = _transports.get(transport_name)
    if factory is None:
        from proxy.transports import registry

        if registry.load(transport_name):
            factory = _transports.get(transport_name)
    if factory is None:
        raise ClientError(
            f'Invalid image name "{image_name}", unknown transport "{transport_name}"'
        )
    return factory(), reference


def empty_reader() -> BinaryIO:
    return io.BytesIO(b"")
