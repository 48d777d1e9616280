"""Moving blob bytes into pipes from worker threads.

Each transfer runs in its own thread and writes to a non-blocking pipe,
waiting for room with ``poll`` in short slices so it can notice cancellation:
a client that stops reading can never wedge a worker, and FinishPipe can give
up on a worker that makes no progress. Progress is a monotonic timestamp the
worker refreshes after every write; nothing else is shared with the loop.

Memory per transfer is one buffer of ``CHUNK_SIZE`` bytes. Pipes are enlarged
to ``PIPE_SIZE`` (when the kernel allows) to cut context switches between the
worker and the reading client.

Threads: transfers run under their own limiter (:func:`run_transfer`, at most
``MAX_TRANSFER_THREADS`` at once in a process), never under anyio's default
one. A transfer can block for as long as its client does not read, so
sharing the default limiter let one client that stops reading take every
thread and starve the short blocking calls (opening a blob, reading a
manifest) of all other clients. A transfer given a ``stall_timeout`` is
cancelled by a watchdog once it has made no progress for that long; a worker
blocked inside a source's read notices only when that read returns, which the
transports' own timeouts bound.
"""

from __future__ import annotations

import fcntl
import os
import select
import threading
import time
from collections.abc import Callable

import anyio
from anyio.lowlevel import RunVar

from protocol.errors import DigestMismatchError, RetryableError
from protocol.image import Digest
from proxy.transports.base import Blob

CHUNK_SIZE = 1024 * 1024
PIPE_SIZE = 1024 * 1024
_POLL_SLICE_MS = 200

#: Transfer threads a process runs at once; the rest wait for a thread. Each
#: connection bounds its own unfinished transfers far below this, so one
#: client cannot take them all.
MAX_TRANSFER_THREADS = 512

_transfer_limiter: RunVar[anyio.CapacityLimiter] = RunVar("transfer_limiter")


class Cancelled(Exception):
    """The transfer was abandoned: FinishPipe timed out or the proxy stops."""


class WriteEnd:
    """A pipe's write end that the event loop can take away from a worker.

    A worker stuck reading its source (a stalled registry) cannot be
    interrupted, yet its client must see EOF once FinishPipe has reported the
    failure. ``detach`` points the fd number at /dev/null with ``dup2``: the
    pipe's write end is released at once, the number stays valid, and any
    late write of the worker goes nowhere. The lock orders ``detach`` against
    the worker's ``close``, so a number the kernel reused is never touched.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)

    def detach(self) -> None:
        with self._lock:
            if self._closed:
                return
            null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.dup2(null, self.fd, inheritable=False)
            finally:
                os.close(null)


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
    stall_timeout: float | None = None,
) -> None:
    """Run a transfer that reports failure on ``error_fd``, then close all.

    This is GetRawBlob's contract (and the new API's GetBlob): the client
    reads data to EOF, then the error fd to EOF; an empty error means success.
    A client that closed its data end (EPIPE) is not told anything. A transfer
    cancelled by the watchdog of :func:`run_transfer` is reported as the
    retryable stall error of ``stall_timeout``.
    """
    progress = Progress()
    try:
        error = run_guarded(work)
        if isinstance(error, Cancelled) and stall_timeout is not None:
            error = stall_error(stall_timeout)
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


def transfer_limiter() -> anyio.CapacityLimiter:
    """The event loop's limiter for transfer threads, made on first use."""
    try:
        return _transfer_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(MAX_TRANSFER_THREADS)
        _transfer_limiter.set(limiter)
        return limiter


async def run_transfer(
    work: Callable[[], None],
    *,
    progress: Progress | None = None,
    stall_timeout: float | None = None,
    discard: Callable[[], None] | None = None,
) -> None:
    """Run a blocking transfer in a thread of the transfer limiter.

    With ``progress`` and ``stall_timeout``, a watchdog sets
    ``progress.cancelled`` once the transfer has made no progress for
    ``stall_timeout`` seconds, so that ``work`` raises :class:`Cancelled` at
    its next write. Cancelling the caller abandons the thread, which then
    ends at its next write or poll slice (set ``progress.cancelled`` to make
    it stop there). When the caller is cancelled before ``work`` started,
    ``work`` never runs and ``discard`` is called instead, to release what
    ``work`` would have closed.
    """
    claim = _Claim()

    def run() -> None:
        if claim.take():
            work()

    limiter = transfer_limiter()
    try:
        if progress is None or stall_timeout is None:
            await anyio.to_thread.run_sync(run, abandon_on_cancel=True, limiter=limiter)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch, progress, stall_timeout)
            try:
                await anyio.to_thread.run_sync(
                    run, abandon_on_cancel=True, limiter=limiter
                )
            finally:
                tg.cancel_scope.cancel()
    finally:
        if discard is not None and claim.take():
            discard()


class _Claim:
    """Decides once, across threads, whether the worker or the loop owns a job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken = False

    def take(self) -> bool:
        with self._lock:
            if self._taken:
                return False
            self._taken = True
            return True


async def _watch(progress: Progress, stall_timeout: float) -> None:
    # Checking once a second (or faster for short timeouts) keeps the
    # overshoot under a second at the cost of one timer per transfer.
    while progress.idle_seconds() <= stall_timeout:
        await anyio.sleep(min(1.0, stall_timeout / 2))
    progress.cancelled.set()
