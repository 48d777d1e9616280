"""Cases 1-3 (legacy protocol) and the start-up row, ours beside skopeo.

Both servers are spawned by ``ProxyProcess.spawn`` and driven by the same
coroutines below; only ``command`` differs. Runs alternate between the
servers, so drift on this shared machine hits both alike. Each proxy's
``VmHWM`` is read just before it is shut down.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio

from benchlib.measure import (
    cat_to_pipe,
    cpu_seconds,
    drain,
    process_snapshot,
    read_to_end,
)
from benchlib.results import Report, Row
from proxy.client import LegacyError, ProxyProcess
from proxy.pipes import PIPE_SIZE


@dataclass(frozen=True)
class Server:
    """A proxy implementation: ``command=None`` is ours."""

    name: str
    command: list[str] | None


OURS = Server("ours", None)
SKOPEO = Server("skopeo", ["skopeo"])
SERVERS = (OURS, SKOPEO)


@dataclass(frozen=True)
class BlobUnderTest:
    image: str
    digest: str
    size: int
    path: Path


@dataclass
class Session:
    server: Server
    proxy: ProxyProcess
    image_id: int


@asynccontextmanager
async def open_sessions(image: str) -> AsyncIterator[list[Session]]:
    """One initialised proxy per server with ``image`` opened."""
    async with AsyncExitStack() as stack:
        sessions = []
        for server in SERVERS:
            proxy = await stack.enter_async_context(
                ProxyProcess.spawn([], command=server.command)
            )
            await proxy.legacy.initialize()
            image_id = await proxy.legacy.open_image(image)
            sessions.append(Session(server, proxy, image_id))
        yield sessions


def _record_rss(report: Report, case: str, sessions: list[Session]) -> None:
    for session in sessions:
        row = report.find(case, session.server.name)
        if row is not None:
            snapshot = process_snapshot(session.proxy.process.pid)
            row.add_resources(peak_proxy_rss_mb=snapshot.peak_rss_mb)


async def _drain_concurrently(fd: int, finish: Callable[[], Awaitable[object]]) -> int:
    """Drain ``fd`` in a thread while ``finish`` runs, as clients must."""
    got: list[int] = []
    async with anyio.create_task_group() as tg:

        async def read() -> None:
            got.append(await anyio.to_thread.run_sync(drain, fd))

        tg.start_soon(read)
        await finish()
    return got[0]


async def get_blob(session: Session, blob: BlobUnderTest) -> int:
    """Legacy GetBlob (verified by the server) drained to EOF, then FinishPipe."""
    legacy = session.proxy.legacy
    _, fds, pipeid = await legacy.call(
        "GetBlob", session.image_id, blob.digest, blob.size
    )
    (fd,) = fds
    return await _drain_concurrently(fd, lambda: legacy.call("FinishPipe", pipeid))


async def get_raw_blob(session: Session, blob: BlobUnderTest) -> int:
    """Legacy GetRawBlob: drain the data fd, then the error fd must be empty."""
    _, fds, _ = await session.proxy.legacy.call(
        "GetRawBlob", session.image_id, blob.digest
    )
    data_fd, error_fd = fds
    count = await anyio.to_thread.run_sync(drain, data_fd)
    error = await anyio.to_thread.run_sync(read_to_end, error_fd)
    if error:
        raise RuntimeError(f"GetRawBlob {blob.digest}: the proxy reported {error!r}")
    return count


async def _throughput(
    transfer: Callable[[], Awaitable[int]], expected: int, repeat: int
) -> float:
    """MB/s (10^6 bytes) over ``repeat`` back-to-back transfers."""
    started = time.perf_counter()
    for _ in range(repeat):
        count = await transfer()
        if count != expected:
            raise RuntimeError(f"read {count} bytes, expected {expected}")
    return expected * repeat / (time.perf_counter() - started) / 1e6


async def blob_cases(
    report: Report, blob: BlobUnderTest, runs: int, repeat: int = 3
) -> None:
    """Case 1 (GetBlob verified, ours vs skopeo) and 2 (GetRawBlob vs cat)."""
    case1, case2 = "1 GetBlob verified", "2 GetRawBlob"
    rows1 = {s.name: report.add(Row(case1, s.name, "MB/s")) for s in SERVERS}
    raw = report.add(Row(case2, "ours", "MB/s"))
    # skopeo 1.9 has no GetRawBlob: `cat FILE` into a pipe drained by the
    # same function stands in, with our proxy's pipe size and the default.
    cats = {
        PIPE_SIZE: report.add(Row(case2, "cat, 1 MiB pipe", "MB/s")),
        None: report.add(Row(case2, "cat, 64 KiB pipe", "MB/s")),
    }
    report.anchors[case1] = "skopeo"
    report.anchors[case2] = "cat, 1 MiB pipe"

    def cat_transfer(pipe_size: int | None) -> Callable[[], Awaitable[int]]:
        def once() -> int:
            count, _ = cat_to_pipe(blob.path, pipe_size)
            return count

        return lambda: anyio.to_thread.run_sync(once)

    async with open_sessions(blob.image) as sessions:
        ours = sessions[0]
        for session in sessions:  # warm the page cache and both proxies
            await get_blob(session, blob)
        for _ in range(runs):
            for session in sessions:
                rows1[session.server.name].values.append(
                    await _throughput(
                        partial(get_blob, session, blob), blob.size, repeat
                    )
                )
            raw.values.append(
                await _throughput(partial(get_raw_blob, ours, blob), blob.size, repeat)
            )
            for pipe_size, row in cats.items():
                row.values.append(
                    await _throughput(cat_transfer(pipe_size), blob.size, repeat)
                )
        _record_rss(report, case1, sessions)
        _record_rss(report, case2, sessions[:1])


async def _per_call_us(
    row: Row, pid: int, call: Callable[[], Awaitable[object]], calls: int
) -> None:
    """Wall time per call, and the proxy's own CPU time per call beside it."""
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    row.values.append((time.perf_counter() - started) / calls * 1e6)
    row.add_resources(proxy_cpu_us=(cpu_seconds(pid) - cpu_before) / calls * 1e6)


