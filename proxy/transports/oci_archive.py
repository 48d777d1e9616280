"""``oci-archive:FILE[:REF]``: an OCI image layout packed in a tar file.

containers/image unpacks the whole archive into a temporary directory before
reading a byte of it. We read the tar's headers once instead, keeping each
member's offset and size (:class:`TarArchive`), and serve every blob as a
byte range of the archive file read with ``pread``: opening costs one pass
over the headers (O(members) reads of 512 bytes, skipping over contents),
memory is O(members), and no blob is copied to disk. REF is resolved as for
``oci:`` (the ``org.opencontainers.image.ref.name`` annotation, ``@N`` or a
digest).

A compressed archive (gzip, zstd, xz, bzip2, as containers/image accepts) has
no byte ranges to serve, so it is decompressed once into an anonymous
temporary file (``O_TMPFILE`` under ``$TMPDIR``, else ``/var/tmp``, as
containers/image puts big temporary files) that the kernel removes when the
last reader closes it, crash or not; the archive is then read from there.

Where we differ from containers/image: a missing FILE is "missing"
(:class:`NotFoundError`) so that OpenImageOptional answers 0, where
containers/image reports it as an error; its text is the one skopeo gives.
When the tar names a member twice, the first one wins (containers/image's
unpacking lets the last one overwrite it).
"""

from __future__ import annotations

import bz2
import io
import lzma
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, cast

import anyio
import isal.igzip
import zstandard

from protocol.errors import ClientError, NotFoundError, SourceError
from protocol.image import Digest, parse_index
from proxy.policy import path_scopes
from proxy.transports.base import Blob, ImageSource, SystemContext, Transport, register
from proxy.transports.oci_layout import (
    OCILayoutSource,
    open_regular_file,
    split_path_and_ref,
)

#: Symbolic links followed inside an archive before giving up (Linux's limit).
MAX_LINK_HOPS = 40

#: containers/image's bound on an index.json it reads.
MAX_INDEX_SIZE = 4 * 1024 * 1024

#: Members an archive may have: bounds the index's memory (tarfile keeps a
#: TarInfo per member too) for hostile input. Image archives have a few.
MAX_MEMBERS = 100_000

_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
}


def sniff_compression(head: bytes) -> str | None:
    """The compression whose magic number ``head`` starts with, if any."""
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def decompressing_reader(raw: BinaryIO, compression: str) -> BinaryIO:
    """A reader of ``raw`` decompressed; closing it leaves ``raw`` open."""
    if compression == "gzip":
        # isal's typing stubs leave open() untyped.
        gzip_open: Callable[..., BinaryIO] = isal.igzip.open
        return gzip_open(raw, "rb")
    if compression == "zstd":
        stream = zstandard.ZstdDecompressor().stream_reader(
            raw, read_across_frames=True, closefd=False
        )
        return cast(BinaryIO, stream)
    if compression == "xz":
        return cast(BinaryIO, lzma.LZMAFile(raw))
    return cast(BinaryIO, bz2.BZ2File(raw))


