"""``image-proxy pull``: build a root filesystem from layer splitfdstreams.

The command is a consumer like bootc: it spawns the proxy, opens the
jsonrpc-fdpass channel and applies each layer's splitfdstream in order. File
contents arrive as fds on files in the proxy's layer cache, so when DEST is
on the same reflink-capable filesystem they are cloned, not copied.

Fd bound: the client holds at most one window of content fds (``window``,
256 by default) plus the stream; it asks for the next window only after
closing the previous one. The window is shrunk to fit this process's own
``RLIMIT_NOFILE`` (half of what is left after ``RESERVED_FDS`` for the
interpreter, the sockets and the file being written), and the proxy caps it
to its own budget, so any layer works under ``ulimit -n 128``.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread

from protocol import api
from protocol.errors import ClientError, ImageProxyError
from proxy.apply import ApplyStats, LayerApplier
from proxy.client import ProxyProcess, RpcClient
from proxy.fdsocket import close_fds

#: Descriptors left aside for the interpreter, the sockets, the stream and
#: the files being written when sizing the window of content fds.
RESERVED_FDS = 64


def fd_window(requested: int) -> int:
    """The content-fd window this process can hold: at most ``requested``."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, (soft - RESERVED_FDS) // 2))


class ProxyExitedError(ImageProxyError):
    """The proxy exited, or hung up, before the pull was done."""


#: What the client raises when the proxy's end of a socket is gone.
_CONNECTION_LOST = (
    EOFError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    ConnectionError,
)
#: Seconds to wait for a proxy that hung up to exit, for its status.
_EXIT_WAIT = 5.0


@dataclass
class PullReport:
    image: str
    layers: int = 0
    tar_bytes: int = 0
    seconds: float = 0.0
    stats: ApplyStats = field(default_factory=ApplyStats)
    peak_fds: int = 0


class _FileWindow:
    """The window of content fds the applier reads from, moved on demand."""

    def __init__(
        self, rpc: RpcClient, stream_id: int, first: list[int], size: int
    ) -> None:
        self._rpc = rpc
        self._stream_id = stream_id
        self._start = 0
        self._fds = first
        self._size = max(1, size)
        self.peak = len(first)

    def fd_for(self, index: int) -> int:
        """Called from the applier's thread; files come in increasing order."""
        if not self._start <= index < self._start + len(self._fds):
            close_fds(self._fds)
            self._fds = []
            self._fds = anyio.from_thread.run(
                self._rpc.get_splitfdstream_files, self._stream_id, index, self._size
            )
            self._start = index
            self.peak = max(self.peak, len(self._fds))
            if not self._fds:
                raise ClientError(f"the proxy sent no file for index {index}")
        return self._fds[index - self._start]

    def close(self) -> None:
        close_fds(self._fds)
        self._fds = []


async def pull(
    image: str,
    dest: Path,
    *,
    cache_dir: Path | None = None,
    proxy_args: list[str] | None = None,
    window: int = api.DEFAULT_FD_WINDOW,
    on_progress: Callable[[int, int, ApplyStats], None] | None = None,
) -> PullReport:
    """Pull ``image`` into ``dest``, which must be absent or empty.

    :raises ClientError: ``dest`` is a symbolic link, not a directory, or not
        empty; checked before the proxy is started.
    :raises ProxyExitedError: the proxy died or hung up in the middle.
    """
    _check_dest(dest)
    dest.mkdir(parents=True, exist_ok=True)
    args = list(proxy_args or [])
    if cache_dir is not None:
        args += ["--cache-dir", str(cache_dir)]
    report = PullReport(image=image)
    started = time.monotonic()
    async with ProxyProcess.spawn(args) as proxy:
        try:
            await _pull_through(
                proxy, image, dest, fd_window(window), on_progress, report
            )
        except _CONNECTION_LOST as exc:
            raise await _proxy_gone(proxy) from exc
    report.seconds = time.monotonic() - started
    return report


def _check_dest(dest: Path) -> None:
    if dest.is_symlink():
        raise ClientError(
            f"{dest} is a symbolic link: pull writes only into a real directory,"
            " never through a link"
        )
    if dest.exists() and not dest.is_dir():
        raise ClientError(
            f"{dest} exists and is not a directory: pull only writes into a new"
            " or empty directory"
        )
    if dest.exists() and any(dest.iterdir()):
        raise ClientError(f"{dest} is not empty: pull only writes into a new directory")


async def _proxy_gone(proxy: ProxyProcess) -> ProxyExitedError:
    """Why the connection to the proxy was lost, with its exit status."""
    try:
        status = await anyio.to_thread.run_sync(proxy.process.wait, _EXIT_WAIT)
    except subprocess.TimeoutExpired:
        return ProxyExitedError("the proxy closed its connection unexpectedly")
    if status < 0:
        try:
            how = f"killed by {signal.Signals(-status).name}"
        except ValueError:
            how = f"killed by signal {-status}"
        return ProxyExitedError(f"the proxy exited unexpectedly ({how})")
    return ProxyExitedError(f"the proxy exited unexpectedly (status {status})")


async def _pull_through(
    proxy: ProxyProcess,
    image: str,
    dest: Path,
    window: int,
    on_progress: Callable[[int, int, ApplyStats], None] | None,
    report: PullReport,
) -> None:
    await proxy.legacy.initialize()
    rpc = await proxy.legacy.open_rpc()
    try:
        await rpc.initialize()
        image_id = await rpc.open_image(image)
        assert image_id is not None
        layers = await rpc.get_layer_info(image_id)
        applier = LayerApplier(dest)
        for number, layer in enumerate(layers, 1):
            apply = _apply_layer(rpc, image_id, layer, applier, window, report)
            if on_progress is None:
                await apply
                continue
            await _with_ticks(
                apply,
                partial(_report, on_progress, number - 1, len(layers), applier),
            )
            on_progress(number, len(layers), applier.stats)
        report.layers = len(layers)
        report.stats = applier.stats
    finally:
        await rpc.aclose()


async def _with_ticks(
    work: Coroutine[Any, Any, None], tick: Callable[[], None]
) -> None:
    """Run ``work`` while reporting progress; its errors come out unwrapped.

    A task group would wrap them in an ExceptionGroup, which the command
    line would show as a traceback instead of the entry or digest at fault.
    """
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_tick, tick)
        try:
            await work
        except Exception as exc:
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


def _report(
    on_progress: Callable[[int, int, ApplyStats], None],
    done: int,
    total: int,
    applier: LayerApplier,
) -> None:
    on_progress(done, total, applier.stats)


async def _tick(tick: Callable[[], None]) -> None:
    # The applier's counters are plain ints written by one thread; reading
    # them from here can only be slightly stale, which a progress bar allows.
    while True:
        tick()
        await anyio.sleep(0.2)


async def _apply_layer(
    rpc: RpcClient,
    image_id: int,
    layer: api.LayerDescription,
    applier: LayerApplier,
    window: int,
    report: PullReport,
) -> None:
    result, stream_fd, first = await rpc.get_splitfdstream(
        image_id, layer.digest, window
    )
    files = _FileWindow(rpc, result.stream_id, first, window)
    try:
        with os.fdopen(stream_fd, "rb") as stream:
            await anyio.to_thread.run_sync(applier.apply, stream, files.fd_for)
    finally:
        files.close()
        await rpc.close_splitfdstream(result.stream_id)
    report.tar_bytes += result.tar_size
    # The stream fd plus the window: what this client held at most.
    report.peak_fds = max(report.peak_fds, files.peak + 1)
