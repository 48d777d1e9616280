"""``docker-archive:FILE[:NAME[:TAG] | :@INDEX]``: a ``docker save`` tar.

The archive's ``manifest.json`` lists images as ``{Config, RepoTags,
Layers}``, each a path inside the tar. Without NAME or INDEX the archive must
hold one image; NAME:TAG (normalised as Docker names are, ``latest`` when no
tag) is looked up in the RepoTags, then in the legacy ``repositories`` file
(``{name: {tag: top layer id}}``, matched to the image whose last layer is
``<id>/layer.tar``), which older tools fill when RepoTags is empty.

There is no stored manifest, so we synthesise a Docker schema 2 manifest as
containers/image does, byte for byte so that its digest is the one skopeo
reports: the config as stored, and each layer named by its diffID with the
uncompressed size and the ``...rootfs.diff.tar.gzip`` media type whether or
not the file is compressed (containers/image's long-standing choice; the
digest is the diffID, so every layer blob is served uncompressed to match).
:meth:`DockerArchiveSource.blob_media_type` tells the layer cache so.

Strategy and bounds: the tar is indexed once (see oci_archive.TarArchive)
and members are read as byte ranges of it. A compressed layer file must be
decompressed once at open to learn the size the manifest states, which is
what containers/image does too: O(compressed bytes) of CPU, no disk.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import anyio
import msgspec

from protocol.errors import ClientError, NotFoundError, SourceError
from protocol.image import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    Digest,
    go_json,
)
from proxy.transports.base import Blob, ImageSource, SystemContext, Transport, register
from proxy.transports.oci_archive import (
    TarArchive,
    decompressing_reader,
    sniff_compression,
)

#: containers/image's bounds on the two small documents it reads.
MAX_TAR_MANIFEST_SIZE = 1024 * 1024
MAX_CONFIG_SIZE = 4 * 1024 * 1024

_READ_SIZE = 1 << 20


# -- Docker image names, as distribution/reference normalises them ----------

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
_IMAGE_ID = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class DockerName:
    """A normalised ``domain/path[:tag][@digest]``."""

    name: str
    tag: str = ""
    digest: str = ""

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def normalise_docker_name(text: str) -> DockerName:
    """Parse a Docker image name, adding ``docker.io/library/`` as Docker does.

    :raises ClientError: ``text`` is not a valid image name (Go's wording).
    """
    if _IMAGE_ID.match(text):
        raise ClientError(
            f"invalid repository name ({text}), cannot specify 64-byte "
            "hexadecimal strings"
        )
    first, slash, rest = text.partition("/")
    if slash and (any(c in first for c in ".:") or first == "localhost"):
        domain, remainder = first, rest
    elif slash and first.lower() != first:
        domain, remainder = first, rest
    else:
        domain, remainder = "docker.io", text
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in remainder:
        remainder = "library/" + remainder
    path = remainder.split(":", 1)[0].split("@", 1)[0]
    if path.lower() != path:
        raise ClientError(
            f"invalid reference format: repository name ({path}) must be lowercase"
        )
    match = _REFERENCE.match(f"{domain}/{remainder}")
    if match is None:
        raise ClientError("invalid reference format")
    if len(match["name"]) > 255:
        raise ClientError("repository name must not be more than 255 characters")
    return DockerName(match["name"], match["tag"] or "", match["digest"] or "")


def parse_archive_reference(reference: str) -> tuple[str, DockerName | None, int]:
    """Split ``FILE[:NAME[:TAG] | :@INDEX]`` into (path, name, index or -1)."""
    if not reference:
        raise ClientError(
            "docker-archive reference  isn't of the form <path>[:<reference>]"
        )
    path, separator, name_or_index = reference.partition(":")
    if not separator:
        return path, None, -1
    if name_or_index.startswith("@"):
        digits = name_or_index[1:]
        if not digits.isdigit():
            raise ClientError(f"Invalid source index {name_or_index}: not a number")
        return path, None, int(digits)
    try:
        name = normalise_docker_name(name_or_index)
    except ClientError as exc:
        raise ClientError(f"docker-archive parsing reference: {exc}") from None
    if name.digest and not name.tag:
        raise ClientError(f"reference does not include a tag: {name}")
    if name.digest:
        raise ClientError(f"docker-archive doesn't support digest references: {name}")
    return path, DockerName(name.name, name.tag or "latest"), -1


# -- the archive's documents ---------------------------------------------------


class ManifestItem(msgspec.Struct):
    """One image in the archive's manifest.json (Docker's field names)."""

    Config: str
    RepoTags: list[str] | None = None
    Layers: list[str] = msgspec.field(default_factory=list)


class _RootFS(msgspec.Struct):
    diff_ids: list[str] | None = None


class _ConfigRootFS(msgspec.Struct):
    rootfs: _RootFS | None = None


class _Schema2Descriptor(msgspec.Struct, rename="camel"):
    """docker/distribution's descriptor in Go's field order."""

    media_type: str
    size: int
    digest: str


class _Schema2Manifest(msgspec.Struct, rename="camel"):
    schema_version: int
    media_type: str
    config: _Schema2Descriptor
    layers: list[_Schema2Descriptor]


@dataclass(frozen=True)
class _Layer:
    member: str
    #: Size of the uncompressed tar, as the manifest states it.
    size: int
    compression: str | None


def choose_item(
    archive: TarArchive,
    items: list[ManifestItem],
    name: DockerName | None,
    index: int,
) -> ManifestItem:
    """The image the reference names, with skopeo's error texts."""
    if name is not None:
        for item in items:
            for tag in item.RepoTags or []:
                try:
                    if str(normalise_docker_name(tag)) == str(name):
                        return item
                except ClientError as exc:
                    raise SourceError(
                        f"Invalid tag {tag!r} in manifest.json of {archive.path}: {exc}"
                    ) from None
        legacy = _item_from_repositories(archive, items, name)
        if legacy is not None:
            return legacy
        raise NotFoundError(f'Tag "{name}" not found')
    if index >= 0:
        if index >= len(items):
            raise NotFoundError(
                f"Invalid source index @{index}, only {len(items)} manifest items "
                "available"
            )
        return items[index]
    if len(items) != 1:
        raise ClientError(
            f"Unexpected tar manifest.json: expected 1 item, got {len(items)}"
        )
    return items[0]


