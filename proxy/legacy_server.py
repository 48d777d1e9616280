"""The skopeo-compatible server on an inherited SOCK_SEQPACKET socket.

Requests are answered strictly in order, one at a time: the protocol has no
request ids, so the client matches replies by order. Blob bytes never go
through the socket: each GetBlob-like request starts a worker thread writing
into a pipe whose read end rides along with the reply.

Unlike the reference, no lock is held while a worker runs: FinishPipe waits
for its own worker only, and gives up with a retryable error once that worker
has made no progress for ``stall_timeout`` seconds, so one stalled upstream
cannot hang the proxy (skopeo issue 2878). At most ``MAX_ACTIVE_PIPES``
transfers may be unfinished at once; each holds one fd and one buffer.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.abc

from protocol import legacy
from protocol.errors import (
    ClientError,
    ImageProxyError,
    NotFoundError,
    NotInitializedError,
)
from protocol.image import (
    Digest,
    PlatformWanted,
    go_json,
    serialise_full_config,
    serialise_runtime_config,
)
from proxy.image import OpenedImage
from proxy.pipes import (
    Cancelled,
    Progress,
    WriteEnd,
    copy_raw,
    copy_verified,
    make_pipe,
    run_guarded,
    run_transfer,
    run_with_error_fd,
    stall_error,
    write_all,
)
from proxy.policy import Policy
from proxy.seqpacket import PacketTooLarge, close_all, receive_packet, send_packet
from proxy.transports.base import Blob, SystemContext, split_image_name

log = logging.getLogger("image-proxy")

MAX_ACTIVE_PIPES = 256
DEFAULT_STALL_TIMEOUT = 60.0


@dataclass
class Outcome:
    """What a handler returns: a value and the fds to send beside it."""

    value: Any = None
    fds: list[int] = field(default_factory=list)
    pipeid: int = 0


@dataclass
class ActivePipe:
    progress: Progress
    done: anyio.Event
    error: BaseException | None = None
    #: None once the write end is closed (payloads written inline).
    end: WriteEnd | None = None


class SessionOptions:
    """Everything a session needs from the command line."""

    def __init__(
        self,
        context: SystemContext,
        policy: Policy,
        *,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        platform: PlatformWanted | None = None,
        open_rpc: Callable[[socket.socket], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.context = context
        self.policy = policy
        self.stall_timeout = stall_timeout
        self.platform = platform or PlatformWanted.of_machine()
        #: Serves one jsonrpc-fdpass connection; set once that API is wired.
        self.open_rpc = open_rpc


async def open_image(name: str, options: SessionOptions) -> OpenedImage:
    """Open and policy-check an image (shared by both protocols)."""
    transport, reference = split_image_name(name)
    source = await transport.open(reference, options.context)
    try:
        options.policy.check(name, transport.name, source.policy_scopes())
    except BaseException:
        await source.close()
        raise
    return OpenedImage(source, options.platform)


class LegacySession:
    """The state of one client: opened images and unfinished pipes."""

    def __init__(self, options: SessionOptions, tg: anyio.abc.TaskGroup) -> None:
        self._options = options
        self._tg = tg
        self._initialized = False
        self._images: dict[int, OpenedImage] = {}
        self._last_image_id = 0
        self._pipes: dict[int, ActivePipe] = {}
        self._last_pipe_id = 0
        self._methods: dict[str, Callable[[list[Any]], Awaitable[Outcome]]] = {
            "Initialize": self.initialize,
            "OpenImage": self.open_image,
            "OpenImageOptional": self.open_image_optional,
            "CloseImage": self.close_image,
            "GetManifest": self.get_manifest,
            "GetFullConfig": self.get_full_config,
            "GetConfig": self.get_config,
            "GetBlob": self.get_blob,
            "GetRawBlob": self.get_raw_blob,
            "GetLayerInfo": self.get_layer_info,
            "GetLayerInfoPiped": self.get_layer_info_piped,
            "FinishPipe": self.finish_pipe,
            "OpenJsonRPCFdPass": self.open_jsonrpc_fdpass,
        }

    # -- dispatch -------------------------------------------------------------

    async def handle(self, request: legacy.Request) -> Outcome:
        method = self._methods.get(request.method)
        if method is None:
            raise ClientError(f"unknown method: {request.method}")
        if request.method != "FinishPipe" and request.method != "Initialize":
            self._require_initialized()
        return await method(request.args)

    def _require_initialized(self) -> None:
        if not self._initialized:
            raise NotInitializedError("client error: must invoke Initialize")

    def _image(self, value: Any) -> OpenedImage:
        image_id = legacy.parse_u64(value)
        if image_id == 0:
            raise ClientError("invalid imageid value of zero")
        image = self._images.get(image_id)
        if image is None:
            raise NotFoundError(f"no image {image_id}")
        return image

    # -- methods --------------------------------------------------------------

    async def initialize(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 0, "invalid request, expecting zero arguments")
        if self._initialized:
            raise ClientError("already initialized")
        self._initialized = True
        return Outcome(legacy.PROTOCOL_VERSION)

    async def open_image(self, args: list[Any]) -> Outcome:
        return await self._open(args, optional=False)

    async def open_image_optional(self, args: list[Any]) -> Outcome:
        return await self._open(args, optional=True)

    async def _open(self, args: list[Any], *, optional: bool) -> Outcome:
        legacy.expect_arg_count(args, 1, "invalid request, expecting one argument")
        name = legacy.parse_string(args[0], "imageref")
        try:
            image = await open_image(name, self._options)
        except NotFoundError:
            if optional:
                return Outcome(0)
            raise
        self._last_image_id += 1
        self._images[self._last_image_id] = image
        return Outcome(self._last_image_id)

    async def close_image(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 1, "invalid request, expecting one argument")
        image = self._image(args[0])
        # _image validated the id, so it is the key as given.
        del self._images[int(args[0])]
        await image.close()
        return Outcome(None)

    async def get_manifest(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 1, "invalid request, expecting one argument")
        resolved = await self._image(args[0]).resolve()
        return self._bytes_pipe(resolved.digest, resolved.oci_manifest())

    async def get_full_config(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 1, "invalid request, expecting: [imgid]")
        resolved = await self._image(args[0]).resolve()
        return self._bytes_pipe(None, serialise_full_config(resolved.config))

    async def get_config(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 1, "invalid request, expecting: [imgid]")
        resolved = await self._image(args[0]).resolve()
        return self._bytes_pipe(None, serialise_runtime_config(resolved.config))

    async def get_layer_info(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 1, f"found {len(args)} args, expecting (imgid)")
        return Outcome(await self._layer_infos(args[0]))

    async def get_layer_info_piped(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 1, f"found {len(args)} args, expecting (imgid)")
        infos = await self._layer_infos(args[0])
        return self._bytes_pipe(None, go_json(infos))

    async def _layer_infos(self, image_arg: Any) -> list[legacy.LayerInfo]:
        image = self._image(image_arg)
        resolved = await image.resolve()
        infos = image.source.layer_infos_for_copy() or resolved.layer_infos()
        return [
            legacy.LayerInfo(info.digest, info.size, info.media_type) for info in infos
        ]

    async def get_blob(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(
            args, 3, f"found {len(args)} args, expecting (imgid, digest, size)"
        )
        image = self._image(args[0])
        digest_text = args[1]
        if not isinstance(digest_text, str):
            raise ClientError("expecting string blobid")
        # -1 means "size unknown": the reference requires a size, we do not.
        size = None if args[2] == -1 else legacy.parse_u64(args[2])
        digest = Digest(digest_text)
        blob = await anyio.to_thread.run_sync(image.source.open_blob, digest)
        return self._start_pipe(
            blob.size,
            lambda fd, progress: copy_verified(blob, digest, size, fd, progress),
            blob,
        )

    async def get_raw_blob(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(
            args, 2, f"found {len(args)} args, expecting (imgid, digest)"
        )
        image = self._image(args[0])
        if not isinstance(args[1], str):
            raise ClientError("expecting string blobid")
        digest = Digest(args[1])
        blob = await anyio.to_thread.run_sync(image.source.open_blob, digest)
        data_read, data_write = make_pipe()
        error_read, error_write = os.pipe2(os.O_CLOEXEC)
        progress = Progress()
        timeout = self._options.stall_timeout

        def copy() -> None:
            try:
                copy_raw(blob, data_write, progress)
            except Cancelled:
                raise stall_error(timeout) from None

        def discard() -> None:
            blob.close()
            os.close(data_write)
            os.close(error_write)

        self._tg.start_soon(
            partial(
                run_transfer,
                lambda: run_with_error_fd(
                    copy, blob, data_write, error_write, legacy.encode_pipe_error
                ),
                progress=progress,
                stall_timeout=timeout,
                discard=discard,
            )
        )
        return Outcome(blob.size, [data_read, error_read])

    # -- pipes ------------------------------------------------------------------

    def _bytes_pipe(self, value: Any, payload: bytes) -> Outcome:
        # Manifests and configs almost always fit in the pipe's buffer: write
        # them right here and skip the worker thread, which costs more than
        # the write. Whatever does not fit goes to a worker as usual.
        read_fd, write_fd = self._new_pipe()
        try:
            written = os.write(write_fd, payload)
        except BlockingIOError:
            written = 0
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        if written == len(payload):
            os.close(write_fd)
            pipe = ActivePipe(progress=Progress(), done=anyio.Event())
            pipe.done.set()
            return self._register_pipe(value, read_fd, pipe)
        rest = memoryview(payload)[written:]
        return self._start_worker(
            value,
            read_fd,
            write_fd,
            lambda fd, progress: write_all(fd, rest, progress),
            None,
        )

    def _start_pipe(
        self, value: Any, work: Callable[[int, Progress], None], blob: Blob | None
    ) -> Outcome:
        try:
            read_fd, write_fd = self._new_pipe()
        except BaseException:
            if blob is not None:
                blob.close()
            raise
        return self._start_worker(value, read_fd, write_fd, work, blob)

    def _new_pipe(self) -> tuple[int, int]:
        if len(self._pipes) >= MAX_ACTIVE_PIPES:
            raise ClientError(
                f"{MAX_ACTIVE_PIPES} pipes are unfinished: call FinishPipe first"
            )
        return make_pipe()

    def _start_worker(
        self,
        value: Any,
        read_fd: int,
        write_fd: int,
        work: Callable[[int, Progress], None],
        blob: Blob | None,
    ) -> Outcome:
        pipe = ActivePipe(
            progress=Progress(), done=anyio.Event(), end=WriteEnd(write_fd)
        )
        self._tg.start_soon(self._pipe_worker, pipe, work, blob)
        return self._register_pipe(value, read_fd, pipe)

    def _register_pipe(self, value: Any, read_fd: int, pipe: ActivePipe) -> Outcome:
        self._last_pipe_id = self._last_pipe_id % 0xFFFFFFFF + 1
        self._pipes[self._last_pipe_id] = pipe
        return Outcome(value, [read_fd], self._last_pipe_id)

    async def _pipe_worker(
        self,
        pipe: ActivePipe,
        work: Callable[[int, Progress], None],
        blob: Blob | None,
    ) -> None:
        end = pipe.end
        assert end is not None

        def release() -> None:
            if blob is not None:
                blob.close()
            end.close()

        def run() -> None:
            try:
                pipe.error = run_guarded(lambda: work(end.fd, pipe.progress))
            finally:
                release()

        # Transfers have their own threads, so a client that never reads
        # cannot starve other requests; the watchdog ends a stalled one, and
        # FinishPipe reports it as retryable.
        try:
            await run_transfer(
                run,
                progress=pipe.progress,
                stall_timeout=self._options.stall_timeout,
                discard=release,
            )
        finally:
            pipe.done.set()

    async def finish_pipe(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 1, "invalid request, expecting one argument")
        pipeid = legacy.parse_u64(args[0])
        pipe = self._pipes.get(pipeid)
        if pipe is None:
            raise ClientError(f"finishpipe: no active pipe {pipeid}")
        timeout = self._options.stall_timeout
        while not pipe.done.is_set():
            with anyio.move_on_after(min(1.0, timeout)):
                await pipe.done.wait()
            if not pipe.done.is_set() and pipe.progress.idle_seconds() > timeout:
                pipe.progress.cancelled.set()
                with anyio.move_on_after(5):
                    await pipe.done.wait()
                pipe.error = stall_error(timeout)
                break
        if not pipe.done.is_set() and pipe.end is not None:
            # The worker is stuck in its source; let the client's read end
            # see EOF now that it is told the transfer failed.
            pipe.end.detach()
        del self._pipes[pipeid]
        error = pipe.error
        if isinstance(error, Cancelled):
            error = stall_error(timeout)
        if error is not None:
            raise error
        return Outcome(None)

    async def open_jsonrpc_fdpass(self, args: list[Any]) -> Outcome:
        legacy.expect_arg_count(args, 0, "invalid request, expecting zero arguments")
        if self._options.open_rpc is None:
            raise ClientError("OpenJsonRPCFdPass is not available in this build")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        serve = self._options.open_rpc
        self._tg.start_soon(serve, ours)
        return Outcome(None, [theirs.detach()])

    async def close(self) -> None:
        for pipe in self._pipes.values():
            pipe.progress.cancelled.set()
        for image in self._images.values():
            await image.close()
        self._images.clear()


async def serve_legacy(sockfd: int, options: SessionOptions) -> None:
    """Serve one client on ``sockfd`` until it closes or sends Shutdown."""
    try:
        sock = socket.socket(fileno=sockfd)
    except OSError as exc:
        raise ClientError(f"fd {sockfd} is not a socket: {exc.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        raise ClientError(f"fd {sockfd} is not an AF_UNIX SOCK_SEQPACKET socket")
    sock.setblocking(False)
    async with anyio.create_task_group() as tg:
        session = LegacySession(options, tg)
        try:
            await _serve_requests(sock, session)
        finally:
            await session.close()
            tg.cancel_scope.cancel()
            sock.close()


async def _serve_requests(sock: socket.socket, session: LegacySession) -> None:
    while True:
        try:
            received = await receive_packet(sock, legacy.MAX_PACKET_SIZE)
        except PacketTooLarge as exc:
            await send_packet(
                sock, legacy.encode_error(ClientError(f"invalid request: {exc}")), []
            )
            continue
        if received is None:
            return
        packet, fds = received
        # No method takes fds from the client.
        close_all(fds)
        if not await _answer(sock, session, packet):
            return


async def _answer(sock: socket.socket, session: LegacySession, packet: bytes) -> bool:
    """Handle one request packet; False once the client asked to shut down."""
    started = time.monotonic()
    outcome = Outcome()
    method = "?"
    try:
        request = legacy.parse_request(packet)
        method = request.method
        if method == "Shutdown":
            log.debug("Shutdown")
            return False
        outcome = await session.handle(request)
        reply = legacy.encode_success(outcome.value, outcome.pipeid)
    except (ImageProxyError, BrokenPipeError) as exc:
        reply = legacy.encode_error(exc)
    except Exception as exc:
        log.exception("internal error in %s", method)
        reply = legacy.encode_error(
            ImageProxyError(f"internal error in {method}: {exc}")
        )
    succeeded = legacy.is_success(reply)
    try:
        if not succeeded:
            # An error reply (perhaps one that replaced a too-large success)
            # carries no fds.
            close_all(outcome.fds)
            outcome.fds = []
        await send_packet(sock, reply, outcome.fds)
    finally:
        close_all(outcome.fds)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "%s %s -> %s in %.2f ms",
            method,
            _summary(packet),
            "ok" if succeeded else "error",
            (time.monotonic() - started) * 1000,
        )
    return True


def _summary(packet: bytes) -> str:
    text = packet.decode("utf-8", "replace")
    return text if len(text) <= 200 else text[:200] + "..."