async def _close_unknown_image(session: Session) -> None:
    try:
        await session.proxy.legacy.call("CloseImage", 987654321)
    except LegacyError:
        return
    raise RuntimeError(f"{session.server.name}: CloseImage of an unknown id succeeded")


async def round_trip_cases(
    report: Report, image: str, runs: int, calls: int = 1000
) -> None:
    """Case 3: GetManifest + read + FinishPipe, and an error reply, in us/call."""
    manifest_case, error_case = "3 GetManifest+FinishPipe", "3 error reply"
    report.anchors[manifest_case] = report.anchors[error_case] = "skopeo"
    rows = {
        (case, s.name): report.add(Row(case, s.name, "us/call", higher_is_better=False))
        for case in (manifest_case, error_case)
        for s in SERVERS
    }
    async with open_sessions(image) as sessions:
        for session in sessions:
            for _ in range(50):
                await session.proxy.legacy.call_piped("GetManifest", session.image_id)
                await _close_unknown_image(session)
        for _ in range(runs):
            for session in sessions:
                get_manifest = partial(
                    session.proxy.legacy.call_piped, "GetManifest", session.image_id
                )
                pid = session.proxy.process.pid
                await _per_call_us(
                    rows[manifest_case, session.server.name], pid, get_manifest, calls
                )
                await _per_call_us(
                    rows[error_case, session.server.name],
                    pid,
                    partial(_close_unknown_image, session),
                    calls,
                )
        _record_rss(report, manifest_case, sessions)


async def startup_case(report: Report, runs: int) -> None:
    """Spawn, Initialize, Shutdown and reap: the fixed cost in every pull row."""
    case = "0 start-up"
    report.anchors[case] = "skopeo"
    rows = {
        s.name: report.add(Row(case, s.name, "ms", higher_is_better=False))
        for s in SERVERS
    }
    for _ in range(runs):
        for server in SERVERS:
            started = time.perf_counter()
            async with ProxyProcess.spawn([], command=server.command) as proxy:
                await proxy.legacy.initialize()
            rows[server.name].values.append((time.perf_counter() - started) * 1e3)
