"""The jsonrpc-fdpass image API served on sockets from OpenJsonRPCFdPass.

Each connection is an independent session: its own Initialize, its own
opened images and splitfdstreams. Requests run concurrently.

Fd bounds: a splitfdstream's content files are never all open at once. The
server keeps only their paths and opens a window of at most
``MAX_FD_WINDOW`` files per reply; a process-wide :class:`FdBudget` caps the
content fds held by replies not yet sent, so many concurrent requests wait
instead of running the process out of descriptors.

GetBlob transfers: a connection may have at most ``MAX_UNFINISHED_BLOBS``
transfers whose worker has not finished (each holds a thread, a 1 MiB buffer
and two pipe ends); one more is refused. A transfer that makes no progress
for the session's ``stall_timeout`` is cancelled and its error fd says so,
so a client that never reads its pipes cannot hold threads for ever.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import anyio
import msgspec

from protocol import api
from protocol.errors import (
    ClientError,
    DigestMismatchError,
    ImageProxyError,
    NotFoundError,
    NotInitializedError,
    SourceError,
)
from protocol.image import Digest
from protocol.jsonrpc import ErrorKind, RpcError
from proxy import api_upstream
from proxy.fdsocket import FdSocket
from proxy.image import OpenedImage, ResolvedImage
from proxy.layercache import CachedLayer, LayerCache, out_of_fds
from proxy.legacy_server import SessionOptions, open_image
from proxy.pipes import (
    Progress,
    copy_raw,
    copy_verified,
    make_pipe,
    run_transfer,
    run_with_error_fd,
)
from proxy.rpc_server import Reply, RpcServer
from proxy.transports.base import LayerStream

log = logging.getLogger("image-proxy")

SERVER_NAME = "image-proxy"

#: GetBlob transfers one connection may have unfinished at once.
MAX_UNFINISHED_BLOBS = 64

P = TypeVar("P", bound=msgspec.Struct)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "image-proxy"


class FdBudget:
    """Counts content fds held by unsent replies; waits when over the cap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._waiters: list[anyio.Event] = []

    @classmethod
    def for_this_process(cls) -> FdBudget:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Leave half the descriptors for sockets, pipes and blobs.
        return cls(max(16, min(2 * api.MAX_FD_WINDOW, soft // 2)))

    async def acquire(self, count: int) -> Callable[[], None]:
        """Take ``count`` fds; the returned callback gives them back once."""
        count = min(count, self.limit)
        while self.in_use + count > self.limit:
            waiter = anyio.Event()
            self._waiters.append(waiter)
            await waiter.wait()
        self.in_use += count
        self.peak = max(self.peak, self.in_use)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.in_use -= count
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.set()

        return release


class LayerBuilds:
    """One build per diffID at a time, shared by every connection."""

    def __init__(self, cache: LayerCache) -> None:
        self.cache = cache
        self._locks: dict[str, anyio.Lock] = {}

    async def get(
        self, image: OpenedImage, layer_digest: Digest, diff_id: str, media_type: str
    ) -> CachedLayer:
        cached = self.cache.lookup(diff_id)
        if cached is not None:
            return cached
        lock = self._locks.setdefault(diff_id, anyio.Lock())
        async with lock:
            cached = self.cache.lookup(diff_id)
            if cached is not None:
                return cached
            return await anyio.to_thread.run_sync(
                self._build, image, layer_digest, diff_id, media_type
            )

    def _build(
        self, image: OpenedImage, layer_digest: Digest, diff_id: str, media_type: str
    ) -> CachedLayer:
        blob = image.source.open_blob(layer_digest)
        checked = _DigestCheckedBlob(blob.reader, layer_digest, image.name)
        try:
            try:
                cached = self.cache.build(diff_id, cast(BinaryIO, checked), media_type)
            except SourceError as exc:
                # A blob that is not what the manifest names usually breaks
                # the decompressor first (gzip's CRC); say what really
                # happened rather than "corrupt gzip stream". A failed read
                # of the source is that failure, whatever it caused.
                if checked.failure is not None:
                    raise checked.failure from None
                if not isinstance(exc, DigestMismatchError):
                    checked.verify_rest()
                raise
            checked.verify_rest()
            return cached
        finally:
            blob.close()


class _DigestCheckedBlob(io.RawIOBase):
    """A layer blob reader that hashes what passes through it.

    At the blob's end it raises DigestMismatchError when the bytes are not the
    blob the manifest names, so the cache refuses the build before publishing.
    """

    def __init__(self, reader: BinaryIO, digest: Digest, image_name: str) -> None:
        super().__init__()
        self._reader = reader
        self._digest = digest
        self._image_name = image_name
        self._hasher = digest.hasher()
        self._started = False
        self._at_end = False
        #: What reading the source raised. The decompressor may run in its own
        #: thread and turn that into a plain end of data; this keeps a dropped
        #: registry a retryable error instead of a "corrupt blob".
        self.failure: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._started = True
        view = memoryview(buffer).cast("B")
        try:
            data = self._reader.read(len(view))
        except BaseException as exc:
            self.failure = exc
            raise
        if not data:
            self._check_at_end()
            return 0
        view[: len(data)] = data
        self._hasher.update(data)
        return len(data)

    def verify_rest(self) -> None:
        """Hash what the decompressor left unread, then check the digest.

        Does nothing when the build never read the blob (the layer was
        already cached).
        """
        if self.failure is not None:
            raise self.failure
        if not self._started or self._at_end:
            return
        while data := self._reader.read(1 << 20):
            self._hasher.update(data)
        self._check_at_end()

    def _check_at_end(self) -> None:
        if self.failure is not None:
            raise self.failure
        self._at_end = True
        actual = f"{self._digest.algorithm}:{self._hasher.hexdigest()}"
        if actual != self._digest:
            raise DigestMismatchError(
                f"layer blob {self._digest} of {self._image_name} has digest"
                f" {actual}: the source holds a corrupt or different blob",
                expected=str(self._digest),
                actual=actual,
            )


class ApiShared:
    """What every connection of one proxy process shares."""

    def __init__(self, options: SessionOptions, cache_dir: Path | None) -> None:
        self.options = options
        self._cache_dir = cache_dir or default_cache_dir()
        self._builds: LayerBuilds | None = None
        self.budget = FdBudget.for_this_process()

    @property
    def builds(self) -> LayerBuilds:
        # The cache directory is created on first use, so a proxy that never
        # serves a splitfdstream never touches the disk.
        if self._builds is None:
            self._builds = LayerBuilds(LayerCache(self._cache_dir))
        return self._builds


class ApiSession:
    """One jsonrpc-fdpass connection's state."""

    def __init__(self, shared: ApiShared, tg: anyio.abc.TaskGroup) -> None:
        self._shared = shared
        self._tg = tg
        self._version: str | None = None
        self._images: dict[int, OpenedImage] = {}
        self._last_image_id = 0
        self._streams: dict[int, LayerStream] = {}
        self._last_stream_id = 0
        #: Progress of each GetBlob transfer whose worker has not finished.
        self._transfers: set[Progress] = set()

    def register(self, server: RpcServer) -> None:
        def add(
            name: str,
            params: type[P],
            handler: Callable[[P], Awaitable[Reply]],
            *,
            needs_init: bool = True,
        ) -> None:
            async def call(decoded: P, fds: list[int]) -> Reply:
                for fd in fds:
                    # No method takes fds from the client.
                    os.close(fd)
                try:
                    if needs_init and self._version is None:
                        raise NotInitializedError("call Initialize first")
                    return await handler(decoded)
                except ImageProxyError as exc:
                    raise _rpc_error(exc) from None

            server.register(name, params, call)

        add("Initialize", api.InitializeParams, self.initialize, needs_init=False)
        add("OpenImage", api.OpenImageParams, self.open_image)
        add("CloseImage", api.ImageParams, self.close_image)
        add("GetManifest", api.GetManifestParams, self.get_manifest)
        add("GetConfig", api.ImageParams, self.get_config)
        add("GetLayerInfo", api.ImageParams, self.get_layer_info)
        add("GetBlob", api.GetBlobParams, self.get_blob)
        add(
            "GetSplitFDStreamFiles",
            api.GetSplitFDStreamFilesParams,
            self.get_splitfdstream_files,
        )
        add("CloseSplitFDStream", api.StreamParams, self.close_splitfdstream)
        # GetSplitFDStream (ours, or upstream's layerId form) and GetImage.
        api_upstream.UpstreamMethods(self).register(add)

    # -- session ---------------------------------------------------------------

    async def initialize(self, params: api.InitializeParams) -> Reply:
        if self._version is not None:
            raise ClientError(f"already initialized at version {self._version}")
        common = [v for v in api.SUPPORTED_VERSIONS if v in params.versions]
        if not common:
            raise RpcError.of_kind(
                ErrorKind.UNSUPPORTED,
                f"no common API version: client speaks {params.versions}, "
                f"server speaks {list(api.SUPPORTED_VERSIONS)}",
                supported=list(api.SUPPORTED_VERSIONS),
            )
        self._version = max(common, key=lambda v: tuple(int(p) for p in v.split(".")))
        return Reply(
            api.InitializeResult(
                version=self._version, features=list(api.FEATURES), server=SERVER_NAME
            )
        )

    async def open_image(self, params: api.OpenImageParams) -> Reply:
        try:
            image = await open_image(params.image_name, self._shared.options)
        except NotFoundError:
            if params.optional:
                return Reply(api.OpenImageResult(image_id=None))
            raise
        self._last_image_id += 1
        self._images[self._last_image_id] = image
        return Reply(api.OpenImageResult(image_id=self._last_image_id))

    def _image(self, image_id: int) -> OpenedImage:
        image = self._images.get(image_id)
        if image is None:
            raise ClientError(f"no open image with id {image_id}")
        return image

    async def close_image(self, params: api.ImageParams) -> Reply:
        image = self._image(params.image_id)
        del self._images[params.image_id]
        await image.close()
        return Reply(api.Empty())

    # -- metadata --------------------------------------------------------------

    async def get_manifest(self, params: api.GetManifestParams) -> Reply:
        image = self._image(params.image_id)
        if not params.resolve:
            raw, media_type = await image.source.get_manifest(None)
            return Reply(
                api.GetManifestResult(
                    manifest=_text(raw),
                    media_type=media_type,
                    digest=str(Digest.of(raw)),
                )
            )
        resolved = await image.resolve()
        converted = None
        if (
            params.convert_to_oci
            and resolved.oci_manifest() is not resolved.manifest_raw
        ):
            converted = _text(resolved.oci_manifest())
        return Reply(
            api.GetManifestResult(
                manifest=_text(resolved.manifest_raw),
                media_type=resolved.media_type,
                digest=str(resolved.digest),
                oci_manifest=converted,
            )
        )

    async def get_config(self, params: api.ImageParams) -> Reply:
        resolved = await self._image(params.image_id).resolve()
        config = resolved.manifest.config
        return Reply(
            api.GetConfigResult(
                config=_text(resolved.config_raw),
                digest=config.digest,
                media_type=config.media_type,
            )
        )

    async def get_layer_info(self, params: api.ImageParams) -> Reply:
        image = self._image(params.image_id)
        resolved = await image.resolve()
        # Layers as GetBlob can serve them: a store that keeps them
        # uncompressed (containers-storage) lists those, as the legacy
        # GetLayerInfo does; everything else lists the manifest's.
        infos = image.source.layer_infos_for_copy() or resolved.layer_infos()
        layers = [
            api.LayerDescription(
                digest=info.digest,
                diff_id=diff_id,
                size=info.size,
                media_type=info.media_type,
            )
            for info, diff_id in zip(infos, resolved.diff_ids(), strict=True)
        ]
        return Reply(api.GetLayerInfoResult(layers=layers))

    # -- blobs -----------------------------------------------------------------

    async def get_blob(self, params: api.GetBlobParams) -> Reply:
        image = self._image(params.image_id)
        digest = Digest(params.digest)
        if len(self._transfers) >= MAX_UNFINISHED_BLOBS:
            raise ClientError(
                f"{MAX_UNFINISHED_BLOBS} GetBlob transfers are unfinished on this"
                " connection: read their pipes to the end before asking for more"
            )
        # Counted from here, so concurrent calls cannot all pass the check
        # while this one waits for its blob.
        progress = Progress()
        self._transfers.add(progress)
        try:
            blob = await anyio.to_thread.run_sync(image.source.open_blob, digest)
        except BaseException:
            self._transfers.discard(progress)
            raise
        try:
            data_read, data_write = make_pipe()
            try:
                error_read, error_write = os.pipe2(os.O_CLOEXEC)
            except BaseException:
                os.close(data_read)
                os.close(data_write)
                raise
        except BaseException:
            self._transfers.discard(progress)
            blob.close()
            raise
        if params.verify:
            work: Callable[[], None] = lambda: copy_verified(  # noqa: E731
                blob, digest, None if blob.size < 0 else blob.size, data_write, progress
            )
        else:
            work = lambda: copy_raw(blob, data_write, progress)  # noqa: E731
        timeout = self._shared.options.stall_timeout

        def discard() -> None:
            blob.close()
            os.close(data_write)
            os.close(error_write)

        self._tg.start_soon(
            self._transfer,
            lambda: run_with_error_fd(
                work, blob, data_write, error_write, _blob_error, timeout
            ),
            progress,
            discard,
        )
        return Reply(api.GetBlobResult(size=blob.size), [data_read, error_read])

    async def _transfer(
        self,
        work: Callable[[], None],
        progress: Progress,
        discard: Callable[[], None],
    ) -> None:
        try:
            await run_transfer(
                work,
                progress=progress,
                stall_timeout=self._shared.options.stall_timeout,
                discard=discard,
            )
        finally:
            self._transfers.discard(progress)

    # -- splitfdstreams -----------------------------------------------------------

    async def get_splitfdstream(self, params: api.GetSplitFDStreamParams) -> Reply:
        image = self._image(params.image_id)
        window = _check_window(params.max_fds)
        resolved = await image.resolve()
        layer_digest, diff_id, media_type = _find_layer(
            resolved, params.digest, image.name
        )
        stream = await anyio.to_thread.run_sync(
            image.source.layer_stream, layer_digest, diff_id
        )
        if stream is None:
            media_type = image.source.blob_media_type(layer_digest, media_type)
            cached = await self._shared.builds.get(
                image, layer_digest, diff_id, media_type
            )
            stream = CachedLayerStream(cached)
        self._last_stream_id += 1
        stream_id = self._last_stream_id
        self._streams[stream_id] = stream
        # Never more than the budget holds, whatever window the client asks
        # for: the stream fd plus at most limit - 1 files.
        budget = self._shared.budget
        count = min(window, stream.file_count, budget.limit - 1)
        release = await budget.acquire(count + 1)
        try:
            fds = await anyio.to_thread.run_sync(_open_first_window, stream, count)
        except BaseException:
            release()
            raise
        result = api.GetSplitFDStreamResult(
            stream_id=stream_id,
            diff_id=stream.diff_id,
            tar_size=stream.size,
            file_count=stream.file_count,
            files_included=count,
        )
        return Reply(result, fds, on_closed=release)

    async def get_splitfdstream_files(
        self, params: api.GetSplitFDStreamFilesParams
    ) -> Reply:
        stream = self._stream(params.stream_id)
        count = _check_window(params.count)
        if params.start < 0 or params.start > stream.file_count:
            raise ClientError(
                f"start {params.start} is past the stream's {stream.file_count} files"
            )
        budget = self._shared.budget
        count = min(count, stream.file_count - params.start, budget.limit)
        release = await budget.acquire(count)
        try:
            fds = await anyio.to_thread.run_sync(stream.open_files, params.start, count)
        except BaseException:
            release()
            raise
        result = api.GetSplitFDStreamFilesResult(start=params.start, count=count)
        return Reply(result, fds, on_closed=release)

    async def close_splitfdstream(self, params: api.StreamParams) -> Reply:
        stream = self._stream(params.stream_id)
        del self._streams[params.stream_id]
        await anyio.to_thread.run_sync(stream.close)
        return Reply(api.Empty())

    def _stream(self, stream_id: int) -> LayerStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ClientError(f"no open splitfdstream with id {stream_id}")
        return stream

    async def close(self) -> None:
        # Workers end at their next write instead of filling pipes nobody
        # will read.
        for progress in self._transfers:
            progress.cancelled.set()
        for image in self._images.values():
            await image.close()
        self._images.clear()
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(
            "document is not valid UTF-8 and cannot be sent as text"
        ) from None


def _check_window(count: int) -> int:
    if count < 0 or count > api.MAX_FD_WINDOW:
        raise ClientError(f"an fd window must be 0 to {api.MAX_FD_WINDOW}, not {count}")
    return count


def _find_layer(
    resolved: ResolvedImage, digest: str, name: str
) -> tuple[Digest, str, str]:
    """The layer named by its manifest digest or its diffID."""
    for layer, diff_id in zip(
        resolved.manifest.layers, resolved.diff_ids(), strict=True
    ):
        if digest in (layer.digest, diff_id):
            return Digest(layer.digest), diff_id, layer.media_type
    raise NotFoundError(f"{name} has no layer {digest}")


def _open_first_window(stream: LayerStream, count: int) -> list[int]:
    """The stream fd followed by external files 0 .. count-1."""
    stream_fd = stream.open_stream()
    try:
        return [stream_fd, *stream.open_files(0, count)]
    except BaseException:
        os.close(stream_fd)
        raise


class CachedLayerStream(LayerStream):
    """A layer cache entry served as a splitfdstream."""

    def __init__(self, cached: CachedLayer) -> None:
        self._cached = cached
        self.diff_id = cached.diff_id
        self.size = cached.size
        self.file_count = cached.file_count

    def open_stream(self) -> int:
        return self._open(self._cached.stream_path)

    def open_files(self, start: int, count: int) -> list[int]:
        fds: list[int] = []
        try:
            for path in self._cached.files[start : start + count]:
                fds.append(self._open(path))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _open(self, path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            exhausted = out_of_fds(exc, f"opening {path}")
            if exhausted is not None:
                raise exhausted from None
            raise ImageProxyError(
                f"layer cache entry {self.diff_id} is damaged: {exc}"
            ) from None


def _blob_error(error: BaseException) -> bytes:
    kind = error.kind if isinstance(error, ImageProxyError) else "internal"
    return msgspec.json.encode(api.BlobError(kind=kind, message=str(error)))


def _rpc_error(exc: ImageProxyError) -> RpcError:
    try:
        kind = ErrorKind(exc.kind)
    except ValueError:
        kind = ErrorKind.INTERNAL
    context: dict[str, Any] = {"retryable": exc.retryable}
    return RpcError.of_kind(kind, str(exc), **context)


async def serve_api(sock: socket.socket, shared: ApiShared) -> None:
    """Serve one jsonrpc-fdpass connection until the client closes it."""
    server = RpcServer()
    async with anyio.create_task_group() as tg:
        session = ApiSession(shared, tg)
        session.register(server)
        try:
            await server.serve(FdSocket(sock))
        finally:
            await session.close()
            tg.cancel_scope.cancel()
