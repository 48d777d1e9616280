"""Apply a layer's splitfdstream (or plain tar) on top of a directory.

The stream's inline bytes run through the tar splitter; each external file
is the content of the regular file whose header came just before it, and is
put in place by ``ioctl(FICLONE)`` (a reflink: no data copied), else by
``copy_file_range``, else by read and write. The first method that fails
with "not supported here" is not tried again for the rest of the layer, so a
filesystem without reflinks costs one failed ioctl, not one per file.

Layer semantics follow the OCI image spec: ``.wh.NAME`` removes NAME as left
by lower layers and is never created; ``.wh..wh..opq`` empties its directory
of everything lower layers put there while keeping what this layer added,
wherever the marker sits among its siblings. A directory entry over an
existing directory keeps its contents. Directory modes and mtimes are set
once the layer is done, since adding children changes a directory's mtime
and a read-only directory would refuse them.

Safety: every path is resolved one component at a time from a directory fd
of DEST with ``O_NOFOLLOW``, so no entry can escape DEST. Entries whose names
(or hardlink targets) are absolute or contain ``..`` are refused, and so is
any entry whose path runs through a symlink, whoever planted it: we refuse
rather than resolve the symlink inside DEST as containerd does, so a layer
that writes through a lower layer's symlink (``lib/x`` with ``lib ->
usr/lib``) fails to apply.

Bounds: memory is one 1 MiB read plus one entry's headers; fds open at once
are DEST, one parent directory and the file being written (plus the borrowed
external fd).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from protocol.errors import SourceError
from protocol.splitfdstream import (
    External,
    SplitFDStreamError,
    SplitFDStreamReader,
)
from protocol.tar import (
    Content,
    EntryType,
    Header,
    TarEntry,
    TarSplitter,
    is_opaque_whiteout,
    whiteout_target,
)

__all__ = ["ApplyStats", "LayerApplier", "UnsafeEntryError"]

log = logging.getLogger(__name__)

_READ_SIZE = 1 << 20
_FICLONE = 0x40049409
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WHITEOUT_PREFIX = ".wh."

# errno values meaning "this way of copying does not work here", as opposed
# to a real I/O failure.
_CLONE_UNSUPPORTED = frozenset(
    {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
)
_XATTR_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EPERM, errno.EACCES})

_REFLINK = "reflink"
_COPY_FILE_RANGE = "copy_file_range"
_READ_WRITE = "read/write"


class UnsafeEntryError(SourceError):
    """A layer entry would land outside DEST; it names the entry."""


@dataclass(slots=True)
class ApplyStats:
    """What a ``LayerApplier`` did, summed over every layer it applied."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    whiteouts: int = 0
    opaque_directories: int = 0
    bytes_reflinked: int = 0
    bytes_copied: int = 0
    bytes_inline: int = 0
    devices_skipped: int = 0
    entries_skipped: int = 0
    xattrs_set: int = 0
    xattrs_skipped: int = 0


class LayerApplier:
    """Applies layers, one after another, to the directory ``dest``.

    :param preserve_owner: set file owners from the tar; by default only
        when running as root, since nobody else may give files away.
    """

    def __init__(self, dest: Path, *, preserve_owner: bool | None = None) -> None:
        self.dest = dest
        self.preserve_owner = (
            os.geteuid() == 0 if preserve_owner is None else preserve_owner
        )
        self.stats = ApplyStats()

    def apply(self, stream: BinaryIO, external_fd: Callable[[int], int]) -> None:
        """Apply one layer given as a splitfdstream.

        :param stream: the splitfdstream, read to its end.
        :param external_fd: returns a borrowed fd (not closed here) for
            external file ``k``; files are asked for in increasing ``k``.
        """
        reader = SplitFDStreamReader()
        with _LayerRun(self) as run:
            while chunk := stream.read(_READ_SIZE):
                try:
                    events = reader.feed(chunk)
                except SplitFDStreamError as err:
                    raise SourceError(f"applying to {self.dest}: {err}") from err
                for event in events:
                    if isinstance(event, External):
                        run.external(external_fd(event.index), event.index)
                    else:
                        run.inline(event.data)
            try:
                reader.finish()
            except SplitFDStreamError as err:
                raise SourceError(f"applying to {self.dest}: {err}") from err
            run.finish()

    def apply_tar(self, stream: BinaryIO) -> None:
        """Apply one layer given as a plain uncompressed tar stream."""
        with _LayerRun(self) as run:
            while chunk := stream.read(_READ_SIZE):
                run.inline(chunk)
            run.finish()


