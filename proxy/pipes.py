"""Moving blob bytes into pipes from worker threads.

Each transfer runs in its own thread and writes to a non-blocking pipe,
waiting for room with ``poll`` in short slices so it can notice cancellation:
a client that stops reading can never wedge a worker, and FinishPipe can give
up on a worker that makes no progress. Progress is a monotonic timestamp the
worker refreshes after every write; nothing else is shared with the loop.

Memory per transfer is one buffer of ``CHUNK_SIZE`` bytes. Pipes are enlarged
to ``PIPE_SIZE`` (when the kernel allows) to cut context switches between the
worker and the reading client.
"""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time
from collections.abc import Callable

from protocol.errors import DigestMismatchError, RetryableError
from protocol.image import Digest
from proxy.transports.base import Blob

CHUNK_SIZE = 1024 * 1024
PIPE_SIZE = 1024 * 1024
_POLL_SLICE_MS = 200


class Cancelled(Exception):
    """The transfer was abandoned: FinishPipe timed out or the proxy stops."""


def make_pipe() -> tuple[int, int]:
    """A close-on-exec pipe whose write end is non-blocking."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(write_fd, False)
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        # An unprivileged process over /proc/sys/fs/pipe-max-size keeps the
        # default size; that only costs speed.
        pass
    return read_fd, write_fd


class Progress:
    """What a worker shares with the event loop."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.bytes = 0
        self.cancelled = threading.Event()

    def advance(self, count: int) -> None:
        self.bytes += count
        self.last = time.monotonic()

    def idle_seconds(self) -> float:
        return time.monotonic() - self.last


def write_all(fd: int, data: memoryview, progress: Progress) -> None:
    """Write everything, waiting for room; raises Cancelled or BrokenPipeError."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while data:
        if progress.cancelled.is_set():
            raise Cancelled()
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            poller.poll(_POLL_SLICE_MS)
            continue
        except BrokenPipeError:
            raise client_closed_pipe(progress) from None
        data = data[written:]
        progress.advance(written)


def client_closed_pipe(progress: Progress) -> BrokenPipeError:
    """EPIPE, said so that a user knows it was the client that hung up."""
    return BrokenPipeError(
        "the client closed its end of the pipe after "
        f"{progress.bytes} bytes had been written to it"
    )


def copy_verified(
    blob: Blob, digest: Digest, expected_size: int | None, fd: int, progress: Progress
) -> None:
    """Copy ``blob`` to ``fd`` while hashing; raise if size or digest differ.

    The checks and their wording follow skopeo's GetBlob: a wrong digest is
    reported over a wrong size when both are wrong.
    """
    hasher = digest.hasher()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    total = 0
    while True:
        count = blob.reader.readinto(view)  # type: ignore[attr-defined]
        if not count:
            break
        chunk = view[:count]
        hasher.update(chunk)
        write_all(fd, chunk, progress)
        total += count
    if hasher.hexdigest() != digest.hex:
        raise DigestMismatchError(
            f"corrupted blob, expecting {digest}",
            expected=str(digest),
            actual=f"{digest.algorithm}:{hasher.hexdigest()}",
        )
    if expected_size is not None and total != expected_size:
        raise DigestMismatchError(
            f"expected {expected_size} bytes in blob, got {total}"
        )


def copy_raw(blob: Blob, fd: int, progress: Progress) -> None:
    """Copy ``blob`` to ``fd`` unverified, zero-copy when it is a local file."""
    if blob.fileno is not None:
        _splice_file(blob.fileno, fd, progress)
        return
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    while True:
        count = blob.reader.readinto(view)  # type: ignore[attr-defined]
        if not count:
            return
        write_all(fd, view[:count], progress)


def _splice_file(source_fd: int, fd: int, progress: Progress) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    offset = 0
    while True:
        if progress.cancelled.is_set():
            raise Cancelled()
        try:
            sent = os.sendfile(fd, source_fd, offset, CHUNK_SIZE)
        except BlockingIOError:
            poller.poll(_POLL_SLICE_MS)
            continue
        except BrokenPipeError:
            raise client_closed_pipe(progress) from None
        if sent == 0:
            return
        offset += sent
        progress.advance(sent)


def run_guarded(work: Callable[[], None]) -> BaseException | None:
    """Run ``work`` and return what it raised, so the thread never dies loud."""
    try:
        work()
    except BaseException as exc:  # noqa: BLE001 - reported to the client
        return exc
    return None


def run_with_error_fd(
    work: Callable[[], None],
    blob: Blob,
    data_fd: int,
    error_fd: int,
    encode_error: Callable[[BaseException], bytes],
) -> None:
    """Run a transfer that reports failure on ``error_fd``, then close all.

    This is GetRawBlob's contract (and the new API's GetBlob): the client
    reads data to EOF, then the error fd to EOF; an empty error means success.
    A client that closed its data end (EPIPE) is not told anything.
    """
    progress = Progress()
    try:
        error = run_guarded(work)
        if error is not None and not isinstance(error, BrokenPipeError):
            message = memoryview(encode_error(error))
            os.set_blocking(error_fd, False)
            run_guarded(lambda: write_all(error_fd, message, progress))
    finally:
        blob.close()
        os.close(data_fd)
        os.close(error_fd)


def stall_error(seconds: float) -> RetryableError:
    return RetryableError(f"blob transfer made no progress for {seconds:.0f} seconds")
