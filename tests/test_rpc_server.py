"""RpcServer over a real socketpair, against a client built on the stdlib.

The client frames responses with json.JSONDecoder.raw_decode, an
implementation independent of protocol.jsonrpc, and checks passed fds by
inode against os.stat.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from protocol.jsonrpc import ErrorKind, RpcError
from proxy.client import LegacyError, ProxyProcess
from proxy.fdsocket import FdSocket, close_fds
from proxy.rpc_server import Reply, RpcServer

pytestmark = pytest.mark.anyio


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Client:
    """A minimal jsonrpc-fdpass client: stdlib JSON framing plus an fd FIFO."""

    def __init__(self, sock: FdSocket) -> None:
        self.sock = sock
        self._buffer = b""
        self._fds: deque[int] = deque()
        self._next_id = 0

    async def send(
        self, document: dict[str, Any] | bytes, fds: Sequence[int] = ()
    ) -> None:
        payload = (
            document if isinstance(document, bytes) else json.dumps(document).encode()
        )
        await self.sock.send_message(payload, fds)

    async def call(
        self, method: str, params: Any = None, fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        self._next_id += 1
        request: dict[str, Any] = {
            "jsonrpc": "2.0",
            "method": method,
            "id": self._next_id,
        }
        if params is not None:
            request["params"] = params
        if fds:
            request["fds"] = len(fds)
        await self.send(request, fds)
        return await self.response()

    async def response(self) -> tuple[dict[str, Any], list[int]]:
        """The next response and its fds; raises EOFError at end of stream."""
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            data, fds = await self.sock.receive()
            self._fds.extend(fds)
            if not data:
                raise EOFError(self._buffer)
            self._buffer += data

    def _parse(self) -> tuple[dict[str, Any], list[int]] | None:
        text = self._buffer.lstrip(b" \t\r\n")
        try:
            document, end = json.JSONDecoder().raw_decode(text.decode())
        except (ValueError, UnicodeDecodeError):
            return None  # incomplete so far
        fd_count = document.get("fds", 0)
        if len(self._fds) < fd_count:
            return None
        self._buffer = text[len(text.decode()[:end].encode()) :]
        return document, [self._fds.popleft() for _ in range(fd_count)]


class TextParams(msgspec.Struct):
    text: str


class NoParams(msgspec.Struct):
    pass


class PathsParams(msgspec.Struct):
    paths: list[str]


class Methods:
    """Handlers for the tests, with hooks to hold them and watch them run."""

    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.notified: list[str] = []
        self.running = 0
        self.most_running = 0
        self.started = 0

    async def echo(self, params: TextParams, fds: list[int]) -> Reply:
        return Reply({"text": params.text})

    async def wait_for_gate(self, params: NoParams, fds: list[int]) -> Reply:
        self.started += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
        finally:
            self.running -= 1
        return Reply("opened")

    async def note(self, params: TextParams, fds: list[int]) -> Reply:
        self.notified.append(params.text)
        return Reply(None)

    async def open_files(self, params: PathsParams, fds: list[int]) -> Reply:
        return Reply(
            len(params.paths), [os.open(path, os.O_RDONLY) for path in params.paths]
        )

    async def stat_fds(self, params: NoParams, fds: list[int]) -> Reply:
        try:
            return Reply([[os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in fds])
        finally:
            close_fds(fds)

    async def not_found(self, params: NoParams, fds: list[int]) -> Reply:
        raise RpcError.of_kind(
            ErrorKind.NOT_FOUND, "image docker://x not found", image="x"
        )

    async def crash(self, params: NoParams, fds: list[int]) -> Reply:
        raise ValueError("secret internal detail")


def make_server(methods: Methods, **options: int) -> RpcServer:
    server = RpcServer(**options)
    server.register("Echo", TextParams, methods.echo)
    server.register("WaitForGate", NoParams, methods.wait_for_gate)
    server.register("Note", TextParams, methods.note)
    server.register("OpenFiles", PathsParams, methods.open_files)
    server.register("StatFds", NoParams, methods.stat_fds)
    server.register("NotFound", NoParams, methods.not_found)
    server.register("Crash", NoParams, methods.crash)
    return server


@contextlib.asynccontextmanager
async def serving(server: RpcServer) -> AsyncIterator[Client]:
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = Client(FdSocket(client_end))
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve, FdSocket(server_end))
        try:
            yield client
        finally:
            await client.sock.aclose()


def file_ids(fds: Sequence[int]) -> list[list[int]]:
    return [[os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in fds]


def path_ids(paths: Sequence[Path]) -> list[list[int]]:
    return [[os.stat(path).st_dev, os.stat(path).st_ino] for path in paths]


def make_files(directory: Path, count: int) -> list[Path]:
    paths = [directory / f"file-{index}" for index in range(count)]
    for path in paths:
        path.write_bytes(b"")
    return paths


async def test_call_returns_the_handler_result() -> None:
    async with serving(make_server(Methods())) as client:
        response, fds = await client.call("Echo", {"text": "héllo {}"})
    assert response == {"jsonrpc": "2.0", "result": {"text": "héllo {}"}, "id": 1}
    assert fds == []


async def test_a_slow_request_does_not_block_a_fast_one() -> None:
    methods = Methods()
    async with serving(make_server(methods)) as client:
        await client.send({"jsonrpc": "2.0", "method": "WaitForGate", "id": "slow"})
        await client.send(
            {"jsonrpc": "2.0", "method": "Echo", "params": {"text": "a"}, "id": "fast"}
        )
        first, _ = await client.response()
        methods.gate.set()
        second, _ = await client.response()
    assert (first["id"], second["id"]) == ("fast", "slow")
    assert second["result"] == "opened"


async def test_in_flight_requests_are_bounded_and_reading_waits() -> None:
    methods = Methods()
    async with serving(make_server(methods, max_in_flight=2)) as client:
        for index in range(5):
            await client.send({"jsonrpc": "2.0", "method": "WaitForGate", "id": index})
        await anyio.wait_all_tasks_blocked()
        assert methods.started == 2
        methods.gate.set()
        answered = sorted([(await client.response())[0]["id"] for _ in range(5)])
    assert answered == [0, 1, 2, 3, 4]
    assert methods.most_running == 2


async def test_unknown_method_is_method_not_found() -> None:
    async with serving(make_server(Methods())) as client:
        response, _ = await client.call("NoSuchMethod")
    assert response["error"]["code"] == -32601
    assert "NoSuchMethod" in response["error"]["message"]
    assert response["error"]["data"]["kind"] == "unsupported"
    assert response["id"] == 1


async def test_params_of_the_wrong_type_are_invalid_params_naming_the_field() -> None:
    async with serving(make_server(Methods())) as client:
        wrong_type, _ = await client.call("Echo", {"text": 5})
        missing, _ = await client.call("Echo", {})
        positional, _ = await client.call("Echo", ["a"])
    assert wrong_type["error"]["code"] == -32602
    assert "`$.text`" in wrong_type["error"]["message"]
    assert wrong_type["error"]["data"]["kind"] == "invalid-argument"
    assert missing["error"]["code"] == -32602
    assert "`text`" in missing["error"]["message"]
    assert positional["error"]["code"] == -32602


async def test_absent_params_mean_no_arguments() -> None:
    async with serving(make_server(Methods())) as client:
        response, _ = await client.call("NotFound")
    assert response["error"]["code"] == -32000


async def test_method_error_carries_its_kind_and_context() -> None:
    async with serving(make_server(Methods())) as client:
        response, _ = await client.call("NotFound", {})
    assert response["error"] == {
        "code": -32000,
        "message": "image docker://x not found",
        "data": {"kind": "not-found", "image": "x"},
    }


async def test_unexpected_exception_is_internal_error_without_details() -> None:
    async with serving(make_server(Methods())) as client:
        response, _ = await client.call("Crash", {})
    assert response["error"]["code"] == -32603
    assert response["error"]["data"]["kind"] == "internal"
    assert "secret" not in json.dumps(response)
    assert "Traceback" not in json.dumps(response)


@pytest.mark.parametrize(
    ("message", "expected_id"),
    [
        (b'{"jsonrpc":"2.0","method":5,"id":3}', 3),
        (b'{"jsonrpc":"2.0","method":"Echo","id":{"a":1}}', None),
        (b'{"jsonrpc":"1.0","method":"Echo","id":4}', 4),
        (b'{"hello":"world"}', None),
    ],
)
async def test_valid_json_that_is_no_request_is_invalid_request(
    message: bytes, expected_id: object
) -> None:
    async with serving(make_server(Methods())) as client:
        await client.send(message)
        response, _ = await client.response()
        # The connection survives: the stream is still in sync.
        echoed, _ = await client.call("Echo", {"text": "still here"})
    assert response["error"]["code"] == -32600
    assert response["error"]["data"]["kind"] == "invalid-request"
    assert response["id"] == expected_id
    assert echoed["result"] == {"text": "still here"}


async def test_notification_gets_no_response() -> None:
    methods = Methods()
    async with serving(make_server(methods)) as client:
        await client.send({"jsonrpc": "2.0", "method": "Note", "params": {"text": "n"}})
        await client.send({"jsonrpc": "2.0", "method": "NoSuchMethod"})
        response, _ = await client.call("Echo", {"text": "after"})
    assert response["id"] == 1
    assert methods.notified == ["n"]


async def test_six_hundred_fds_come_back_in_one_response(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 600)
    async with serving(make_server(Methods())) as client:
        response, fds = await client.call(
            "OpenFiles", {"paths": [str(p) for p in paths]}
        )
    try:
        assert response["fds"] == 600
        assert response["result"] == 600
        assert file_ids(fds) == path_ids(paths)
    finally:
        close_fds(fds)


async def test_fds_sent_with_a_request_reach_the_handler(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 600)
    fds = [os.open(path, os.O_RDONLY) for path in paths]
    try:
        async with serving(make_server(Methods())) as client:
            response, _ = await client.call("StatFds", {}, fds)
    finally:
        close_fds(fds)
    assert response["result"] == path_ids(paths)


async def test_syntax_error_ends_the_connection_with_fd_error() -> None:
    read_end, write_end = os.pipe()
    before = open_fd_count()
    async with serving(make_server(Methods())) as client:
        await client.send(b'{"jsonrpc":"2.0","method":"Echo","fds":1,}', [read_end])
        response, _ = await client.response()
        with pytest.raises(EOFError):
            await client.response()
    # The fd queued with the broken message was closed with the connection.
    assert open_fd_count() == before
    close_fds([read_end, write_end])
    assert response["error"]["code"] == -32050
    assert response["error"]["data"]["kind"] == "framing"
    assert response["id"] is None


async def test_next_message_before_promised_fds_ends_the_connection() -> None:
    read_end, write_end = os.pipe()
    async with serving(make_server(Methods())) as client:
        await client.send(
            b'{"jsonrpc":"2.0","method":"StatFds","id":1,"fds":2}', [read_end]
        )
        await client.send(b'{"jsonrpc":"2.0","method":"Echo","id":2}')
        response, _ = await client.response()
        with pytest.raises(EOFError):
            await client.response()
    close_fds([read_end, write_end])
    assert response["error"]["code"] == -32050
    assert "mismatched fd count" in response["error"]["message"]


async def test_a_session_leaks_no_fds(tmp_path: Path) -> None:
    paths = make_files(tmp_path, 300)
    before = open_fd_count()
    methods = Methods()
    async with serving(make_server(methods)) as client:
        sent = [os.open(path, os.O_RDONLY) for path in paths]
        await client.call("StatFds", {}, sent)
        # The server must close fds no handler took.
        await client.call("NoSuchMethod", {}, sent)
        await client.call("Echo", {"text": 1}, sent)
        await client.send({"jsonrpc": "2.0", "method": 1, "id": 9, "fds": 300}, sent)
        await client.response()
        close_fds(sent)
        _, received = await client.call("OpenFiles", {"paths": [str(p) for p in paths]})
        close_fds(received)
        # A request still running when the client leaves is cancelled.
        await client.send({"jsonrpc": "2.0", "method": "WaitForGate", "id": 1})
    assert open_fd_count() == before


# --- hostile framing: one connection ends, the server goes on -------------------

DEEPLY_NESTED = (
    b'{"jsonrpc":"2.0","id":1,"method":"Echo","params":'
    + b"[" * 1000
    + b"]" * 1000
    + b"}"
)


async def test_deep_nesting_ends_only_that_connection() -> None:
    server = make_server(Methods())
    async with serving(server) as broken, serving(server) as healthy:
        await broken.send(DEEPLY_NESTED)
        response, _ = await broken.response()
        with pytest.raises(EOFError):
            await broken.response()
        echoed, _ = await healthy.call("Echo", {"text": "still served"})
    assert response["error"]["code"] == -32050
    assert "nested more than 128 levels" in response["error"]["message"]
    assert response["id"] is None
    assert echoed["result"] == {"text": "still served"}


async def test_a_batch_ends_the_connection_with_fd_error() -> None:
    async with serving(make_server(Methods())) as client:
        await client.send(b'[{"jsonrpc":"2.0","method":"Echo","id":1}]')
        response, _ = await client.response()
        with pytest.raises(EOFError):
            await client.response()
    assert response["error"]["code"] == -32050
    assert "batches" in response["error"]["message"]


async def test_unannounced_fds_end_the_connection_and_are_closed() -> None:
    read_end, write_end = os.pipe()
    before = open_fd_count()
    async with serving(make_server(Methods())) as client:
        # The tester's case: 20 requests, each with 250 fds and no "fds".
        with contextlib.suppress(anyio.BrokenResourceError):
            for index in range(20):
                request = {"jsonrpc": "2.0", "method": "Echo", "id": index}
                request["params"] = {"text": "x"}
                await client.send(request, [read_end] * 250)
        response, fds = await client.response()
        with pytest.raises(EOFError):
            await client.response()
        # The server closed the fds it held, then its end: only ours is left.
        assert open_fd_count() == before + 1
    close_fds([read_end, write_end])
    assert response["error"]["code"] == -32050
    assert "250 fds that no message announced" in response["error"]["message"]
    assert fds == []


async def test_unannounced_fds_are_never_handed_to_a_later_request() -> None:
    read_end, write_end = os.pipe()
    async with serving(make_server(Methods())) as client:
        await client.send(b'{"jsonrpc":"2.0","method":"Echo","id":1}\n', [read_end])
        with contextlib.suppress(anyio.BrokenResourceError):
            await client.send(
                b'{"jsonrpc":"2.0","method":"StatFds","id":2,"fds":1}', [write_end]
            )
        response, _ = await client.response()
        with pytest.raises(EOFError):
            await client.response()
    close_fds([read_end, write_end])
    assert response["error"]["code"] == -32050
    assert "mismatched fd count" in response["error"]["message"]


async def test_our_own_bug_ends_only_that_connection_with_internal_error() -> None:
    def broken_callback() -> None:
        raise RuntimeError("a bug in the server")

    async def reply_with_broken_callback(params: NoParams, fds: list[int]) -> Reply:
        return Reply("answered", on_closed=broken_callback)

    server = make_server(Methods())
    server.register("Buggy", NoParams, reply_with_broken_callback)
    async with serving(server) as broken, serving(server) as healthy:
        answered, _ = await broken.call("Buggy", {})
        fatal, _ = await broken.response()
        with pytest.raises(EOFError):
            await broken.response()
        echoed, _ = await healthy.call("Echo", {"text": "still served"})
    assert answered["result"] == "answered"
    assert fatal["error"]["code"] == -32603
    assert fatal["error"]["data"]["kind"] == "internal"
    assert "bug" not in json.dumps(fatal)
    assert echoed["result"] == {"text": "still served"}


# --- the same against a spawned proxy ---------------------------------------------


def proxy_fd_count(proxy: ProxyProcess) -> int:
    return len(os.listdir(f"/proc/{proxy.process.pid}/fd"))


async def open_raw_connection(proxy: ProxyProcess) -> Client:
    _, fds, _ = await proxy.legacy.call("OpenJsonRPCFdPass")
    (fd,) = fds
    return Client(FdSocket(socket.socket(fileno=fd)))


async def settled_fd_count(proxy: ProxyProcess) -> int:
    """The proxy's fd count once it has closed the fds of its last reply.

    It closes a reply's fds after sending the reply, so one more round trip
    on the sequential legacy protocol orders the count after that.
    """
    with contextlib.suppress(LegacyError):
        await proxy.legacy.call("Initialize")  # "already initialized", no fds
    return proxy_fd_count(proxy)


async def break_connection(proxy: ProxyProcess, how: str) -> dict[str, Any]:
    """Open a connection, break its framing ``how``; the proxy's last words."""
    client = await open_raw_connection(proxy)
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(anyio.BrokenResourceError):
            if how == "nesting":
                await client.send(DEEPLY_NESTED)
            else:
                for index in range(20):
                    request = {"jsonrpc": "2.0", "method": "Initialize", "id": index}
                    await client.send(request, [read_end] * 250)
        response, _ = await client.response()
        with pytest.raises(EOFError):
            await client.response()
    finally:
        close_fds([read_end, write_end])
        await client.sock.aclose()
    return response


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("nesting", "nested more than 128 levels"),
        ("unannounced fds", "250 fds that no message announced"),
    ],
)
async def test_a_proxy_serves_other_connections_after_one_breaks_framing(
    how: str, reason: str
) -> None:
    async with ProxyProcess.spawn(["--insecure-policy"]) as proxy:
        await proxy.legacy.initialize()
        healthy = await proxy.legacy.open_rpc()
        try:
            baseline = await settled_fd_count(proxy)

            response = await break_connection(proxy, how)

            assert proxy.process.poll() is None
            assert await settled_fd_count(proxy) == baseline
            result = await healthy.initialize()
        finally:
            await healthy.aclose()
    assert response["error"]["code"] == -32050
    assert reason in response["error"]["message"]
    assert result.version == "1.0"


async def test_a_proxy_answers_deeply_nested_legacy_arguments_as_invalid() -> None:
    nested = msgspec.Raw(b"[" * 10_000 + b"]" * 10_000)
    async with ProxyProcess.spawn() as proxy:
        with pytest.raises(LegacyError, match="invalid request: JSON nested too"):
            await proxy.legacy.call("Initialize", nested)
        assert await proxy.legacy.initialize() == "0.2.9"
