"""Layers unpacked once into a verified, atomically published cache entry.

A cache entry holds one layer as a splitfdstream plus its external files:
tar headers, padding and small file contents (up to ``inline_threshold``
bytes) are inline in ``stream``; each larger regular file's content is its own
read-only file ``files/<k>``, named by its external index ``k``. Serving a
layer is then opening ``stream`` and the files, and a client on the same
filesystem can reflink them instead of copying.

Layout under the cache root::

    tmp.lock                      taken while a build directory is created
    tmp/<random>/                 a build in progress (never trusted)
    layers/sha256/<hex>/          a published entry for diffID sha256:<hex>
        layer.json                size of the uncompressed tar, file count,
                                  boot id of the kernel that wrote it
        stream                    the splitfdstream
        files/0, files/1, ...     external files, in stream order

Strategy and bounds: ``build`` streams the compressed blob through the
decompressor, the tar splitter and sha256 in 1 MiB reads, so memory stays
flat whatever the layer size; file contents are written as they arrive.
Nothing is published until the sha256 of the uncompressed bytes equals the
diffID: the entry is built in ``tmp/``, then renamed into ``layers/`` in one
step. A rename onto an existing entry fails, so when two
builds of one diffID race, the second discards its copy and returns the
first. A truncated zstd stream is not reported by the decompressor itself; it
shows up as a truncated tar or a diffID mismatch, and is refused all the same.

Durability without a flush: ``layer.json`` records the kernel's boot id.
Within one boot the page cache is what every reader sees, so an entry is good
as soon as it is renamed into place; after a reboot (a power loss may have
lost unflushed data) ``lookup`` first rebuilds the tar from the entry and
checks it against the diffID, re-stamping it on success and discarding it on
failure. We used to ``syncfs`` before publishing instead: that waits for all
dirty data of the whole filesystem, other programs' included, and took as
long as the unpacking itself.

Crashes: each build holds an exclusive ``flock`` on its ``tmp/`` directory
for its whole life, and the kernel drops it when the builder dies, however it
dies. A new :class:`LayerCache` removes every build directory whose lock it
can take, whatever its age: its builder is gone. A build creates and locks
its directory under a shared lock on ``tmp.lock`` and the sweep runs under an
exclusive one, so the sweep never sees a live build's directory before it is
locked. ``lookup`` never reads ``tmp/``.

Errors of the cache's own filesystem (full, read-only, no permission, quota)
are :class:`LayerCacheError` naming the cache directory, the reason and the
layer; running out of file descriptors is a :class:`RetryableError`. A failed
build's directory is removed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

import isal.igzip_threaded
import zstandard

from protocol.errors import (
    DigestMismatchError,
    ImageProxyError,
    RetryableError,
    SourceError,
    UnsupportedError,
)
from protocol.splitfdstream import (
    External,
    SplitFDStreamError,
    SplitFDStreamReader,
    SplitFDStreamWriter,
)
from protocol.tar import (
    Content,
    EntryType,
    Header,
    TarEvent,
    TarFormatError,
    TarSplitter,
)

__all__ = [
    "CachedLayer",
    "LayerCache",
    "LayerCacheError",
    "LAYER_MEDIA_TYPES",
    "out_of_fds",
]

_READ_SIZE = 1 << 20
_DIFF_ID = re.compile(r"sha256:([0-9a-f]{64})")

_PLAIN = "tar"
_GZIP = "gzip"
_ZSTD = "zstd"

#: Layer media types ``build`` accepts, with the compression each implies.
LAYER_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": _PLAIN,
    "application/vnd.oci.image.layer.v1.tar+gzip": _GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": _ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": _PLAIN,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": _GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": _ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": _PLAIN,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": _GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": _GZIP,
}


class LayerCacheError(ImageProxyError):
    """The cache's own filesystem refused us: full, read-only, no permission.

    Neither the client nor the image is at fault; whoever runs the proxy
    must free space or fix the cache directory.
    """


def out_of_fds(err: OSError, doing: str) -> RetryableError | None:
    """A retryable error for EMFILE/ENFILE, else None.

    A process or system out of descriptors is a passing state, not damage to
    the file being opened.
    """
    if err.errno == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return RetryableError(
            f"out of file descriptors (RLIMIT_NOFILE soft limit {soft}) {doing}"
        )
    if err.errno == errno.ENFILE:
        return RetryableError(
            f"out of file descriptors (the system's file table is full) {doing}"
        )
    return None


@dataclass(frozen=True, slots=True)
class CachedLayer:
    """A published cache entry.

    External index ``k`` of the splitfdstream at ``stream_path`` is the whole
    content of ``files[k]``; ``size`` is the length of the uncompressed tar.
    """

    diff_id: str
    stream_path: Path
    files: list[Path]
    size: int
    file_count: int


class LayerCache:
    """Uncompressed layers kept as splitfdstreams under ``root``.

    :param inline_threshold: regular files up to this many bytes stay inline
        in the stream (saving an fd each); larger ones get their own file.
    :raises LayerCacheError: the cache directory cannot be created.
    """

    def __init__(self, root: Path, *, inline_threshold: int = 4096) -> None:
        self.root = root
        self.inline_threshold = inline_threshold
        self._tmp = root / "tmp"
        self._tmp_lock = root / "tmp.lock"
        self._layers = root / "layers" / "sha256"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._layers.mkdir(parents=True, exist_ok=True)
            self._remove_abandoned_builds()
        except OSError as err:
            if err.errno == errno.EROFS and self._layers.is_dir():
                # A read-only cache can still serve what it holds; nothing
                # in it can be removed anyway.
                return
            raise self._os_error(err, "while setting it up") from None

    def lookup(self, diff_id: str) -> CachedLayer | None:
        """Return the published entry for ``diff_id``, or None if there is none.

        :raises RetryableError: the process is out of file descriptors.
        :raises LayerCacheError: the entry cannot be read.
        """
        entry = self._layers / _hex_of(diff_id)
        try:
            meta = json.loads((entry / "layer.json").read_bytes())
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self._os_error(err, f"while reading the entry of {diff_id}") from None
        file_count = int(meta["fileCount"])
        files = [entry / "files" / str(k) for k in range(file_count)]
        cached = CachedLayer(
            diff_id=diff_id,
            stream_path=entry / "stream",
            files=files,
            size=int(meta["size"]),
            file_count=file_count,
        )
        if meta.get("bootID") == _boot_id():
            return cached
        try:
            return self._reverify(cached, entry, meta)
        except OSError as err:
            raise self._os_error(
                err, f"while checking the entry of {diff_id}"
            ) from None

    def _reverify(
        self, cached: CachedLayer, entry: Path, meta: dict[str, object]
    ) -> CachedLayer | None:
        """Check an entry written before the last boot; None if it is bad."""
        try:
            good = _rebuilt_digest(cached) == cached.diff_id
        except (FileNotFoundError, IndexError, SplitFDStreamError):
            good = False
        if good:
            meta["bootID"] = _boot_id()
            fd, name = tempfile.mkstemp(prefix=".layer.json.", dir=entry)
            with open(fd, "wb") as f:
                f.write(json.dumps(meta).encode())
            os.chmod(name, 0o444)
            os.replace(name, entry / "layer.json")
            return cached
        # Move it out of layers/ in one step, then remove it at leisure.
        graveyard = Path(tempfile.mkdtemp(prefix="damaged-", dir=self._tmp))
        try:
            os.rename(entry, graveyard / "entry")
        except FileNotFoundError:
            pass
        shutil.rmtree(graveyard, ignore_errors=True)
        return None

    def build(self, diff_id: str, compressed: BinaryIO, media_type: str) -> CachedLayer:
        """Unpack a layer blob into the cache and return its entry.

        Blocks for the whole build; run it in a worker thread. Returns the
        existing entry untouched when ``diff_id`` is already cached.

        :raises DigestMismatchError: the uncompressed content does not hash to
            ``diff_id``; nothing is published.
        :raises UnsupportedError: ``media_type`` is not a tar layer we handle.
        :raises SourceError: the blob does not decompress or is not a tar.
        :raises LayerCacheError: the cache's filesystem refused a write.
        :raises RetryableError: the process is out of file descriptors.
        """
        hex_digest = _hex_of(diff_id)
        compression = LAYER_MEDIA_TYPES.get(media_type)
        if compression is None:
            raise UnsupportedError(
                f"layer {diff_id} has media type {media_type!r}, which is not"
                " a tar layer we can unpack"
            )
        existing = self.lookup(diff_id)
        if existing is not None:
            return existing
        try:
            return self._build(diff_id, hex_digest, compressed, compression)
        except OSError as err:
            raise self._os_error(err, f"while unpacking {diff_id}") from None

    def _build(
        self, diff_id: str, hex_digest: str, compressed: BinaryIO, compression: str
    ) -> CachedLayer:
        build_dir, lock_fd = self._new_build_dir(hex_digest)
        try:
            with _decompressed(compressed, compression) as tar_stream:
                digest = _unpack(
                    tar_stream, build_dir, self.inline_threshold, diff_id, compression
                )
            if digest != diff_id:
                raise DigestMismatchError(
                    f"layer {diff_id}: the uncompressed content has digest"
                    f" {digest}, not the diffID of the image config",
                    expected=diff_id,
                    actual=digest,
                )
            return self._publish(diff_id, build_dir)
        finally:
            if build_dir.exists():
                shutil.rmtree(build_dir, ignore_errors=True)
            # Only now: a sweep must not take a directory still being removed.
            os.close(lock_fd)

    def _new_build_dir(self, hex_digest: str) -> tuple[Path, int]:
        """A fresh directory under ``tmp/`` and the fd holding its lock."""
        with _flocked(self._tmp_lock, fcntl.LOCK_SH):
            build_dir = Path(
                tempfile.mkdtemp(prefix=f"{hex_digest[:12]}-", dir=self._tmp)
            )
            try:
                lock_fd = os.open(
                    build_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                )
            except BaseException:
                os.rmdir(build_dir)
                raise
            # Nobody else can hold it: the directory was made just now, and a
            # sweep cannot run while we hold tmp.lock shared.
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return build_dir, lock_fd

    def _os_error(self, err: OSError, doing: str) -> ImageProxyError:
        """Word an error of the cache's filesystem for whoever runs the proxy."""
        retryable = out_of_fds(err, f"in layer cache {self.root} {doing}")
        if retryable is not None:
            return retryable
        reason = os.strerror(err.errno) if err.errno else str(err)
        reason = reason[:1].lower() + reason[1:]
        where = f" ({err.filename})" if err.filename else ""
        return LayerCacheError(f"layer cache {self.root}: {reason}{where} {doing}")

    def _publish(self, diff_id: str, build_dir: Path) -> CachedLayer:
        target = self._layers / _hex_of(diff_id)
        try:
            os.rename(build_dir, target)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another build of the same diffID won; its entry is as good.
        else:
            _fsync_dir(self._layers)
        published = self.lookup(diff_id)
        if published is None:
            raise SourceError(f"layer {diff_id}: cache entry vanished after publishing")
        return published

    def _remove_abandoned_builds(self) -> None:
        """Remove each build directory whose builder is dead (see the top)."""
        abandoned: list[tuple[Path, int]] = []
        with _flocked(self._tmp_lock, fcntl.LOCK_EX):
            for leftover in self._tmp.iterdir():
                lock_fd = _lock_if_abandoned(leftover)
                if lock_fd is not None:
                    abandoned.append((leftover, lock_fd))
        # Removing can take a while (a big layer's files); holding each
        # directory's own lock is enough to keep other sweeps off it.
        for leftover, lock_fd in abandoned:
            try:
                shutil.rmtree(leftover, ignore_errors=True)
            finally:
                os.close(lock_fd)