def _parts(name: str, entry_name: str, what: str = "name") -> tuple[str, ...]:
    """Split a tar path into components relative to DEST, refusing escapes."""
    if name.startswith("/"):
        raise UnsafeEntryError(
            f"layer entry {entry_name!r} has an absolute {what}, which would"
            " escape the destination"
        )
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeEntryError(
            f"layer entry {entry_name!r} has '..' in its {what}, which would"
            " escape the destination"
        )
    if any("\x00" in p for p in parts):
        raise SourceError(f"layer entry {entry_name!r} has a NUL byte in its {what}")
    return parts


class _LayerRun:
    """The state of applying one layer."""

    def __init__(self, applier: LayerApplier) -> None:
        self._applier = applier
        self._stats = applier.stats
        self._splitter = TarSplitter()
        self._dest_fd = os.open(applier.dest, _DIR_FLAGS)
        self._parent: tuple[tuple[str, ...], int] | None = None
        # Paths this layer created, and all their ancestors: what an opaque
        # marker must keep.
        self._added: set[tuple[str, ...]] = set()
        self._directories: list[tuple[tuple[str, ...], TarEntry]] = []
        self._method = _REFLINK
        self._file_fd: int | None = None
        self._file_entry: TarEntry | None = None
        self._file_written = 0
        self._devices_skipped = 0

    def __enter__(self) -> _LayerRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close_file()
        self._drop_parent()
        os.close(self._dest_fd)

    def inline(self, data: bytes) -> None:
        for event in self._splitter.feed(data):
            if isinstance(event, Header):
                self._begin(event.entry)
            elif isinstance(event, Content):
                self._write(event.data)

    def external(self, source_fd: int, index: int) -> None:
        left = self._splitter.content_left
        size = os.fstat(source_fd).st_size
        if left and size == left:
            if self._file_fd is None:
                # The entry is being skipped; so is its content.
                self._splitter.skip_content(size)
                return
            if self._file_written == 0:
                self._clone(source_fd, self._file_fd, size)
                self._splitter.skip_content(size)
                self._file_written = size
                self._end_file()
                return
        # Not one whole file's content: treat it as inline bytes.
        offset = 0
        while piece := os.pread(source_fd, _READ_SIZE, offset):
            offset += len(piece)
            self.inline(piece)

    def finish(self) -> None:
        self._splitter.finish()
        for parts, entry in reversed(self._directories):
            self._finish_directory(parts, entry)
        if self._devices_skipped:
            log.warning(
                "applying to %s: skipped %d device nodes (creating them needs root)",
                self._applier.dest,
                self._devices_skipped,
            )

    # Entries

    def _begin(self, entry: TarEntry) -> None:
        parts = _parts(entry.name, entry.name)
        base = parts[-1] if parts else ""
        if base.startswith(_WHITEOUT_PREFIX):
            self._whiteout(entry, parts)
            return
        if not parts:
            if entry.type is not EntryType.DIRECTORY:
                raise SourceError(
                    f"layer entry {entry.name!r} names the destination itself"
                    " but is not a directory"
                )
            self._directories.append(((), entry))
            self._stats.directories += 1
            return

        parent_fd = self._open_parent(parts, entry.name)
        kind = entry.type
        if kind is EntryType.DIRECTORY:
            self._directory(parent_fd, base, parts, entry)
        elif kind is EntryType.REGULAR:
            self._regular(parent_fd, base, entry)
        elif kind is EntryType.HARDLINK:
            self._hardlink(parent_fd, base, entry)
        elif kind is EntryType.SYMLINK:
            self._remove(parent_fd, base, parts)
            os.symlink(entry.linkname, base, dir_fd=parent_fd)
            self._set_metadata_at(parent_fd, base, entry, chmod=False)
            self._stats.symlinks += 1
        elif kind in (EntryType.CHAR, EntryType.BLOCK, EntryType.FIFO):
            self._special(parent_fd, base, parts, entry)
        else:
            self._stats.entries_skipped += 1
            log.warning(
                "applying to %s: skipped entry %r of unsupported tar type %r",
                self._applier.dest,
                entry.name,
                entry.typeflag,
            )
            return
        self._mark_added(parts)

    def _directory(
        self, parent_fd: int, base: str, parts: tuple[str, ...], entry: TarEntry
    ) -> None:
        try:
            existing = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISDIR(existing.st_mode):
            os.unlink(base, dir_fd=parent_fd)
            existing = None
        if existing is None:
            os.mkdir(base, 0o700, dir_fd=parent_fd)
        if self._applier.preserve_owner:
            os.chown(
                base, entry.uid, entry.gid, dir_fd=parent_fd, follow_symlinks=False
            )
        self._directories.append((parts, entry))
        self._stats.directories += 1

    def _regular(self, parent_fd: int, base: str, entry: TarEntry) -> None:
        self._remove(parent_fd, base, None)
        self._file_fd = os.open(base, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
        self._file_entry = entry
        self._file_written = 0
        self._stats.files += 1
        if entry.size == 0:
            self._end_file()

    def _write(self, data: bytes) -> None:
        if self._file_fd is None or self._file_entry is None:
            return
        view = memoryview(data)
        while view:
            written = os.write(self._file_fd, view)
            view = view[written:]
        self._file_written += len(data)
        self._stats.bytes_inline += len(data)
        # The splitter may be entries ahead by now: count this file's bytes.
        if self._file_written == self._file_entry.size:
            self._end_file()

    def _end_file(self) -> None:
        assert self._file_fd is not None and self._file_entry is not None
        fd = self._file_fd
        entry = self._file_entry
        if self._applier.preserve_owner:
            os.fchown(fd, entry.uid, entry.gid)
        # After chown, which clears setuid and setgid bits.
        os.fchmod(fd, entry.mode)
        for name, value in entry.xattrs.items():
            self._setxattr(fd, name, value, entry)
        os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        self._close_file()

    def _close_file(self) -> None:
        if self._file_fd is not None:
            os.close(self._file_fd)
        self._file_fd = None
        self._file_entry = None

    def _hardlink(self, parent_fd: int, base: str, entry: TarEntry) -> None:
        target = _parts(entry.linkname, entry.name, "hardlink target")
        if not target:
            raise SourceError(f"layer entry {entry.name!r} is a hardlink to nothing")
        target_fd = self._open_dir(target[:-1], entry.name, create=False)
        try:
            self._remove(parent_fd, base, None)
            try:
                os.link(
                    target[-1],
                    base,
                    src_dir_fd=target_fd,
                    dst_dir_fd=parent_fd,
                    follow_symlinks=False,
                )
            except FileNotFoundError:
                raise SourceError(
                    f"layer entry {entry.name!r} is a hardlink to"
                    f" {entry.linkname!r}, which does not exist"
                ) from None
        finally:
            os.close(target_fd)
        self._stats.hardlinks += 1

    def _special(
        self, parent_fd: int, base: str, parts: tuple[str, ...], entry: TarEntry
    ) -> None:
        self._remove(parent_fd, base, parts)
        if entry.type is EntryType.FIFO:
            os.mkfifo(base, 0o600, dir_fd=parent_fd)
            self._stats.fifos += 1
        else:
            kind = stat.S_IFCHR if entry.type is EntryType.CHAR else stat.S_IFBLK
            device = os.makedev(entry.devmajor, entry.devminor)
            try:
                os.mknod(base, kind | 0o600, device, dir_fd=parent_fd)
            except PermissionError:
                self._devices_skipped += 1
                self._stats.devices_skipped += 1
                return
            self._stats.devices += 1
        self._set_metadata_at(parent_fd, base, entry, chmod=True)

    def _set_metadata_at(
        self, parent_fd: int, base: str, entry: TarEntry, *, chmod: bool
    ) -> None:
        """Owner, mode, xattrs and mtime of an entry we cannot open."""
        if self._applier.preserve_owner:
            os.chown(
                base, entry.uid, entry.gid, dir_fd=parent_fd, follow_symlinks=False
            )
        if chmod:
            # Just created by us as a device or fifo, so not a symlink to follow.
            os.chmod(base, entry.mode, dir_fd=parent_fd)
        if entry.xattrs:
            # The magic link names the directory we hold, so nothing on the
            # path can be swapped; the last component is not followed.
            path = f"/proc/self/fd/{parent_fd}/{base}"
            for name, value in entry.xattrs.items():
                self._setxattr(path, name, value, entry)
        os.utime(
            base,
            ns=(entry.mtime_ns, entry.mtime_ns),
            dir_fd=parent_fd,
            follow_symlinks=False,
        )

    def _setxattr(
        self, target: int | str, name: str, value: bytes, entry: TarEntry
    ) -> None:
        try:
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as err:
            if err.errno not in _XATTR_REFUSED:
                raise
            self._stats.xattrs_skipped += 1
            log.debug("xattr %s of %r refused: %s", name, entry.name, err)
            return
        self._stats.xattrs_set += 1

    def _finish_directory(self, parts: tuple[str, ...], entry: TarEntry) -> None:
        try:
            fd = self._open_dir(parts, entry.name, create=False)
        except (FileNotFoundError, UnsafeEntryError):
            # Removed or replaced later in the same layer.
            return
        try:
            if not parts and self._applier.preserve_owner:
                os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)
            for name, value in entry.xattrs.items():
                self._setxattr(fd, name, value, entry)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)

    # Whiteouts

    def _whiteout(self, entry: TarEntry, parts: tuple[str, ...]) -> None:
        if is_opaque_whiteout(entry.name):
            directory = parts[:-1]
            fd = self._open_dir(directory, entry.name, create=True)
            try:
                self._purge(fd, directory)
            finally:
                os.close(fd)
            self._stats.opaque_directories += 1
            return
        target = whiteout_target(entry.name)
        if target is None:
            # Other .wh..wh. names are aufs bookkeeping, meaningless here.
            self._stats.entries_skipped += 1
            return
        target_name = parts[-1][len(_WHITEOUT_PREFIX) :]
        if target_name in ("", ".", ".."):
            # whiteout_target refuses these already; this is the last line
            # before a removal, so it checks again rather than trust it.
            raise UnsafeEntryError(
                f"layer entry {entry.name!r} is a whiteout of {target_name!r}"
            )
        target_parts = parts[:-1] + (target_name,)
        self._stats.whiteouts += 1
        if target_parts in self._added:
            # Whiteouts hide lower layers only, never their own layer's files.
            return
        try:
            parent_fd = self._open_parent(target_parts, entry.name, create=False)
        except FileNotFoundError:
            return
        self._remove(parent_fd, target_parts[-1], target_parts)

    def _purge(self, dir_fd: int, directory: tuple[str, ...]) -> None:
        """Remove what lower layers left in a directory, keeping this layer's."""
        for name in os.listdir(dir_fd):
            path = directory + (name,)
            if path not in self._added:
                self._remove(dir_fd, name, path)
                continue
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode):
                child_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self._purge(child_fd, path)
                finally:
                    os.close(child_fd)

    def _mark_added(self, parts: tuple[str, ...]) -> None:
        for depth in range(len(parts), 0, -1):
            prefix = parts[:depth]
            if prefix in self._added:
                break
            self._added.add(prefix)

    # Path resolution

    def _remove(self, parent_fd: int, base: str, parts: tuple[str, ...] | None) -> None:
        """Remove whatever is at ``base``, a whole tree if it is a directory."""
        try:
            info = os.stat(base, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            # The cached parent may live inside the tree about to go.
            if self._parent is not None and self._parent[1] != parent_fd:
                self._drop_parent()
            shutil.rmtree(base, dir_fd=parent_fd)
        else:
            os.unlink(base, dir_fd=parent_fd)

    def _open_parent(
        self, parts: tuple[str, ...], entry_name: str, *, create: bool = True
    ) -> int:
        """Return a cached fd of the directory holding ``parts``; do not close it."""
        directory = parts[:-1]
        if self._parent is not None and self._parent[0] == directory:
            return self._parent[1]
        fd = self._open_dir(directory, entry_name, create=create)
        self._drop_parent()
        self._parent = (directory, fd)
        return fd

    def _drop_parent(self) -> None:
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def _open_dir(
        self, parts: tuple[str, ...], entry_name: str, *, create: bool
    ) -> int:
        """Open DEST/parts component by component, never following a symlink."""
        fd = os.dup(self._dest_fd)
        try:
            for depth, name in enumerate(parts):
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    # GNU tar also creates missing parents of an entry.
                    os.mkdir(name, 0o755, dir_fd=fd)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    raise self._not_a_directory(
                        fd, parts[: depth + 1], entry_name
                    ) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _not_a_directory(
        self, fd: int, parts: tuple[str, ...], entry_name: str
    ) -> SourceError:
        info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        where = "/".join(parts)
        if stat.S_ISLNK(info.st_mode):
            return UnsafeEntryError(
                f"layer entry {entry_name!r} would be written through the symlink"
                f" {where!r}, which could lead outside the destination"
            )
        return SourceError(
            f"layer entry {entry_name!r} needs {where!r} to be a directory,"
            " but it is not"
        )

    # Copying external files

    def _clone(self, source_fd: int, target_fd: int, size: int) -> None:
        if self._method == _REFLINK:
            try:
                fcntl.ioctl(target_fd, _FICLONE, source_fd)
            except OSError as err:
                if err.errno not in _CLONE_UNSUPPORTED:
                    raise
                log.debug("reflinks unavailable (%s); copying instead", err)
                self._method = _COPY_FILE_RANGE
            else:
                self._stats.bytes_reflinked += size
                return
        if self._method == _COPY_FILE_RANGE:
            try:
                _copy_range(source_fd, target_fd, size)
            except OSError as err:
                if err.errno not in _CLONE_UNSUPPORTED:
                    raise
                log.debug("copy_file_range unavailable (%s); reading instead", err)
                self._method = _READ_WRITE
            else:
                self._stats.bytes_copied += size
                return
        _copy_read_write(source_fd, target_fd, size)
        self._stats.bytes_copied += size


def _copy_range(source_fd: int, target_fd: int, size: int) -> None:
    offset = 0
    while offset < size:
        done = os.copy_file_range(source_fd, target_fd, size - offset, offset, offset)
        if done == 0:
            raise SourceError(f"external file ended after {offset} of its {size} bytes")
        offset += done


def _copy_read_write(source_fd: int, target_fd: int, size: int) -> None:
    offset = 0
    while offset < size:
        piece = os.pread(source_fd, min(_READ_SIZE, size - offset), offset)
        if not piece:
            raise SourceError(f"external file ended after {offset} of its {size} bytes")
        view = memoryview(piece)
        while view:
            written = os.pwrite(target_fd, view, offset)
            view = view[written:]
            offset += written