def _item_from_repositories(
    archive: TarArchive, items: list[ManifestItem], name: DockerName
) -> ManifestItem | None:
    try:
        raw = archive.read_member("repositories", MAX_TAR_MANIFEST_SIZE)
        repositories = msgspec.json.decode(raw, type=dict[str, dict[str, str]])
    except NotFoundError:
        return None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SourceError(
            f"{archive.path}: malformed repositories file: {exc}"
        ) from None
    for repository, tags in repositories.items():
        for tag, layer_id in tags.items():
            try:
                candidate = normalise_docker_name(f"{repository}:{tag}")
            except ClientError:
                continue
            if str(candidate) != str(name):
                continue
            for item in items:
                if item.Layers and item.Layers[-1].split("/")[0] == layer_id:
                    return item
    return None


def _read_config(archive: TarArchive, item: ManifestItem) -> tuple[bytes, list[str]]:
    try:
        raw = archive.read_member(item.Config, MAX_CONFIG_SIZE)
    except NotFoundError:
        raise SourceError(
            f'loading tar component "{item.Config}": file does not exist'
        ) from None
    try:
        parsed = msgspec.json.decode(raw, type=_ConfigRootFS)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SourceError(f'decoding tar config "{item.Config}": {exc}') from None
    if parsed.rootfs is None:
        raise SourceError(f'Invalid image config (rootFS is not set): "{item.Config}"')
    return raw, parsed.rootfs.diff_ids or []


def _measure_layer(archive: TarArchive, member: str) -> _Layer:
    found = archive.find(member)
    if found is None:
        raise SourceError(
            f"Some layer tarfiles are missing in the tarball: no {member} in "
            f"{archive.path}"
        )
    blob = archive.open_member(member)
    try:
        compression = sniff_compression(blob.reader.read(8))
    finally:
        blob.close()
    if compression is None:
        return _Layer(member, found.size, None)
    return _Layer(member, _uncompressed_size(archive, member, compression), compression)


def _uncompressed_size(archive: TarArchive, member: str, compression: str) -> int:
    blob = archive.open_member(member)
    size = 0
    try:
        with decompressing_reader(blob.reader, compression) as stream:
            while chunk := stream.read(_READ_SIZE):
                size += len(chunk)
    except (OSError, EOFError, ValueError) as exc:
        raise SourceError(
            f"{archive.path}: reading {member} to find its size: {exc}"
        ) from None
    finally:
        blob.close()
    return size


