"""``containers-storage:[DRIVER@ROOT+RUNROOT:OPTIONS]REF``: a podman/buildah store.

REF is resolved as containers/image resolves it, plus podman's short names:

- ``@ID``, ``ID`` or a unique ID prefix (3 characters at least): that image;
- ``NAME[:TAG][@DIGEST]``, normalised as Docker references are
  (``foo`` is ``docker.io/library/foo:latest``) and looked up among the
  store's names; a short name that matches nothing that way is tried as
  ``localhost/NAME`` and then as any stored name whose repository ends in
  ``/NAME``, when exactly one image has such a name (podman's lookup);
- ``NAME@ID``: the image with that ID, which must carry that repository.

Without the bracket part the store comes from storage.conf or the default
paths (see :mod:`proxy.transports.storage_store`).

What the image serves: its stored manifest (big data ``manifest-DIGEST`` when
the reference has a digest, else ``manifest``), blobs by big-data key (the
config), and layers by their *uncompressed* digest (``diff-digest``), rebuilt
byte for byte from tar-split and the unpacked files
(:mod:`proxy.transports.storage_layer`). As with skopeo, a layer cannot be
fetched by the compressed digest the manifest lists: the store no longer has
those bytes; GetLayerInfo reports the uncompressed digests instead.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from protocol.errors import ClientError, NotFoundError, SourceError, UnsupportedError
from protocol.image import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Digest,
    guess_media_type,
    parse_manifest,
)
from proxy.transports.base import (
    Blob,
    ImageSource,
    LayerInfo,
    LayerStream,
    SystemContext,
    Transport,
    register,
)
from proxy.transports.storage_layer import LayerTarReader, StoredLayerStream
from proxy.transports.storage_store import (
    ImageRecord,
    LayerRecord,
    Store,
    configured_store_location,
    split_store_spec,
)

MINIMUM_ID_PREFIX = 3
DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"

#: The gzip of an empty tar, which containers/image serves without a layer
#: for schema 1 manifests' empty layers.
GZIPPED_EMPTY_LAYER = bytes(
    [31, 139, 8, 0, 0, 9, 110, 136, 0, 255, 98, 24, 5, 163, 96, 20, 140, 88, 0, 8]
    + [0, 0, 255, 255, 46, 175, 181, 239, 0, 4, 0, 0]
)
GZIPPED_EMPTY_LAYER_DIGEST = (
    "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"
)

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")


@dataclass(frozen=True)
class NamedReference:
    """A Docker-style image name, normalised."""

    domain: str
    path: str
    tag: str | None
    digest: str | None
    #: The name as typed had no registry: podman's short-name lookup applies.
    short: bool
    #: The repository path as typed, for the short-name lookup.
    typed_path: str

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        text = self.repository
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_named(text: str) -> NamedReference:
    """Normalise a name as containers/image does, adding ``:latest`` when bare."""
    name, _, digest = text.partition("@")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ClientError(f'parsing named reference "{text}": invalid tag')
    if digest and not _DIGEST.fullmatch(digest):
        raise ClientError(f'parsing named reference "{text}": invalid digest')
    first, separator, rest = name.partition("/")
    if separator and (any(c in first for c in ".:") or first == "localhost"):
        domain, path, short = first, rest, False
    else:
        domain, path, short = DEFAULT_DOMAIN, name, True
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    if path != path.lower():
        raise ClientError(
            f'parsing named reference "{text}": repository name must be lowercase'
        )
    if not all(_PATH_COMPONENT.fullmatch(part) for part in path.split("/")):
        raise ClientError(f'parsing named reference "{text}": invalid reference format')
    if tag is None and not digest:
        tag = DEFAULT_TAG
    return NamedReference(domain, path, tag, digest or None, short, name)


def _find_by_id(images: list[ImageRecord], text: str) -> ImageRecord | None:
    """An image by full ID, or by an ID prefix only one image has."""
    matches = [image for image in images if image.id.startswith(text)]
    exact = [image for image in matches if image.id == text]
    if exact:
        return exact[0]
    return matches[0] if len(matches) == 1 else None


def _repository_of(stored_name: str) -> tuple[str, str | None]:
    try:
        named = parse_named(stored_name)
    except ClientError:
        return "", None
    return named.repository, named.tag


@dataclass(frozen=True)
class StorageReference:
    """What REF names: an image ID, a name, or both."""

    named: NamedReference | None
    image_id: str


def parse_reference(text: str, images: list[ImageRecord]) -> StorageReference:
    """Split REF into a name and an image ID, as containers/image does."""
    if not text:
        raise ClientError('"" is an empty reference')
    image_id = ""
    head, at, possible_id = text.rpartition("@")
    if at:
        if not possible_id:
            raise ClientError(f'empty trailing digest or ID in "{text}"')
        if not _DIGEST.fullmatch(possible_id):
            if _HEX64.fullmatch(possible_id):
                image_id = possible_id
            else:
                found = (
                    _find_by_id(images, possible_id)
                    if len(possible_id) >= MINIMUM_ID_PREFIX
                    else None
                )
                if found is None:
                    raise ClientError(
                        f'"{possible_id}" does not look like an image ID or digest'
                    )
                image_id = found.id
            text = head
    if (
        not image_id
        and len(text) >= MINIMUM_ID_PREFIX
        and not any(c in text for c in "@:")
    ):
        found = _find_by_id(images, text)
        if found is not None:
            return StorageReference(None, found.id)
    named = parse_named(text) if text else None
    return StorageReference(named, image_id)


def resolve_image(
    reference: StorageReference, images: list[ImageRecord], store_spec: str
) -> ImageRecord:
    """The image REF names; NotFoundError when the store has none.

    ``store_spec`` is the bracket part, for messages worded as skopeo's.
    """
    named = reference.named
    if reference.image_id:
        image = next((i for i in images if i.id == reference.image_id), None)
        if image is None:
            raise NotFoundError(f'identifier "{reference.image_id}" is not an image')
        if named is not None and not _carries_repository(image, named.repository):
            raise NotFoundError(f'no image matching reference "{named}" found')
        return image
    assert named is not None
    image = _find_by_name(images, named)
    if image is None:
        raise NotFoundError(
            f'reference "{store_spec}{named}" does not resolve to an image ID: '
            "identifier is not an image"
        )
    return image


def _carries_repository(image: ImageRecord, repository: str) -> bool:
    return any(_repository_of(name)[0] == repository for name in image.names)


def _find_by_name(
    images: list[ImageRecord], named: NamedReference
) -> ImageRecord | None:
    wanted = str(named)
    for image in images:
        if wanted in image.names:
            return image
    if named.digest:
        for image in images:
            if named.digest in image.manifest_digests() and _carries_repository(
                image, named.repository
            ):
                return image
    if not named.short:
        return None
    return _find_short_name(images, named)


def _find_short_name(
    images: list[ImageRecord], named: NamedReference
) -> ImageRecord | None:
    """Podman's lookup of a short name: ``localhost/NAME``, then ``*/NAME``."""
    local = parse_named(f"localhost/{named.typed_path}")
    suffix = f"/{named.typed_path}"
    for repository_matches in (
        lambda repository: repository == local.repository,
        lambda repository: repository.endswith(suffix),
    ):
        found = {
            image.id: image
            for image in images
            for stored in image.names
            if _name_matches(stored, named, repository_matches)
        }
        if len(found) > 1:
            raise ClientError(
                f'short name "{named.typed_path}" matches several images in the '
                f"store ({', '.join(sorted(found))}): use a full name or an ID"
            )
        if found:
            return next(iter(found.values()))
    return None


