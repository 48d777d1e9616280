"""FdSocket over a real socketpair: bytes, SCM_RIGHTS fds and their batching."""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from proxy.fdsocket import FdPassingError, FdSocket, close_fds

pytestmark = pytest.mark.anyio


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def socket_pair(fd_batch: int = 250) -> Iterator[tuple[FdSocket, FdSocket]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        yield FdSocket(left, fd_batch=fd_batch), FdSocket(right)


@contextlib.contextmanager
def numbered_files(directory: Path, count: int) -> Iterator[list[int]]:
    """``count`` distinct files, opened read-only; closed on exit."""
    fds = []
    try:
        for index in range(count):
            path = directory / f"file-{index}"
            path.write_bytes(b"")
            fds.append(os.open(path, os.O_RDONLY))
        yield fds
    finally:
        close_fds(fds)


async def receive_exactly(
    sock: FdSocket, size: int, fd_count: int
) -> tuple[bytes, list[int]]:
    data = bytearray()
    fds: list[int] = []
    while len(data) < size or len(fds) < fd_count:
        chunk, chunk_fds = await sock.receive()
        assert chunk, "peer closed early"
        data += chunk
        fds += chunk_fds
    return bytes(data), fds


def inodes(fds: list[int]) -> list[tuple[int, int]]:
    return [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds]


async def test_message_and_its_fds_arrive_together() -> None:
    read_end, write_end = os.pipe()
    with socket_pair() as (sender, receiver):
        await sender.send_message(b'{"fds":1}', [write_end])
        data, fds = await receiver.receive()

        assert data == b'{"fds":1}'
        assert len(fds) == 1
        os.write(fds[0], b"through the passed fd")
        assert os.read(read_end, 100) == b"through the passed fd"
        close_fds([read_end, write_end, *fds])


async def test_sender_keeps_ownership_of_the_fds_it_sends() -> None:
    read_end, write_end = os.pipe()
    with socket_pair() as (sender, receiver):
        await sender.send_message(b"{}", [read_end, write_end])
        _, fds = await receiver.receive()
        os.fstat(read_end)
        os.fstat(write_end)
        close_fds([read_end, write_end, *fds])


async def test_received_fds_are_close_on_exec() -> None:
    read_end, write_end = os.pipe2(0)
    assert not fcntl.fcntl(read_end, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    with socket_pair() as (sender, receiver):
        await sender.send_message(b"{}", [read_end])
        _, fds = await receiver.receive()
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        close_fds([read_end, write_end, *fds])


async def test_six_hundred_fds_go_in_batches_of_one_space_each(
    tmp_path: Path,
) -> None:
    with numbered_files(tmp_path, 600) as sent, socket_pair() as (sender, receiver):
        await sender.send_message(b'{"fds":600}', sent)
        # 250 + 250 + 100: the payload, then two single spaces.
        data, received = await receive_exactly(receiver, 13, 600)
        try:
            assert data == b'{"fds":600}  '
            assert inodes(received) == inodes(sent)
        finally:
            close_fds(received)


async def test_batch_is_halved_when_the_kernel_refuses_it(tmp_path: Path) -> None:
    # Linux accepts at most 253 fds per sendmsg (SCM_MAX_FD) and says EINVAL.
    with (
        numbered_files(tmp_path, 600) as sent,
        socket_pair(fd_batch=400) as (sender, receiver),
    ):
        await sender.send_message(b"{}", sent)
        data, received = await receive_exactly(receiver, 4, 600)
        try:
            assert sender.fd_batch == 200
            assert data == b"{}  "
            assert inodes(received) == inodes(sent)
        finally:
            close_fds(received)


async def test_large_payload_waits_for_the_reader_and_keeps_its_fds() -> None:
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB, far over the buffer
    read_end, write_end = os.pipe()
    with socket_pair() as (sender, receiver):
        async with anyio.create_task_group() as group:
            group.start_soon(sender.send_message, payload, [read_end, write_end])
            data, fds = await receive_exactly(receiver, len(payload), 2)
        assert data == payload
        assert inodes(fds) == inodes([read_end, write_end])
        close_fds([read_end, write_end, *fds])


async def test_concurrent_senders_never_interleave_messages() -> None:
    size = 512 * 1024
    with socket_pair() as (sender, receiver):
        async with anyio.create_task_group() as group:
            for marker in b"abcdefgh":
                group.start_soon(sender.send_message, bytes([marker]) * size)
            data, _ = await receive_exactly(receiver, 8 * size, 0)
    runs = [data[start : start + size] for start in range(0, len(data), size)]
    assert sorted(run[:1] for run in runs) == [bytes([m]) for m in b"abcdefgh"]
    assert all(run == run[:1] * size for run in runs)


async def test_receive_returns_empty_at_end_of_stream() -> None:
    with socket_pair() as (sender, receiver):
        await sender.send_message(b"{}")
        await sender.aclose()
        assert await receiver.receive() == (b"{}", [])
        assert await receiver.receive() == (b"", [])


async def test_sending_to_a_closed_peer_is_a_broken_resource() -> None:
    with socket_pair() as (sender, receiver):
        await receiver.aclose()
        with pytest.raises(anyio.BrokenResourceError):
            await sender.send_message(b"{}" * 1024 * 1024)


async def test_truncated_fds_are_an_error_and_none_leak() -> None:
    read_end, write_end = os.pipe()
    copies = [os.dup(read_end) for _ in range(200)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with socket_pair() as (sender, receiver):
        await sender.send_message(b"{}", copies)
        before = open_fd_count()
        # Leave room for only a few more fds so the kernel must drop some.
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 4, hard))
        try:
            with pytest.raises(FdPassingError, match="truncated"):
                await receiver.receive()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert open_fd_count() == before
    close_fds([read_end, write_end, *copies])
