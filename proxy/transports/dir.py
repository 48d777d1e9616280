"""``dir:DIR``: skopeo's directory format.

``skopeo copy ... dir:DIR`` writes the manifest as ``DIR/manifest.json``,
each blob as ``DIR/<hex of its digest>`` (the algorithm is not kept), the
instances of a list as ``DIR/<hex>.manifest.json`` and a ``version`` file
reading ``Directory Transport Version: 1.1``. The manifest's media type is
guessed from its content, as containers/image does; the ``version`` file is
not checked, as containers/image does not check it when reading.

Blobs are opened beneath DIR only: we check the path the kernel actually
opened, so a symlink inside DIR cannot make us serve a file outside it.

Where we differ from containers/image: it opens ``dir:`` without looking at
the directory, so a missing directory or manifest only fails at GetManifest.
We read ``manifest.json`` at open instead, so the error comes at OpenImage
with the same text, and OpenImageOptional answers 0 when it is missing.
"""

from __future__ import annotations

import os
from typing import BinaryIO, cast

import anyio

from protocol.errors import ClientError, NotFoundError, SourceError
from protocol.image import Digest, guess_media_type
from proxy.policy import path_scopes
from proxy.transports.base import Blob, ImageSource, SystemContext, Transport, register
from proxy.transports.oci_layout import open_regular_file

MAX_MANIFEST_SIZE = 4 * 1024 * 1024


class DirectorySource(ImageSource):
    """An image copied into a directory by ``skopeo copy ... dir:DIR``."""

    def __init__(self, name: str, root: str) -> None:
        self.name = name
        self._root = root
        self._real_root = os.path.realpath(root)

    def policy_scopes(self) -> list[str]:
        return path_scopes(self._root)

    async def get_manifest(self, instance: Digest | None = None) -> tuple[bytes, str]:
        filename = (
            "manifest.json" if instance is None else f"{instance.hex}.manifest.json"
        )
        raw = await anyio.to_thread.run_sync(self.read_manifest, filename)
        if instance is not None and not instance.matches(raw):
            raise SourceError(
                f"manifest {instance} in {self.name} does not match its digest"
            )
        return raw, guess_media_type(raw)

    def read_manifest(self, filename: str) -> bytes:
        """The bytes of a manifest file in DIR; blocking."""
        fd, size = self._open_inside(filename)
        with os.fdopen(fd, "rb") as reader:
            if size > MAX_MANIFEST_SIZE:
                raise SourceError(f"{self.name}: {filename} is larger than 4 MiB")
            return reader.read()

    def open_blob(self, digest: Digest) -> Blob:
        fd, size = self._open_inside(digest.hex)
        reader = cast(BinaryIO, os.fdopen(fd, "rb", buffering=0))
        return Blob(reader=reader, size=size, fileno=fd)

    def _open_inside(self, filename: str) -> tuple[int, int]:
        """Open DIR/filename, refusing anything that resolves outside DIR."""
        path = os.path.join(self._root, filename)
        try:
            fd, info = open_regular_file(path)
        except NotFoundError:
            raise
        except SourceError as exc:
            raise SourceError(f"{self.name}: {exc}") from None
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.dirname(opened) != self._real_root:
                raise SourceError(
                    f"{filename} in {self.name} resolves to {opened}, outside "
                    "the directory: refused"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size


class DirectoryTransport(Transport):
    name = "dir"

    async def open(self, reference: str, context: SystemContext) -> ImageSource:
        if not reference:
            raise ClientError('Invalid image name "dir:": empty path')
        source = DirectorySource(f"dir:{reference}", reference)
        # Read now so a missing image is reported at open (see the top).
        await anyio.to_thread.run_sync(source.read_manifest, "manifest.json")
        return source


register("dir", DirectoryTransport)