class RangeReader(io.RawIOBase):
    """A blocking reader of ``size`` bytes at ``offset`` of a file.

    It owns ``fd`` (a duplicate, so it outlives the archive it came from)
    and reads with ``pread``, so any number of readers share one file with
    no seek position to fight over.
    """

    def __init__(self, fd: int, offset: int, size: int, what: str) -> None:
        super().__init__()
        self._fd = fd
        self._position = offset
        self._end = offset + size
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self._end - self._position)
        if wanted <= 0:
            return 0
        data = os.pread(self._fd, wanted, self._position)
        if not data:
            raise SourceError(f"{self._what}: the archive ends inside this member")
        memoryview(buffer)[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@dataclass(frozen=True, slots=True)
class TarMember:
    """Where one member of an indexed tar lives."""

    name: str
    #: Offset of the member's content in the (uncompressed) archive.
    offset: int
    size: int
    is_file: bool
    #: Archive path a hard or symbolic link points at, "" otherwise.
    link: str


def clean_member_name(name: str) -> str:
    """An archive path as Go's ``path.Clean`` leaves it, minus a leading /."""
    return posixpath.normpath("/" + name).lstrip("/")


class TarArchive:
    """A tar file whose members are indexed once and read as byte ranges.

    :meth:`open` is blocking: call it from a worker thread.
    """

    def __init__(self, path: str, fd: int, members: dict[str, TarMember]) -> None:
        self.path = path
        self._fd = fd
        self._members = members

    @classmethod
    def open(cls, path: str) -> TarArchive:
        """Index the tar at ``path``, decompressing it first if needed.

        :raises NotFoundError: there is no file at ``path``.
        :raises SourceError: it cannot be read or is not a tar archive.
        """
        fd, _ = open_regular_file(path)
        try:
            compression = sniff_compression(os.pread(fd, 8, 0))
            if compression is not None:
                fd = _decompress_to_temporary(fd, compression, path)
            return cls(path, fd, _index_members(fd, path))
        except BaseException:
            os.close(fd)
            raise

    def find(self, name: str) -> TarMember | None:
        """The regular file ``name`` names after following links, or None."""
        member = self._members.get(clean_member_name(name))
        for _ in range(MAX_LINK_HOPS):
            if member is None or member.is_file:
                return member
            member = self._members.get(member.link)
        raise SourceError(f"{self.path}: links from {name} form a loop")

    def open_member(self, name: str) -> Blob:
        """A reader of member ``name``; the archive may close meanwhile.

        :raises NotFoundError: the archive has no regular file of that name.
        """
        member = self.find(name)
        if member is None:
            raise NotFoundError(f"{self.path} has no file {name}")
        reader = RangeReader(
            os.dup(self._fd), member.offset, member.size, f"{self.path}: {name}"
        )
        return Blob(reader=cast(BinaryIO, reader), size=member.size)

    def read_member(self, name: str, limit: int) -> bytes:
        """The whole of a small member, refused when larger than ``limit``."""
        blob = self.open_member(name)
        try:
            if blob.size > limit:
                raise SourceError(
                    f"{self.path}: {name} is {blob.size} bytes, over the"
                    f" {limit} bytes allowed"
                )
            return blob.reader.read()
        finally:
            blob.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _temporary_directory() -> str:
    return os.environ.get("TMPDIR") or "/var/tmp"


def _decompress_to_temporary(fd: int, compression: str, path: str) -> int:
    """Decompress the archive on ``fd`` into an unlinked file; close ``fd``."""
    with os.fdopen(fd, "rb", closefd=True) as compressed:
        output = tempfile.TemporaryFile(dir=_temporary_directory())
        try:
            with decompressing_reader(cast(BinaryIO, compressed), compression) as tar:
                shutil.copyfileobj(tar, output, 1 << 20)
            output.flush()
            return os.dup(output.fileno())
        except (OSError, EOFError, zstandard.ZstdError, lzma.LZMAError) as exc:
            raise SourceError(
                f"{path}: the {compression}-compressed archive is corrupt: {exc}"
            ) from None
        finally:
            output.close()


def _index_members(fd: int, path: str) -> dict[str, TarMember]:
    members: dict[str, TarMember] = {}
    raw = os.fdopen(os.dup(fd), "rb")
    try:
        # A duplicate shares the offset, which decompressing left at the end.
        raw.seek(0)
        with tarfile.open(fileobj=raw, mode="r:") as tar:
            while (info := tar.next()) is not None:
                if len(members) >= MAX_MEMBERS:
                    raise SourceError(f"{path}: more than {MAX_MEMBERS} members")
                name = clean_member_name(info.name)
                members.setdefault(name, _member_of(info, name))
    except tarfile.TarError as exc:
        raise SourceError(f"{path} is not a tar archive: {exc}") from None
    finally:
        raw.close()
    return members


def _member_of(info: tarfile.TarInfo, name: str) -> TarMember:
    link = ""
    if info.issym():
        target = info.linkname
        base = "" if target.startswith("/") else posixpath.dirname(name)
        link = clean_member_name(posixpath.join(base, target))
    elif info.islnk():
        link = clean_member_name(info.linkname)
    is_file = info.isreg() and not info.issparse()
    return TarMember(name, info.offset_data, info.size if is_file else 0, is_file, link)


# -- the transport -------------------------------------------------------------


class OCIArchiveSource(OCILayoutSource):
    """An OCI layout read in place from an indexed tar."""

    def __init__(self, name: str, archive: TarArchive, ref: str) -> None:
        self._archive = archive
        try:
            raw = archive.read_member("index.json", MAX_INDEX_SIZE)
        except NotFoundError:
            raise SourceError(f"{archive.path} holds no index.json") from None
        super().__init__(name, archive.path, ref, parse_index(raw), None)

    def open_blob(self, digest: Digest) -> Blob:
        member = f"blobs/{digest.algorithm}/{digest.hex}"
        try:
            return self._archive.open_member(member)
        except NotFoundError:
            raise NotFoundError(
                f"blob {digest} is not in {self.name} (no {member} in the archive)"
            ) from None

    def policy_scopes(self) -> list[str]:
        return path_scopes(self._archive.path)

    async def close(self) -> None:
        self._archive.close()


class OCIArchiveTransport(Transport):
    name = "oci-archive"

    async def open(self, reference: str, context: SystemContext) -> ImageSource:
        path, ref = split_path_and_ref(reference)
        if not path:
            raise ClientError(
                f'Invalid image name "oci-archive:{reference}": empty path'
            )
        archive = await anyio.to_thread.run_sync(_open_archive, path)
        try:
            return await anyio.to_thread.run_sync(
                OCIArchiveSource, f"oci-archive:{reference}", archive, ref
            )
        except BaseException:
            archive.close()
            raise


def _open_archive(path: str) -> TarArchive:
    try:
        return TarArchive.open(path)
    except NotFoundError as exc:
        # skopeo's wording: it fails while making the directory to unpack into.
        raise NotFoundError(f"creating temp directory: {exc}") from None


register("oci-archive", OCIArchiveTransport)