class _DecompressedLayer(io.RawIOBase):
    """A layer file read decompressed; closing closes both readers."""

    def __init__(self, raw: BinaryIO, compression: str) -> None:
        super().__init__()
        self._raw = raw
        self._stream = decompressing_reader(raw, compression)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._raw.close()
        super().close()


# -- the transport -------------------------------------------------------------


class DockerArchiveSource(ImageSource):
    """One image of a ``docker save`` archive, with a synthesised manifest."""

    def __init__(self, name: str, archive: TarArchive, item: ManifestItem) -> None:
        self.name = name
        self._archive = archive
        self._config_raw, diff_ids = _read_config(archive, item)
        self._config_digest = Digest.of(self._config_raw)
        if len(item.Layers) != len(diff_ids):
            raise SourceError(
                f"Inconsistent layer count: {len(item.Layers)} in manifest, "
                f"{len(diff_ids)} in config"
            )
        self._layers: dict[str, _Layer] = {}
        for diff_id, member in zip(diff_ids, item.Layers, strict=True):
            # docker save repeats a layer that occurs twice; the first serves.
            if diff_id not in self._layers:
                self._layers[diff_id] = _measure_layer(archive, member)
        self._manifest = self._synthesise_manifest(diff_ids)

    def _synthesise_manifest(self, diff_ids: list[str]) -> bytes:
        manifest = _Schema2Manifest(
            schema_version=2,
            media_type=DOCKER_MANIFEST,
            config=_Schema2Descriptor(
                DOCKER_CONFIG, len(self._config_raw), str(self._config_digest)
            ),
            layers=[
                _Schema2Descriptor(
                    DOCKER_LAYER_GZIP, self._layers[diff_id].size, diff_id
                )
                for diff_id in diff_ids
            ],
        )
        return go_json(manifest)

    async def get_manifest(self, instance: Digest | None = None) -> tuple[bytes, str]:
        if instance is not None and not instance.matches(self._manifest):
            raise NotFoundError(
                f"{self.name} holds one image, not a list with instance {instance}"
            )
        return self._manifest, DOCKER_MANIFEST

    def open_blob(self, digest: Digest) -> Blob:
        if digest == self._config_digest:
            raw = self._config_raw
            return Blob(reader=cast(BinaryIO, io.BytesIO(raw)), size=len(raw))
        layer = self._layers.get(digest)
        if layer is None:
            raise NotFoundError(f"Unknown blob {digest}")
        blob = self._archive.open_member(layer.member)
        if layer.compression is None:
            return blob
        reader = _DecompressedLayer(blob.reader, layer.compression)
        return Blob(reader=cast(BinaryIO, reader), size=layer.size)

    def blob_media_type(self, digest: Digest, media_type: str) -> str:
        # Every layer blob is served as an uncompressed tar (see the top).
        return DOCKER_LAYER if digest in self._layers else media_type

    async def close(self) -> None:
        self._archive.close()


class DockerArchiveTransport(Transport):
    name = "docker-archive"

    async def open(self, reference: str, context: SystemContext) -> ImageSource:
        path, name, index = parse_archive_reference(reference)
        return await anyio.to_thread.run_sync(
            _open_source, f"docker-archive:{reference}", path, name, index
        )


def _open_source(
    image_name: str, path: str, name: DockerName | None, index: int
) -> DockerArchiveSource:
    try:
        archive = TarArchive.open(path)
    except NotFoundError as exc:
        raise NotFoundError(f'opening file "{path}": {exc}') from None
    try:
        try:
            raw = archive.read_member("manifest.json", MAX_TAR_MANIFEST_SIZE)
        except NotFoundError:
            raise SourceError(
                f'loading tar component "manifest.json": file does not exist '
                f"(in {path}; archives from before Docker 1.10 have none and are "
                "not supported)"
            ) from None
        try:
            items = msgspec.json.decode(raw, type=list[ManifestItem])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SourceError(f"decoding tar manifest.json: {exc}") from None
        item = choose_item(archive, items, name, index)
        return DockerArchiveSource(image_name, archive, item)
    except BaseException:
        archive.close()
        raise


register("docker-archive", DockerArchiveTransport)