def _lock_if_abandoned(leftover: Path) -> int | None:
    """The locked fd of a build directory nobody holds, or None.

    Anything else found in ``tmp/`` is no build of ours and is unlinked.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        lock_fd = os.open(leftover, flags)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        leftover.unlink(missing_ok=True)
        return None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # A live build.
        os.close(lock_fd)
        return None
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd


@contextmanager
def _flocked(path: Path, operation: int) -> Iterator[None]:
    # Read-only is enough for flock, and opens on a read-only filesystem.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


def _hex_of(diff_id: str) -> str:
    match = _DIFF_ID.fullmatch(diff_id)
    if match is None:
        if diff_id.partition(":")[0] not in ("", "sha256") and ":" in diff_id:
            raise UnsupportedError(
                f"diffID {diff_id!r} uses a digest algorithm other than sha256"
            )
        raise SourceError(f"diffID {diff_id!r} is not a valid sha256 digest")
    return match.group(1)


@contextmanager
def _decompressed(compressed: BinaryIO, compression: str) -> Iterator[IO[bytes]]:
    if compression == _PLAIN:
        yield compressed
    elif compression == _GZIP:
        # ISA-L inflates several times faster than zlib; its reader thread
        # overlaps inflating with our splitting on a second core.
        opener: Callable[..., IO[bytes]] = isal.igzip_threaded.open
        with opener(compressed, "rb", threads=1) as stream:
            yield stream
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(
            compressed, read_across_frames=True, closefd=False
        )
        with reader:
            yield reader


def _unpack(
    tar_stream: IO[bytes],
    build_dir: Path,
    inline_threshold: int,
    diff_id: str,
    compression: str,
) -> str:
    """Split the tar into ``build_dir``; return ``sha256:<hex>`` of the tar."""
    files_dir = build_dir / "files"
    files_dir.mkdir()
    hasher = hashlib.sha256()
    splitter = TarSplitter()
    writer = SplitFDStreamWriter()
    size = 0
    file_count = 0
    current: IO[bytes] | None = None
    current_left = 0

    with _create(build_dir / "stream") as stream:
        try:
            for chunk in _chunks(tar_stream, diff_id, compression):
                hasher.update(chunk)
                size += len(chunk)
                for event in _split(splitter, chunk, diff_id):
                    if isinstance(event, Content) and current is not None:
                        current.write(event.data)
                        current_left -= len(event.data)
                        if current_left == 0:
                            current.close()
                            current = None
                    elif isinstance(event, Content):
                        stream.write(writer.inline(event.data))
                    else:
                        stream.write(writer.inline(event.raw))
                    if not isinstance(event, Header):
                        continue
                    entry = event.entry
                    if (
                        entry.type is EntryType.REGULAR
                        and entry.size > inline_threshold
                    ):
                        current = _create(files_dir / str(file_count))
                        current_left = entry.size
                        stream.write(writer.external(file_count))
                        file_count += 1
            _split(splitter, None, diff_id)
        finally:
            if current is not None:
                current.close()
        stream.write(writer.finish())

    meta = {
        "diffID": diff_id,
        "size": size,
        "fileCount": file_count,
        "bootID": _boot_id(),
    }
    with _create(build_dir / "layer.json") as f:
        f.write(json.dumps(meta).encode())
    return f"sha256:{hasher.hexdigest()}"


def _chunks(tar_stream: IO[bytes], diff_id: str, compression: str) -> Iterator[bytes]:
    done = 0
    while True:
        try:
            chunk = tar_stream.read(_READ_SIZE)
        except (OSError, EOFError, zstandard.ZstdError) as err:
            raise SourceError(
                f"layer {diff_id}: the {compression} stream is corrupt or"
                f" truncated after {done} uncompressed bytes: {err}"
            ) from err
        if not chunk:
            return
        done += len(chunk)
        yield chunk


def _split(splitter: TarSplitter, chunk: bytes | None, diff_id: str) -> list[TarEvent]:
    """Feed ``chunk`` (None: end of input), naming the layer in any error."""
    try:
        if chunk is None:
            splitter.finish()
            return []
        return splitter.feed(chunk)
    except TarFormatError as err:
        raise TarFormatError(f"layer {diff_id}: {err}") from err


def _create(path: Path) -> IO[bytes]:
    # Read-only from birth: the fds we hand out can never write through.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    return open(fd, "wb", buffering=_READ_SIZE)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _boot_id() -> str:
    """The kernel's id of this boot ("" where there is none: always recheck)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().decode().strip()
    except OSError:
        return ""


def _rebuilt_digest(cached: CachedLayer) -> str:
    """The sha256 of the tar the entry's stream and files put back together."""
    hasher = hashlib.sha256()
    reader = SplitFDStreamReader()
    with open(cached.stream_path, "rb") as stream:
        while chunk := stream.read(_READ_SIZE):
            for event in reader.feed(chunk):
                if isinstance(event, External):
                    with open(cached.files[event.index], "rb") as content:
                        while block := content.read(_READ_SIZE):
                            hasher.update(block)
                else:
                    hasher.update(event.data)
    reader.finish()
    return f"sha256:{hasher.hexdigest()}"