def _name_matches(
    stored: str, named: NamedReference, repository_matches: Callable[[str], bool]
) -> bool:
    repository, tag = _repository_of(stored)
    if not repository or not repository_matches(repository):
        return False
    if named.digest:
        return stored.endswith(f"@{named.digest}")
    return tag == named.tag


class StorageImageSource(ImageSource):
    """One image of a containers-storage store."""

    def __init__(
        self, name: str, store: Store, image: ImageRecord, named: NamedReference | None
    ) -> None:
        self.name = name
        self._store = store
        self._image = image
        self._named = named
        self._chain: list[LayerRecord] | None = None

    @property
    def store(self) -> Store:
        return self._store

    def layer_ids(self) -> list[str]:
        """The image's store layer IDs, base layer first. Blocking."""
        return [layer.id for layer in self._layer_chain()]

    def policy_scopes(self) -> list[str]:
        # containers/image scopes a storage image by its store and, when the
        # reference names one, its repository.
        store = self._store.location
        scopes = [f"{store.spec()}"]
        if self._named is not None:
            scopes.insert(0, f"{store.spec()}{self._named.repository}")
        return scopes

    # -- manifests and configs ---------------------------------------------------

    async def get_manifest(self, instance: Digest | None = None) -> tuple[bytes, str]:
        return await anyio.to_thread.run_sync(self._read_manifest, instance)

    def _read_manifest(self, instance: Digest | None) -> tuple[bytes, str]:
        if instance is not None:
            raw = self._store.big_data(self._image, f"manifest-{instance}")
            if raw is None:
                raise NotFoundError(
                    f'reading manifest for image instance "{instance}": '
                    + _missing_big_data(f"manifest-{instance}", self._image.id)
                )
            return raw, guess_media_type(raw)
        raw = None
        if self._named is not None and self._named.digest:
            raw = self._store.big_data(self._image, f"manifest-{self._named.digest}")
        if raw is None:
            raw = self._store.big_data(self._image, "manifest")
        if raw is None:
            raise SourceError(_missing_big_data("manifest", self._image.id))
        return raw, guess_media_type(raw)

    # -- layers --------------------------------------------------------------------

    def _layer_chain(self) -> list[LayerRecord]:
        if self._chain is None:
            self._chain = self._store.layer_chain(
                self._image.layer, self._store.layers()
            )
        return self._chain

    def _layer_by_diff_digest(self, digest: str) -> LayerRecord | None:
        for layer in self._layer_chain():
            if layer.diff_digest == digest:
                return layer
        # skopeo serves any layer of the store with that content.
        for layer in self._store.layers().values():
            if layer.diff_digest == digest:
                return layer
        return None

    def layer_infos_for_copy(self) -> list[LayerInfo]:
        raw, media_type = self._read_manifest(None)
        if media_type in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
            raise SourceError(f"{self.name}: schema 1 manifests are not supported")
        uncompressed, _ = _layer_types(media_type)
        manifest = parse_manifest(raw)
        chain = self._layer_chain()
        if len(chain) != len(manifest.layers):
            raise SourceError(
                f"{self.name}: the manifest lists {len(manifest.layers)} layers "
                f"but the store holds {len(chain)} for image {self._image.id}"
            )
        infos = []
        for layer in chain:
            if not layer.diff_digest:
                raise SourceError(
                    f"uncompressed digest for layer {layer.id} is unknown: layers "
                    "stored by TOC digest are not supported"
                )
            size = layer.diff_size if layer.diff_size >= 0 else -1
            infos.append(LayerInfo(layer.diff_digest, size, uncompressed))
        return infos

    def open_blob(self, digest: Digest) -> Blob:
        if digest == GZIPPED_EMPTY_LAYER_DIGEST:
            return Blob(io.BytesIO(GZIPPED_EMPTY_LAYER), len(GZIPPED_EMPTY_LAYER))
        layer = self._layer_by_diff_digest(str(digest))
        if layer is not None:
            reader = LayerTarReader(self._store, layer.id, layer.diff_digest)
            return Blob(io.BufferedReader(reader, 1 << 20), reader.size)
        raw = self._store.big_data(self._image, str(digest))
        if raw is None:
            raise NotFoundError(_missing_big_data(str(digest), self._image.id))
        return Blob(io.BytesIO(raw), len(raw))

    def layer_stream(self, digest: str, diff_id: str) -> LayerStream | None:
        layer = self._layer_by_diff_digest(diff_id)
        if layer is None:
            compressed = [
                record
                for record in self._layer_chain()
                if record.compressed_diff_digest == digest
            ]
            layer = compressed[0] if compressed else None
        if layer is None:
            raise NotFoundError(
                f"{self.name} has no layer with uncompressed digest {diff_id}"
            )
        return StoredLayerStream(self._store, layer.id, layer.diff_digest)


