"""An opened image: the platform instance resolved, manifest and config cached.

Both protocols resolve an image the same way: start at the manifest the
reference names, descend through indexes (nested ones too, at most
``MAX_INDEX_DEPTH`` deep) choosing this machine's platform, then read and
verify the config. The result is computed once per opened image.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from protocol.errors import SourceError
from protocol.image import (
    DOCKER_MANIFEST,
    MULTI_IMAGE_TYPES,
    Digest,
    Manifest,
    OCIConfigView,
    PlatformWanted,
    check_single_image_type,
    choose_instance,
    diff_ids_of,
    docker_to_oci_manifest,
    parse_index,
    parse_manifest,
    parse_oci_config,
    serialise_full_config,
)
from proxy.transports.base import ImageSource, LayerInfo

MAX_INDEX_DEPTH = 4

#: containers/image refuses configs larger than this; so do we, so a hostile
#: source cannot make us buffer an arbitrary blob in memory.
MAX_CONFIG_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class ResolvedImage:
    """One single-platform image, as stored."""

    manifest_raw: bytes
    media_type: str
    digest: Digest
    manifest: Manifest
    config_raw: bytes
    config: OCIConfigView

    def oci_manifest(self) -> bytes:
        """The manifest in OCI form: converted for Docker, as stored for OCI."""
        if self.media_type == DOCKER_MANIFEST:
            return docker_to_oci_manifest(
                self.manifest, serialise_full_config(self.config)
            )
        return self.manifest_raw

    def layer_infos(self) -> list[LayerInfo]:
        return [
            LayerInfo(digest=layer.digest, size=layer.size, media_type=layer.media_type)
            for layer in self.manifest.layers
        ]

    def diff_ids(self) -> list[str]:
        return diff_ids_of(self.config, self.manifest.layers)


class OpenedImage:
    """An image source plus what we learned about it."""

    def __init__(self, source: ImageSource, platform: PlatformWanted) -> None:
        self.source = source
        self._platform = platform
        self._resolved: ResolvedImage | None = None
        self._lock = anyio.Lock()

    @property
    def name(self) -> str:
        return self.source.name

    async def resolve(self) -> ResolvedImage:
        async with self._lock:
            if self._resolved is None:
                self._resolved = await self._resolve()
            return self._resolved

    async def _resolve(self) -> ResolvedImage:
        raw, media_type = await self.source.get_manifest(None)
        digest = Digest.of(raw)
        for _ in range(MAX_INDEX_DEPTH):
            if media_type not in MULTI_IMAGE_TYPES:
                break
            entry = choose_instance(parse_index(raw), self._platform)
            digest = Digest(entry.digest)
            raw, media_type = await self.source.get_manifest(digest)
        else:
            raise SourceError(
                f"{self.name}: indexes nested more than {MAX_INDEX_DEPTH} deep"
            )
        check_single_image_type(media_type)
        manifest = parse_manifest(raw)
        config_raw = await anyio.to_thread.run_sync(self._read_config, manifest)
        return ResolvedImage(
            manifest_raw=raw,
            media_type=media_type,
            digest=digest,
            manifest=manifest,
            config_raw=config_raw,
            config=parse_oci_config(config_raw),
        )

    def _read_config(self, manifest: Manifest) -> bytes:
        digest = Digest(manifest.config.digest)
        blob = self.source.open_blob(digest)
        try:
            raw = blob.reader.read(MAX_CONFIG_SIZE + 1)
        finally:
            blob.close()
        if len(raw) > MAX_CONFIG_SIZE:
            raise SourceError(f"config {digest} of {self.name} is larger than 4 MiB")
        if not digest.matches(raw):
            raise SourceError(
                f"config {digest} of {self.name} does not match its digest"
            )
        return raw

    async def close(self) -> None:
        await self.source.close()
