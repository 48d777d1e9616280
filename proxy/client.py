"""The reference client: spawn the proxy, speak both protocols.

This is how bootc or rpm-ostree use skopeo's proxy: create a SOCK_SEQPACKET
socketpair, start ``image-proxy experimental-image-proxy`` with one end as
its stdin, Initialize, then call methods. ``open_rpc`` asks for a
jsonrpc-fdpass socket with OpenJsonRPCFdPass and returns a client for it.

Legacy calls are strictly sequential (the protocol has no request ids), so
the legacy client serialises them with a lock. Pipe payloads are read in a
worker thread concurrently with FinishPipe, as the Rust client does, because
the reference only closes a pipe's write end inside FinishPipe.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import msgspec

from protocol import api, legacy
from protocol.jsonrpc import (
    MessageFramer,
    Response,
    RpcError,
    encode_message,
    new_request,
)
from proxy.fdsocket import FdSocket, close_fds
from proxy.seqpacket import close_all, receive_packet, send_packet

R = TypeVar("R")


class LegacyError(Exception):
    """An error reply from the legacy protocol."""

    def __init__(self, method: str, message: str, error_code: str) -> None:
        super().__init__(f"{method}: {message}")
        self.method = method
        self.message = message
        self.error_code = error_code


def proxy_command() -> list[str]:
    """How to start our proxy: this interpreter running the proxy package."""
    return [sys.executable, "-m", "proxy"]


class LegacyClient:
    """Speaks skopeo's proxy protocol on one SEQPACKET socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._lock = anyio.Lock()

    async def call(self, method: str, *args: Any) -> tuple[Any, list[int], int]:
        """Send one request; return (value, fds, pipeid) or raise LegacyError."""
        packet = msgspec.json.encode({"method": method, "args": list(args)})
        async with self._lock:
            await send_packet(self._sock, packet, [])
            received = await receive_packet(self._sock, 1 << 20)
        if received is None:
            raise EOFError(f"{method}: the proxy closed the connection")
        data, fds = received
        reply = msgspec.json.decode(data, type=legacy.Reply)
        if not reply.success:
            close_all(fds)
            raise LegacyError(method, reply.error, reply.error_code)
        return reply.value, fds, reply.pipeid

    async def call_piped(self, method: str, *args: Any) -> tuple[Any, bytes]:
        """A method answering through a pipe: read it all while FinishPipe runs.

        A failed transfer raises FinishPipe's LegacyError once the pipe has
        been drained.
        """
        value, fds, pipeid = await self.call(method, *args)
        (fd,) = fds
        payload: list[bytes] = []
        failure: list[LegacyError] = []

        async def finish() -> None:
            try:
                await self.call("FinishPipe", pipeid)
            except LegacyError as exc:
                failure.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish)
            payload.append(await anyio.to_thread.run_sync(_read_all, fd))
        if failure:
            raise failure[0]
        return value, payload[0]

    async def initialize(self) -> str:
        version, _, _ = await self.call("Initialize")
        return str(version)

    async def open_image(self, name: str, *, optional: bool = False) -> int:
        method = "OpenImageOptional" if optional else "OpenImage"
        image_id, _, _ = await self.call(method, name)
        return int(image_id)

    async def open_rpc(self) -> RpcClient:
        _, fds, _ = await self.call("OpenJsonRPCFdPass")
        (fd,) = fds
        return RpcClient(FdSocket(socket.socket(fileno=fd)))

    async def shutdown(self) -> None:
        async with self._lock:
            await send_packet(self._sock, b'{"method":"Shutdown","args":[]}', [])

    def close(self) -> None:
        self._sock.close()


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as reader:
        return reader.read()


