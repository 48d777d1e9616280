"""Async send and receive of one packet plus fds on a SOCK_SEQPACKET socket.

Both ends of the legacy protocol use these: the server on its inherited fd,
the client on its end of the socketpair. Sockets are non-blocking; waiting
is done with anyio so the event loop stays free.
"""

from __future__ import annotations

import array
import os
import socket

import anyio

_FD_SIZE = array.array("i").itemsize


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
    return list(fds)


class PacketTooLarge(Exception):
    """The peer sent a packet longer than we accept; it was discarded."""


async def receive_packet(
    sock: socket.socket, max_size: int, max_fds: int = 16
) -> tuple[bytes, list[int]] | None:
    """One packet and its fds, or None at EOF.

    Received fds are close-on-exec. A packet longer than ``max_size`` raises
    PacketTooLarge after closing any fds that came with it.
    """
    while True:
        # Try first: when the packet is already queued this saves registering
        # with the event loop, which costs more than the failed call.
        try:
            data, ancillary, flags, _ = sock.recvmsg(
                max_size + 1,
                socket.CMSG_SPACE(max_fds * _FD_SIZE),
                socket.MSG_CMSG_CLOEXEC,
            )
        except BlockingIOError:
            await anyio.wait_readable(sock)
            continue
        fds = _fds_of(ancillary)
        if not data and not fds:
            return None
        if flags & socket.MSG_TRUNC or len(data) > max_size:
            close_all(fds)
            raise PacketTooLarge(f"packet larger than {max_size} bytes")
        return data, fds


async def send_packet(sock: socket.socket, packet: bytes, fds: list[int]) -> None:
    """Send one packet with ``fds``; the caller keeps ownership of the fds."""
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    while True:
        try:
            sock.sendmsg([packet], ancillary)
            return
        except BlockingIOError:
            await anyio.wait_writable(sock)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
