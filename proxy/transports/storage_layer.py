"""A stored layer rebuilt from its tar-split and its unpacked files.

Two ways out of the store, both under the layer store's read lock, held until
the consumer closes what it got, so a cooperating writer (``podman rmi``)
waits instead of deleting files mid-stream:

- :class:`LayerTarReader`: the original tar as a plain byte stream (legacy
  GetBlob), segments from the tar-split interleaved with file contents read
  from the layer's directory. Memory: one tar-split chunk and one read buffer.
- :class:`StoredLayerStream`: the same tar as a splitfdstream. The stream is
  built once into a sealed memfd from the tar-split segments; each file with
  content becomes an external file, opened again only when a window of fds is
  asked for. The proxy reads no content except for files others may not read
  (mode without ``o+r``): those are copied inline, because the fd we would
  pass was opened with our credentials and we cannot see the client's
  (SO_PEERCRED of the jsonrpc socket is the client's end, not the reader of
  the fds); the inline copy gives the client the same bytes the tar does.
  Memory: the stream (headers, padding, those inline files) in the memfd,
  plus one path per external file.

Files are opened beneath the layer directory one component at a time with
``O_NOFOLLOW`` from a directory fd, so a symlink anywhere on the way, or a
name with ``..``, is refused rather than followed; only regular files whose
size is the one tar-split recorded are accepted.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import threading
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

from protocol.errors import NotFoundError, SourceError
from protocol.splitfdstream import SplitFDStreamWriter
from protocol.tarsplit import (
    FileEntry,
    Segment,
    TarSplitDecoder,
    TarSplitError,
    content_path,
)
from proxy.transports.base import LayerStream
from proxy.transports.storage_store import SharedLock, Store

_READ_CHUNK = 1 << 20
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted where a file should be must not hang the open.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class BeneathOpener:
    """Opens files beneath one directory without following any symlink.

    Keeps the fd of the last parent directory walked, because tar entries
    come grouped by directory; at most two directory fds are open at once.
    """

    def __init__(self, root: Path, layer_id: str) -> None:
        self._layer_id = layer_id
        try:
            self._root_fd = os.open(root, _DIR_FLAGS)
        except FileNotFoundError:
            raise NotFoundError(
                f"layer {layer_id} has no content directory {root}"
            ) from None
        except OSError as exc:
            raise SourceError(f"opening {root}: {exc.strerror}") from None
        self._parent: tuple[tuple[bytes, ...], int] | None = None
        # Windows of one stream may be opened by several worker threads.
        self._mutex = threading.Lock()

    def open(self, components: tuple[bytes, ...], size: int) -> int:
        """A read-only fd on the regular file at ``components``, of ``size`` bytes."""
        with self._mutex:
            return self._open(components, size)

    def _open(self, components: tuple[bytes, ...], size: int) -> int:
        parent_fd = self._parent_fd(components[:-1])
        name = components[-1]
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise self._refusal(components, exc) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise SourceError(
                    f"{_show(components)} in layer {self._layer_id} is not a "
                    "regular file: refused"
                )
            if info.st_size != size:
                raise SourceError(
                    f"{_show(components)} in layer {self._layer_id} has "
                    f"{info.st_size} bytes where its tar-split says {size}: "
                    "the store is damaged"
                )
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent_fd(self, directories: tuple[bytes, ...]) -> int:
        if self._parent is not None:
            if self._parent[0] == directories:
                return self._parent[1]
            os.close(self._parent[1])
            self._parent = None
        fd = os.dup(self._root_fd)
        try:
            for position, name in enumerate(directories):
                try:
                    next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise self._refusal(directories[: position + 1], exc) from None
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        self._parent = (directories, fd)
        return fd

    def _refusal(self, components: tuple[bytes, ...], exc: OSError) -> SourceError:
        where = f"{_show(components)} in layer {self._layer_id}"
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return SourceError(f"{where} is or passes through a symlink: refused")
        if exc.errno == errno.ENOENT:
            return SourceError(f"{where} is missing from the layer's files")
        return SourceError(f"opening {where}: {exc.strerror}")

    def close(self) -> None:
        with self._mutex:
            if self._parent is not None:
                os.close(self._parent[1])
                self._parent = None
            if self._root_fd >= 0:
                os.close(self._root_fd)
                self._root_fd = -1


def _show(components: tuple[bytes, ...]) -> str:
    return "/".join(part.decode("utf-8", "backslashreplace") for part in components)


def read_tar_split(path: Path, layer_id: str) -> Iterator[Segment | FileEntry]:
    """The tar-split entries of a layer, decoded as the file is read."""
    decoder = TarSplitDecoder()
    try:
        reader = path.open("rb")
    except FileNotFoundError:
        raise SourceError(
            f"layer {layer_id} has no tar-split {path}: its tar cannot be rebuilt"
        ) from None
    with reader:
        try:
            while chunk := reader.read(_READ_CHUNK):
                yield from decoder.feed(chunk)
            yield from decoder.finish()
        except TarSplitError as exc:
            raise SourceError(f"tar-split of layer {layer_id}: {exc}") from None


def _read_exactly(fd: int, size: int, what: str) -> Iterator[bytes]:
    left = size
    while left:
        chunk = os.read(fd, min(left, _READ_CHUNK))
        if not chunk:
            raise SourceError(f"{what} ended {left} bytes early")
        left -= len(chunk)
        yield chunk


class _LockedLayer:
    """A layer's files and tar-split, with the layer store's read lock held."""

    def __init__(self, store: Store, layer_id: str, diff_digest: str) -> None:
        self.layer_id = layer_id
        self._lock = SharedLock(store.layers_lock_path, store.lock_timeout)
        try:
            # The layer may have gone while we waited for the lock.
            record = store.layers_locked().get(layer_id)
            if record is None or record.diff_digest != diff_digest:
                raise NotFoundError(
                    f"layer {layer_id} ({diff_digest}) is no longer in the store"
                )
            self.size = record.diff_size
            self.tar_split = store.tar_split_path(layer_id)
            self.opener = BeneathOpener(store.content_dir(layer_id), layer_id)
        except BaseException:
            self._lock.release()
            raise

    def entries(self) -> Iterator[Segment | FileEntry]:
        return read_tar_split(self.tar_split, self.layer_id)

    def open_content(self, entry: FileEntry) -> int:
        try:
            components = content_path(entry.name)
        except TarSplitError as exc:
            raise SourceError(f"tar-split of layer {self.layer_id}: {exc}") from None
        return self.opener.open(components, entry.size)

    def close(self) -> None:
        self.opener.close()
        self._lock.release()


class LayerTarReader(io.RawIOBase):
    """The layer's uncompressed tar, rebuilt as it is read."""

    def __init__(self, store: Store, layer_id: str, diff_digest: str) -> None:
        super().__init__()
        self._layer = _LockedLayer(store, layer_id, diff_digest)
        self.size = self._layer.size
        self._pieces = self._generate()
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _generate(self) -> Generator[bytes, None, None]:
        for entry in self._layer.entries():
            if isinstance(entry, Segment):
                yield entry.payload
            elif entry.size:
                fd = self._layer.open_content(entry)
                try:
                    what = f"{entry.name!r} in layer {self._layer.layer_id}"
                    yield from _read_exactly(fd, entry.size, what)
                finally:
                    os.close(fd)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._current:
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._current = memoryview(piece)
                continue
            count = min(len(view) - filled, len(self._current))
            view[filled : filled + count] = self._current[:count]
            self._current = self._current[count:]
            filled += count
        return filled

    def close(self) -> None:
        if not self.closed:
            self._pieces.close()
            self._layer.close()
        super().close()


