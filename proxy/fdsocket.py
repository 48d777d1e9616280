# Bytes plus fds over a non-blocking AF_UNIX SOCK_STREAM socket, with anyio.
#
# Strategy: try the system call first; on EAGAIN park the task until the
# event loop reports the socket ready (anyio.wait_writable / wait_readable),
# so a full socket buffer never spins the CPU. One message's sendmsg calls
# come from protocol.jsonrpc.plan_fd_batches: the payload with the first
# batch of fds, then one space per further batch. The kernel attaches the
# fds of a call to its first byte, so when sendmsg writes only part of the
# payload the rest goes out with plain send and the fds are not resent.
# Linux refuses more than 253 fds per call (EINVAL): the batch is then halved
# for this message and every later one.
#
# Bounds: one recvmsg returns at most `max_bytes` bytes and room for
# MAX_FDS_PER_RECEIVE fds (Linux hands out the fds of at most one sendmsg
# per recvmsg); more is reported as an error, never silently dropped.

from __future__ import annotations

import array
import errno
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import anyio

from protocol.jsonrpc import DEFAULT_FD_BATCH, plan_fd_batches

_wait_readable: Callable[[socket.socket], Awaitable[None]]
_wait_writable: Callable[[socket.socket], Awaitable[None]]
if hasattr(anyio, "wait_writable"):  # anyio >= 4.7
    _wait_readable = anyio.wait_readable
    _wait_writable = anyio.wait_writable
else:
    _wait_readable = anyio.wait_socket_readable
    _wait_writable = anyio.wait_socket_writable

# Room for more than Linux's SCM_MAX_FD (253) so a full batch never truncates.
MAX_FDS_PER_RECEIVE: Final = 512
DEFAULT_RECEIVE_SIZE: Final = 256 * 1024
_FD_SIZE: Final = array.array("i").itemsize
_ANCILLARY_SPACE: Final = socket.CMSG_SPACE(MAX_FDS_PER_RECEIVE * _FD_SIZE)
_PEER_GONE: Final = (errno.EPIPE, errno.ECONNRESET)


class FdPassingError(Exception):
    """Fds sent to us were lost: the connection can no longer be trusted."""


class FdSocket:
    """Messages with SCM_RIGHTS fds over one connected SOCK_STREAM socket.

    The socket is switched to non-blocking mode and owned by this object:
    `aclose` closes it. Fds passed to `send_message` stay owned by the
    caller (the kernel duplicates them into the message); fds returned by
    `receive` are owned by the caller and are close-on-exec.
    """

    def __init__(
        self, sock: socket.socket, *, fd_batch: int = DEFAULT_FD_BATCH
    ) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"need an AF_UNIX SOCK_STREAM socket, got {sock!r}")
        sock.setblocking(False)
        self._sock = sock
        self._fd_batch = fd_batch
        self._send_lock = anyio.Lock()
        # Set when a send stopped half way: the peer would see a torn message.
        self._send_broken = False

    @property
    def fd_batch(self) -> int:
        """How many fds one sendmsg carries (shrinks after EINVAL)."""
        return self._fd_batch

    def fileno(self) -> int:
        """The socket's fd (still owned by this object)."""
        return self._sock.fileno()

    async def send_message(self, payload: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole message and its fds; concurrent calls never interleave.

        The caller keeps ownership of ``fds`` and closes them afterwards.
        Raises anyio.BrokenResourceError when the peer is gone or an earlier
        send was interrupted half way, anyio.ClosedResourceError after
        `aclose`.
        """
        async with self._send_lock:
            self._check_open()
            if self._send_broken:
                raise anyio.BrokenResourceError("an earlier send was interrupted")
            try:
                await self._send_calls(payload, fds)
            except OSError as exc:
                if exc.errno in _PEER_GONE:
                    raise anyio.BrokenResourceError(f"peer closed: {exc}") from exc
                raise
            self._send_broken = False

    async def receive(
        self, max_bytes: int = DEFAULT_RECEIVE_SIZE
    ) -> tuple[bytes, list[int]]:
        """The next bytes and fds from the peer; empty bytes at end of stream.

        Raises FdPassingError (after closing the fds that did arrive) when
        the kernel truncated the fds.
        """
        while True:
            self._check_open()
            try:
                data, ancillary, flags, _ = self._sock.recvmsg(
                    max_bytes, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await _wait_readable(self._sock)
                continue
            except ConnectionResetError:
                return b"", []
            fds = _fds_from(ancillary)
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise FdPassingError(
                    f"fds sent by the peer were truncated (got {len(fds)}): it sent "
                    f"more than {MAX_FDS_PER_RECEIVE} in one call, or this process "
                    f"reached its open-file limit"
                )
            return data, fds

    async def aclose(self) -> None:
        """Close the socket, waking any task waiting on it."""
        if self._sock.fileno() < 0:
            return
        if hasattr(anyio, "notify_closing"):
            anyio.notify_closing(self._sock)
        self._sock.close()
        await anyio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._sock.fileno() < 0:
            raise anyio.ClosedResourceError("the jsonrpc-fdpass socket is closed")

    async def _send_calls(self, payload: bytes, fds: Sequence[int]) -> None:
        calls = deque(plan_fd_batches(payload, fds, self._fd_batch))
        while calls:
            data, batch = calls.popleft()
            try:
                written = await self._sendmsg(data, batch)
            except OSError as exc:
                if exc.errno != errno.EINVAL or len(batch) <= 1:
                    raise
                # Too many fds for one call on this kernel: re-plan the rest.
                self._fd_batch = len(batch) // 2
                rest = batch + [fd for _, later in calls for fd in later]
                calls = deque(plan_fd_batches(data, rest, self._fd_batch))
                continue
            # From the first byte on, stopping would tear the message.
            self._send_broken = True
            await self._send_plain(memoryview(data)[written:])

    async def _sendmsg(self, data: bytes, fds: list[int]) -> int:
        """One sendmsg; the fds go with the first byte written."""
        ancillary = []
        if fds:
            rights = array.array("i", fds).tobytes()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
        while True:
            try:
                return self._sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                await _wait_writable(self._sock)

    async def _send_plain(self, data: memoryview) -> None:
        while data:
            try:
                written = self._sock.send(data, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                await _wait_writable(self._sock)
                continue
            data = data[written:]


def _fds_from(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    return fds


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd in ``fds``, even if closing one of them fails."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