def layer_stream_by_id(store: Store, layer_id: str, parent_id: str) -> LayerStream:
    """A store layer as a splitfdstream, named by layer ID (upstream's form).

    ``parent_id`` may be empty or the layer's own parent: the store keeps a
    layer's tar as applied on its parent, and a diff against any other layer
    would have to be computed, which we do not do. Blocking.
    """
    record = store.layers().get(layer_id)
    if record is None:
        raise NotFoundError(f'layer not known: "{layer_id}" in {store.location.spec()}')
    if parent_id and parent_id != record.parent:
        raise UnsupportedError(
            f"layer {layer_id} was applied on {record.parent or 'no parent'}, not "
            f"{parent_id}: diffs against another layer are not supported"
        )
    return StoredLayerStream(store, layer_id, record.diff_digest)


def _missing_big_data(key: str, image_id: str) -> str:
    # containers-storage's wording, which clients may match on.
    return (
        f'locating item named "{key}" for image with ID "{image_id}" '
        "(consider removing the image to resolve the issue): file does not exist"
    )


def _layer_types(manifest_type: str) -> tuple[str, str]:
    """Uncompressed and gzip layer media types for a manifest type."""
    if manifest_type == OCI_MANIFEST:
        return OCI_LAYER, OCI_LAYER_GZIP
    if manifest_type == DOCKER_MANIFEST:
        return DOCKER_LAYER, DOCKER_LAYER_GZIP
    return "", ""


class StorageTransport(Transport):
    name = "containers-storage"

    async def open(self, reference: str, context: SystemContext) -> ImageSource:
        location, ref = split_store_spec(reference)
        store = Store(location or configured_store_location())
        images = await anyio.to_thread.run_sync(store.images)
        parsed = parse_reference(ref, images)
        image = resolve_image(parsed, images, store.location.spec())
        return StorageImageSource(
            f"containers-storage:{reference}", store, image, parsed.named
        )


register("containers-storage", StorageTransport)
