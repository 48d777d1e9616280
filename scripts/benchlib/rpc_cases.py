"""Case 4: jsonrpc-fdpass GetConfig, sequential and with 16 calls in flight.

Ours only: skopeo 1.9 has no jsonrpc-fdpass. The in-flight rows are judged
by their ratio to the sequential rate on the same proxy. The client is the
same Python process for every row, so on two cores it competes with the
proxy for CPU; the ratios say how much of the sequential round trip is
latency that concurrency can hide.
"""

from __future__ import annotations

import itertools
import time

import anyio

from benchlib.measure import process_snapshot
from benchlib.results import Report, Row
from proxy.client import ProxyProcess, RpcClient

IN_FLIGHT = 16


async def _sequential_us(rpc: RpcClient, image_id: int, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await rpc.get_config(image_id)
    return (time.perf_counter() - started) / calls * 1e6


async def _in_flight_rate(
    connections: list[tuple[RpcClient, int]], per_connection: int, calls: int
) -> float:
    """Calls/s with ``per_connection`` callers on each connection."""
    tickets = itertools.count()

    async def caller(rpc: RpcClient, image_id: int) -> None:
        while next(tickets) < calls:
            await rpc.get_config(image_id)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for rpc, image_id in connections:
            for _ in range(per_connection):
                tg.start_soon(caller, rpc, image_id)
    return calls / (time.perf_counter() - started)


async def rpc_cases(report: Report, image: str, runs: int, calls: int = 1000) -> None:
    case = "4 jsonrpc GetConfig"
    sequential = report.add(
        Row(case, "sequential, 1 conn", "us/call", higher_is_better=False)
    )
    one = report.add(Row(case, f"{IN_FLIGHT} in flight, 1 conn", "calls/s"))
    four = report.add(Row(case, f"{IN_FLIGHT} in flight, 4 conns", "calls/s"))
    async with ProxyProcess.spawn() as proxy:
        await proxy.legacy.initialize()
        connections: list[tuple[RpcClient, int]] = []
        try:
            for _ in range(4):
                rpc = await proxy.legacy.open_rpc()
                connections.append((rpc, 0))
                await rpc.initialize()
                image_id = await rpc.open_image(image)
                assert image_id is not None, f"{image} did not open"
                connections[-1] = (rpc, image_id)
            first = connections[0]
            await _sequential_us(*first, 100)
            for _ in range(runs):
                sequential.values.append(await _sequential_us(*first, calls))
                one.values.append(await _in_flight_rate([first], IN_FLIGHT, 2 * calls))
                four.values.append(
                    await _in_flight_rate(connections, IN_FLIGHT // 4, 2 * calls)
                )
            rss = process_snapshot(proxy.process.pid).peak_rss_mb
            sequential.add_resources(peak_proxy_rss_mb=rss)
        finally:
            for rpc, _ in connections:
                await rpc.aclose()