class RpcClient:
    """A jsonrpc-fdpass client: concurrent calls matched by id."""

    def __init__(self, sock: FdSocket) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[anyio.Event, list[Any]]] = {}
        self._framer = MessageFramer()
        self._reader_lock = anyio.Lock()
        self._closed: BaseException | None = None

    async def call(
        self, method: str, params: Any, result_type: type[R]
    ) -> tuple[R, list[int]]:
        """Call ``method``; return its typed result and the fds sent with it."""
        request_id = next(self._ids)
        done = anyio.Event()
        slot: list[Any] = []
        self._waiting[request_id] = (done, slot)
        try:
            await self._sock.send_message(
                encode_message(new_request(method, params, id=request_id))
            )
            while not done.is_set():
                await self._pump(done)
        finally:
            self._waiting.pop(request_id, None)
        response, fds = slot
        if response.error is not msgspec.UNSET:
            close_fds(fds)
            error = response.error
            raise RpcError(error.code, error.message, error.data)
        try:
            return msgspec.json.decode(response.result, type=result_type), fds
        except msgspec.ValidationError:
            close_fds(fds)
            raise

    async def _pump(self, done: anyio.Event) -> None:
        """Read one chunk and deliver what it completes; one reader at a time.

        The lock is held for a single receive only: a caller whose answer
        another caller's read delivered gets the lock next and returns,
        instead of waiting until the reader's own answer arrives.
        """
        async with self._reader_lock:
            if done.is_set():
                return
            if self._closed is not None:
                raise EOFError("the proxy closed the jsonrpc-fdpass connection")
            data, fds = await self._sock.receive()
            if not data:
                close_fds(fds)
                self._closed = EOFError()
                return
            self._framer.feed(data, fds)
            while (item := self._framer.next_message()) is not None:
                message, message_fds = item
                self._deliver(message, message_fds)

    def _deliver(self, message: Any, fds: list[int]) -> None:
        if not isinstance(message, Response) or not isinstance(message.id, int):
            close_fds(fds)
            if isinstance(message, Response) and message.error is not msgspec.UNSET:
                # A fatal error with id null: the server is about to hang up.
                self._closed = RpcError(
                    message.error.code, message.error.message, message.error.data
                )
            return
        waiter = self._waiting.get(message.id)
        if waiter is None:
            close_fds(fds)
            return
        event, slot = waiter
        slot.extend([message, fds])
        event.set()

    # -- typed methods -------------------------------------------------------

    async def initialize(
        self, versions: Sequence[str] = api.SUPPORTED_VERSIONS
    ) -> api.InitializeResult:
        result, _ = await self.call(
            "Initialize",
            api.InitializeParams(versions=list(versions), client="image-proxy"),
            api.InitializeResult,
        )
        return result

    async def open_image(self, name: str, *, optional: bool = False) -> int | None:
        result, _ = await self.call(
            "OpenImage",
            api.OpenImageParams(image_name=name, optional=optional),
            api.OpenImageResult,
        )
        return result.image_id

    async def close_image(self, image_id: int) -> None:
        await self.call("CloseImage", api.ImageParams(image_id=image_id), api.Empty)

    async def get_manifest(
        self, image_id: int, **options: bool
    ) -> api.GetManifestResult:
        params = api.GetManifestParams(image_id=image_id, **options)
        result, _ = await self.call("GetManifest", params, api.GetManifestResult)
        return result

    async def get_config(self, image_id: int) -> api.GetConfigResult:
        result, _ = await self.call(
            "GetConfig", api.ImageParams(image_id=image_id), api.GetConfigResult
        )
        return result

    async def get_layer_info(self, image_id: int) -> list[api.LayerDescription]:
        result, _ = await self.call(
            "GetLayerInfo", api.ImageParams(image_id=image_id), api.GetLayerInfoResult
        )
        return result.layers

    async def get_blob(
        self, image_id: int, digest: str, *, verify: bool = False
    ) -> tuple[int, int, int]:
        """Returns (size, data fd, error fd); the caller owns both fds."""
        params = api.GetBlobParams(image_id=image_id, digest=digest, verify=verify)
        result, fds = await self.call("GetBlob", params, api.GetBlobResult)
        data_fd, error_fd = fds
        return result.size, data_fd, error_fd

    async def get_splitfdstream(
        self, image_id: int, digest: str, max_fds: int = api.DEFAULT_FD_WINDOW
    ) -> tuple[api.GetSplitFDStreamResult, int, list[int]]:
        """Returns the result, the stream fd and the first window of files."""
        params = api.GetSplitFDStreamParams(
            image_id=image_id, digest=digest, max_fds=max_fds
        )
        result, fds = await self.call(
            "GetSplitFDStream", params, api.GetSplitFDStreamResult
        )
        return result, fds[0], fds[1:]

    async def get_splitfdstream_files(
        self, stream_id: int, start: int, count: int
    ) -> list[int]:
        params = api.GetSplitFDStreamFilesParams(
            stream_id=stream_id, start=start, count=count
        )
        _, fds = await self.call(
            "GetSplitFDStreamFiles", params, api.GetSplitFDStreamFilesResult
        )
        return fds

    async def close_splitfdstream(self, stream_id: int) -> None:
        await self.call(
            "CloseSplitFDStream", api.StreamParams(stream_id=stream_id), api.Empty
        )

    async def aclose(self) -> None:
        close_fds(self._framer.close())
        await self._sock.aclose()


class ProxyProcess:
    """A spawned proxy and the legacy client talking to it."""

    def __init__(self, process: subprocess.Popen[bytes], client: LegacyClient) -> None:
        self.process = process
        self.legacy = client

    @classmethod
    @asynccontextmanager
    async def spawn(
        cls, args: Sequence[str] = (), command: Sequence[str] | None = None
    ) -> AsyncIterator[ProxyProcess]:
        """Start ``command experimental-image-proxy args`` on a socketpair.

        On exit the proxy is asked to shut down and reaped.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [*(command or proxy_command()), "experimental-image-proxy", *args]
        try:
            process = subprocess.Popen(
                argv, stdin=theirs.fileno(), stdout=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        proxy = cls(process, LegacyClient(ours))
        try:
            yield proxy
        finally:
            with anyio.CancelScope(shield=True):
                await proxy._stop()

    async def _stop(self) -> None:
        if self.process.poll() is None:
            try:
                await self.legacy.shutdown()
            except OSError:
                pass
        self.legacy.close()
        try:
            await anyio.to_thread.run_sync(self.process.wait, 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await anyio.to_thread.run_sync(self.process.wait)