class StoredLayerStream(LayerStream):
    """A stored layer as a splitfdstream: inline tar-split, fds on its files."""

    def __init__(self, store: Store, layer_id: str, diff_digest: str) -> None:
        self.diff_id = diff_digest
        self._layer = _LockedLayer(store, layer_id, diff_digest)
        self._memfd = -1
        try:
            self._files, self.size = self._build()
        except BaseException:
            self.close()
            raise
        self.file_count = len(self._files)

    def _build(self) -> tuple[list[FileEntry], int]:
        self._memfd = os.memfd_create(
            f"splitfdstream-{self._layer.layer_id}",
            os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING,
        )
        writer = SplitFDStreamWriter()
        external: list[FileEntry] = []
        size = 0
        for entry in self._layer.entries():
            if isinstance(entry, Segment):
                self._write(writer.inline(entry.payload))
                size += len(entry.payload)
                continue
            if not entry.size:
                continue
            size += entry.size
            fd = self._layer.open_content(entry)
            try:
                if os.fstat(fd).st_mode & stat.S_IROTH:
                    self._write(writer.external(len(external)))
                    external.append(entry)
                else:
                    what = f"{entry.name!r} in layer {self._layer.layer_id}"
                    for chunk in _read_exactly(fd, entry.size, what):
                        self._write(writer.inline(chunk))
            finally:
                os.close(fd)
        self._write(writer.finish())
        if self._layer.size >= 0 and size != self._layer.size:
            raise SourceError(
                f"layer {self._layer.layer_id} rebuilds to {size} bytes but the "
                f"store records {self._layer.size}: the store is damaged"
            )
        # Sealed, so no holder of a stream fd can change what others read.
        fcntl.fcntl(
            self._memfd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_WRITE
            | fcntl.F_SEAL_GROW
            | fcntl.F_SEAL_SHRINK
            | fcntl.F_SEAL_SEAL,
        )
        return external, size

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._memfd, view) :]

    def open_stream(self) -> int:
        # A new open file description: its own offset, read-only.
        return os.open(f"/proc/self/fd/{self._memfd}", os.O_RDONLY | os.O_CLOEXEC)

    def open_files(self, start: int, count: int) -> list[int]:
        fds: list[int] = []
        try:
            for entry in self._files[start : start + count]:
                fds.append(self._layer.open_content(entry))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def close(self) -> None:
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
        self._layer.close()
