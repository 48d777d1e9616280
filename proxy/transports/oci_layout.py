"""``oci:DIR[:REF]``: an OCI image layout directory.

REF is matched against the ``org.opencontainers.image.ref.name`` annotation of
the entries of ``index.json``; ``@N`` picks entry N and a digest picks the
entry with that digest. Without REF the index must hold exactly one entry.

Blobs are opened beneath the layout: ``DIR/blobs/ALG/HEX`` must resolve to a
regular file inside ``DIR/blobs`` (or inside ``--shared-blob-dir``). We check
the path the kernel actually opened (via ``/proc/self/fd``), not a path we
computed beforehand, so a symlink swapped in between the check and the open
cannot redirect us outside the layout.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, cast

import anyio

from protocol.errors import ClientError, NotFoundError, SourceError
from protocol.image import Digest, Index, guess_media_type, parse_index
from proxy.policy import path_scopes
from proxy.transports.base import Blob, ImageSource, SystemContext, Transport, register

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


class ImageNotFoundError(NotFoundError):
    """The layout exists but holds no image under that reference."""


def split_path_and_ref(reference: str) -> tuple[str, str]:
    # containers/image splits at the first colon on Unix, so a path with a
    # colon in it cannot be named; we keep that for identical behaviour.
    path, _, ref = reference.partition(":")
    return path, ref


def _os_error_text(exc: OSError, path: str) -> str:
    """Word an OSError as Go's os package does: ``open PATH: reason``."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"open {path}: {reason[0].lower()}{reason[1:]}"


def open_regular_file(path: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading, refusing anything but a regular file.

    The open itself never blocks: a FIFO (or a device) put where a blob or an
    index should be would otherwise wait for ever for a writer, holding a
    worker thread. It is opened non-blocking, checked with ``fstat``, and only
    a regular file is switched back to blocking reads.

    :returns: the fd (close-on-exec, the caller owns it) and its ``fstat``.
    :raises NotFoundError: nothing is at ``path``.
    :raises SourceError: it cannot be opened or is not a regular file.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise NotFoundError(_os_error_text(exc, path)) from None
    except OSError as exc:
        raise SourceError(_os_error_text(exc, path)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SourceError(
                f"{path} is {_file_kind(info.st_mode)}, not a regular file: refused"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def _check_parent_exists(path: str) -> None:
    """Fail as containers/image does when a directory above ``path`` is missing.

    It resolves the layout path to an absolute one first, which fails on the
    first missing component of the parent directory; a missing last
    component is only noticed when index.json is read.
    """
    if os.path.lexists(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    probe = "/"
    for part in parent.split("/"):
        if not part:
            continue
        probe = os.path.join(probe, part)
        if not os.path.lexists(probe):
            raise SourceError(f"lstat {probe}: no such file or directory")


class OCILayoutSource(ImageSource):
    def __init__(
        self, name: str, root: str, ref: str, index: Index, shared_blob_dir: str | None
    ) -> None:
        self.name = name
        self._root = root
        # --shared-blob-dir moves blobs out of the layout: ALG/HEX beneath it.
        self._blobs = shared_blob_dir or os.path.join(root, "blobs")
        self._real_blobs = os.path.realpath(self._blobs)
        self._ref = ref
        self._index = index
        self._top = self._find_top_descriptor()

    def _find_top_descriptor(self) -> tuple[Digest, str]:
        manifests = self._index.manifests
        ref = self._ref
        if not ref:
            if len(manifests) != 1:
                # skopeo's wording, so clients matching on it keep working.
                raise ClientError(
                    "more than one image in oci, choose an image"
                    if manifests
                    else "no images found in index.json"
                )
            chosen = manifests[0]
        elif ref.startswith("@") and ref[1:].isdigit():
            position = int(ref[1:])
            if position >= len(manifests):
                raise ImageNotFoundError(
                    f"index {position} is out of range: index.json has "
                    f"{len(manifests)} entries"
                )
            chosen = manifests[position]
        else:
            matches = [
                entry
                for entry in manifests
                if entry.annotations.get(REF_NAME_ANNOTATION) == ref
                or entry.digest == ref
            ]
            if not matches:
                raise ImageNotFoundError(f'no descriptor found for reference "{ref}"')
            chosen = matches[0]
        return Digest(chosen.digest), chosen.media_type

    def policy_scopes(self) -> list[str]:
        scopes = path_scopes(self._root)
        if self._ref:
            return [f"{scopes[0]}:{self._ref}", *scopes]
        return scopes

    async def get_manifest(self, instance: Digest | None = None) -> tuple[bytes, str]:
        digest, media_type = self._top if instance is None else (instance, "")
        raw = await anyio.to_thread.run_sync(self._read_small_blob, digest)
        if not digest.matches(raw):
            raise SourceError(
                f"manifest {digest} in {self.name} does not match its digest"
            )
        return raw, media_type or guess_media_type(raw)

    def _read_small_blob(self, digest: Digest) -> bytes:
        blob = self.open_blob(digest)
        try:
            return blob.reader.read()
        finally:
            blob.close()

    def open_blob(self, digest: Digest) -> Blob:
        path = os.path.join(self._blobs, digest.algorithm, digest.hex)
        try:
            fd, info = open_regular_file(path)
        except NotFoundError:
            raise
        except SourceError as exc:
            raise SourceError(f"blob {digest} in {self.name}: {exc}") from None
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
            if not opened.startswith(self._real_blobs + os.sep):
                raise SourceError(
                    f"blob {digest} in {self.name} resolves to {opened}, "
                    "outside the layout's blobs: refused"
                )
            reader = cast(BinaryIO, os.fdopen(fd, "rb", buffering=0))
        except BaseException:
            os.close(fd)
            raise
        return Blob(reader=reader, size=info.st_size, fileno=fd)


class OCILayoutTransport(Transport):
    name = "oci"

    async def open(self, reference: str, context: SystemContext) -> ImageSource:
        root, ref = split_path_and_ref(reference)
        if not root:
            raise ClientError(f'Invalid image name "oci:{reference}": empty path')
        _check_parent_exists(root)
        index_path = os.path.join(root, "index.json")
        raw = await anyio.to_thread.run_sync(_read_index, index_path)
        index = parse_index(raw)
        return OCILayoutSource(
            f"oci:{reference}", root, ref, index, context.shared_blob_dir
        )


def _read_index(index_path: str) -> bytes:
    try:
        fd, _ = open_regular_file(index_path)
    except NotFoundError as exc:
        # A missing directory is not "image not found" for skopeo either:
        # OpenImageOptional reports it as an error, verbatim.
        raise SourceError(str(exc)) from None
    with os.fdopen(fd, "rb") as reader:
        try:
            return reader.read()
        except OSError as exc:
            raise SourceError(f"read {index_path}: {exc.strerror}") from None


register("oci", OCILayoutTransport)
